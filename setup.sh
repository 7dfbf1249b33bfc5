#!/usr/bin/env bash
# One-command set-up for dbksvd-pipeline on a fresh machine (CPU). Idempotent: re-running is cheap.
#   bash setup.sh            -> creates .venv and installs the project from requirements.lock (every package at the
#                               lock's version), the offline model weights and text
#   bash setup.sh --tests    -> the same, plus what only the tests use: headless Chromium (Debian's chromium, to
#                               open the generated pages) and llama.cpp's OpenAI-compatible server
#                               (llama-cpp-python[server] at the lock's version, compiled from source for any x86-64
#                               CPU and checked with a one-token completion: tools/judge.py; ~4-8 min on 2 cores, once)
# GPU users: install the CUDA torch of your choice first, then run with TORCH_SPEC=torch (see README).
# The lock: requirements.lock, refreshed by `.venv/bin/uv pip compile pyproject.toml -o requirements.lock` (README).
set -euo pipefail
cd "$(dirname "$0")"
TESTS=0
for arg in "$@"; do
    case "$arg" in
        --tests) TESTS=1 ;;
        *) echo "setup.sh: unknown option $arg (options: --tests)" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3}
LOCK=requirements.lock
# the torch of the lock (the CPU build here: pip takes it from the local wheel folder where there is one)
LOCKED_TORCH="$("$PY" -m tools.lock pin torch)"
TORCH_SPEC=${TORCH_SPEC:-$LOCKED_TORCH}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# 1. torch, and the lock's lists for the installs below (tools/lock.py: without torch, without the judge's build)
if [ "$TORCH_SPEC" = "$LOCKED_TORCH" ]; then
    # the lock's torch, its dependencies at the lock's versions
    python -m tools.lock split .venv
    pip install -q "$TORCH_SPEC" -c .venv/lock-constraints.txt
    LOCK_CHECK=""
else
    # your own torch (a CUDA build): it and everything it requires stay as pip resolves them for it
    pip install -q "$TORCH_SPEC"
    python -m tools.lock split .venv --torch-any
    LOCK_CHECK="--torch-any"
fi
# 2. everything else exactly as locked, with no resolution of its own (--no-deps): the lock already holds every
#    dependency but those left out on purpose (torchvision, NCCL: pyproject.toml's [tool.uv.pip]) and the judge's
#    build (step 4, --tests only). The project itself is built with the lock's setuptools (no build isolation)
pip install -q --no-deps -r .venv/lock-install.txt
pip install -q --no-deps --no-build-isolation -e .
# an environment made by an older setup.sh or by hand may hold what the lock leaves out on purpose
pip uninstall -y -q torchvision nvidia-nccl-cu12 >/dev/null 2>&1 || true
# 3. the offline text: Jane Austen's novels from Debian's r-cran-janeaustenr (a .deb fetched with
#    `apt-get download`; nothing is installed system-wide, pipeline/data/text.py reads the .deb)
AUSTEN_DIR="${DBKSVD_CACHE:-$HOME/.cache/dbksvd-pipeline}/text/austen"
if ! ls "$AUSTEN_DIR"/r-cran-janeaustenr_*.deb >/dev/null 2>&1; then
    mkdir -p "$AUSTEN_DIR"
    # apt-get download needs package lists; fetch them only when the first try finds none
    ( cd "$AUSTEN_DIR" && apt-get download -q r-cran-janeaustenr 2>/dev/null ) || {
        apt-get update -q >/dev/null
        ( cd "$AUSTEN_DIR" && apt-get download -q r-cran-janeaustenr )
    }
fi
# compile the CPU fit's loops (numba) now, so that the first fit's clock holds no compilation (~45 s, cached)
python -c "from pipeline.core.warm import warm_up; warm_up()" || echo "note: the compiled CPU loops did not build; fits use the torch loops"
# --- test-only tools (bash setup.sh --tests) --------------------------------------------------------
if [ "$TESTS" = 1 ]; then
    # 4. the autointerp test's judge: llama.cpp's server on the offline SmolLM2 GGUF. No wheel on PyPI, so it is
    #    compiled, for a portable x86-64 CPU (no AVX-512 or AMX: a build for the build machine's own CPU crashed
    #    on one), checked with a one-token completion, rebuilt for the x86-64 baseline if that fails; the outcome
    #    is recorded in .venv for the test to read (tools/judge.py)
    python -m tools.judge ensure || \
        echo "note: no working llama.cpp judge here (reason above and in .venv/judge-check.json); the local-judge test will skip naming it"
    # the dashboards test opens the generated pages in headless Chromium (skipped with the reason without it)
    if ! command -v chromium >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || {
                apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; } ||
                echo "note: chromium could not be installed here; the browser checks of the tests will be skipped"
        else
            echo "note: no chromium and no root apt-get here; the browser checks of the tests will be skipped"
        fi
    fi
fi
# the environment against the lock: every locked package installed at its version (tools/lock.py)
python -m tools.lock check $LOCK_CHECK
echo "set-up done: activate with '. .venv/bin/activate'"
