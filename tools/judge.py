"""The tests' local autointerp judge: llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) on the
offline SmolLM2-135M-Instruct GGUF. It has no wheel on PyPI, so ``setup.sh --tests`` compiles it.

Why not for the build machine's own CPU: a build with llama.cpp's default ``GGML_NATIVE=ON`` on a machine with
AVX-512 and AMX answered ``/v1/models`` and then died with SIGSEGV on its first chat completion, on the machine
that built it; the same version built with ``GGML_NATIVE=OFF`` answered. So the builds here name their instruction
sets (``BUILDS``): first AVX2/FMA/F16C without AVX-512 or AMX (any x86-64 CPU since 2013-2015), and, if that
build does not answer, the x86-64 baseline (SSE2 only). Each is checked by starting the server and asking for one
token; the first that answers stays installed. The outcome, with the exit code or signal and the log's tail of
every build that failed, goes to ``STATUS_FILE`` in the environment, where the test reads it: it skips naming
the crash only when setup recorded one, and otherwise fails with the server's own exit status and log.

``python -m tools.judge ensure`` (``setup.sh --tests``; ``--version V``, default the lock's) builds, checks and records;
``python -m tools.judge check`` checks what is installed. The server process itself: ``tools/server.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.server import LOG_TAIL_LINES, Server, free_port

#: Where ``ensure`` records its outcome: inside the environment the judge was built into.
STATUS_FILE = Path(sys.prefix) / "judge-check.json"
#: The model name the server answers to.
JUDGE_NAME = "smollm2-135m-instruct"

_COMMON = [
    "-DGGML_NATIVE=OFF",
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DGGML_AVX512=OFF",
    "-DGGML_AVX512_VBMI=OFF",
    "-DGGML_AVX512_VNNI=OFF",
    "-DGGML_AVX512_BF16=OFF",
    "-DGGML_AVX_VNNI=OFF",
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
]


@dataclass(frozen=True)
class Build:
    """One way to compile llama-cpp-python: a name, what CPUs it runs on, and its CMake options."""

    name: str
    cpus: str
    cmake_args: tuple[str, ...]

    def key(self, version: str) -> str:
        """A folder name that changes with the version and every option (the wheel cache's key)."""
        digest = hashlib.sha256(" ".join(self.cmake_args).encode()).hexdigest()[:12]
        return f"{version}-{self.name}-{digest}"


BUILDS = (
    Build(
        "portable",
        "x86-64 with AVX2, FMA, F16C and BMI2 (Intel Haswell, AMD Zen and later); no AVX-512, no AMX",
        tuple(
            _COMMON
            + [
                "-DGGML_SSE42=ON",
                "-DGGML_AVX=ON",
                "-DGGML_AVX2=ON",
                "-DGGML_BMI2=ON",
                "-DGGML_FMA=ON",
                "-DGGML_F16C=ON",
            ]
        ),
    ),
    Build(
        "baseline",
        "any x86-64 CPU (SSE2 only)",
        tuple(
            _COMMON
            + [
                "-DGGML_SSE42=OFF",
                "-DGGML_AVX=OFF",
                "-DGGML_AVX2=OFF",
                "-DGGML_BMI2=OFF",
                "-DGGML_FMA=OFF",
                "-DGGML_F16C=OFF",
            ]
        ),
    ),
)


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF of the offline model package (``setup.sh`` installs it)."""
    from pipeline.data.offline_models import OFFLINE_MODELS, SMOLLM2_GGUF, package_dir

    return package_dir(OFFLINE_MODELS["smollm2-135m"]) / SMOLLM2_GGUF


def llama_server(log: Path, port: int | None = None, n_ctx: int = 4096, threads: int = 2) -> Server:
    """llama.cpp's server (``python -m llama_cpp.server``) on the SmolLM2 GGUF as ``JUDGE_NAME`` (not started)."""
    port = port or free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(smollm2_gguf()),
        "--model_alias",
        JUDGE_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--seed",
        "0",
    ]
    return Server(cmd, port, log)


def check_installed(log: Path) -> str | None:
    """Start the installed server and ask for one token: ``None`` if it answered, else why not."""
    try:
        with llama_server(log, n_ctx=512) as server:
            server.one_token(JUDGE_NAME)
    except Exception as exc:  # every failure is reported, none hidden
        return f"{type(exc).__name__}: {exc}"
    return None


def read_status(path: Path | None = None) -> dict | None:
    """What ``ensure`` recorded (in ``path``, default ``STATUS_FILE``), or ``None``."""
    try:
        return json.loads((path or STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def skip_reason(status: dict) -> str:
    """The test's skip message when setup recorded that no build answered: every build and how it failed."""
    tried = "; ".join(f"the {a['build']} build: {a['error']}" for a in status.get("attempts", []))
    return f"setup.sh --tests found no llama.cpp judge that answers on this machine ({status.get('cpu', '?')}). {tried}"


def _write_status(status: dict) -> None:
    from pipeline.utils.atomic import atomic_write_text

    atomic_write_text(STATUS_FILE, json.dumps(status, indent=1) + "\n")


def _cpu_flags() -> str:
    """The SIMD extensions this CPU reports (for the record; nothing is decided on them)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown CPU"
    wanted = [f for f in flags.split(":", 1)[1].split() if f.startswith(("avx", "amx", "sse4", "fma", "f16c"))]
    return " ".join(sorted(wanted)) or "no AVX"


def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return None


def _pip(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], env=env, capture_output=True, text=True)


def build_wheel(build: Build, version: str, cache: Path) -> Path:
    """The llama-cpp-python ``version`` wheel compiled with ``build``'s options, from ``cache`` if it holds one
    (keyed by version and options, unlike pip's own cache), else compiled into it. Needs the lock's
    scikit-build-core, cmake and ninja installed (``--no-build-isolation``: no unlocked build tools)."""
    folder = cache / build.key(version)
    wheels = sorted(folder.glob("llama_cpp_python-*.whl"))
    if wheels:
        return wheels[-1]
    tmp = Path(tempfile.mkdtemp(prefix="judge-wheel-", dir=cache))
    env = {
        **os.environ,
        "CMAKE_ARGS": " ".join(build.cmake_args),
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
    }
    t0 = time.monotonic()
    out = _pip(
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-cache-dir",
        "-w",
        str(tmp),
        f"llama-cpp-python=={version}",
        env=env,
    )
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((out.stdout + out.stderr).splitlines()[-LOG_TAIL_LINES:])
        raise RuntimeError(f"compiling llama-cpp-python {version} ({build.name}) failed:\n{tail}")
    print(f"judge: compiled the {build.name} build in {time.monotonic() - t0:.0f} s", flush=True)
    if folder.exists():  # a wheel-less leftover of an interrupted build
        shutil.rmtree(folder)
    tmp.replace(folder)
    return sorted(folder.glob("llama_cpp_python-*.whl"))[-1]


def ensure(version: str, cache: Path, logs: Path) -> bool:
    """Make llama-cpp-python ``version`` installed and answering, trying ``BUILDS`` in order; record the outcome in
    ``STATUS_FILE``. True when a build answered."""
    from tools.lock import JUDGE_BUILD, read_lock

    status = read_status()
    attempts: list[dict[str, str]] = []
    names = {b.name: b for b in BUILDS}
    if (
        status
        and status.get("ok")
        and status.get("version") == version
        and _installed_version() == version
        and status.get("build") in names
        and status.get("cmake_args") == list(names[status["build"]].cmake_args)
    ):
        error = check_installed(logs / "check-installed.log")
        if error is None:
            print(f"judge: the installed {status['build']} build of llama-cpp-python {version} answers", flush=True)
            return True
        attempts.append({"build": status["build"], "error": f"(installed before) {error}"})
    pins = read_lock()
    tools = [f"{name}=={pins[name]}" for name in JUDGE_BUILD if name != "llama-cpp-python"]
    out = _pip("install", "-q", "--no-deps", *tools)
    if out.returncode != 0:
        error = f"installing the build tools ({' '.join(tools)}) failed:\n{out.stderr[-3000:]}"
        attempts.append({"build": "every", "error": error})
    cache.mkdir(parents=True, exist_ok=True)
    for build in BUILDS if out.returncode == 0 else ():
        print(f"judge: the {build.name} build ({build.cpus}); compiling takes minutes the first time", flush=True)
        try:
            wheel = build_wheel(build, version, cache)
        except RuntimeError as exc:
            attempts.append({"build": build.name, "error": str(exc)})
            print(f"judge: {exc}", file=sys.stderr, flush=True)
            continue
        out = _pip("install", "-q", "--no-deps", "--force-reinstall", str(wheel))
        if out.returncode != 0:
            attempts.append({"build": build.name, "error": f"pip could not install {wheel}: {out.stderr[-2000:]}"})
            continue
        error = check_installed(logs / f"check-{build.name}.log")
        if error is None:
            _write_status(
                {
                    "ok": True,
                    "version": version,
                    "build": build.name,
                    "cpus": build.cpus,
                    "cmake_args": list(build.cmake_args),
                    "cpu": _cpu_flags(),
                    "attempts": attempts,
                }
            )
            print(f"judge: the {build.name} build answered a one-token completion", flush=True)
            return True
        attempts.append({"build": build.name, "error": error})
        print(f"judge: the {build.name} build did not answer: {error}", file=sys.stderr, flush=True)
    _write_status({"ok": False, "version": version, "cpu": _cpu_flags(), "attempts": attempts})
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.judge", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_ensure = sub.add_parser("ensure", help="build, check and record llama-cpp-python[server]")
    p_ensure.add_argument("--version", default=None, help="the llama-cpp-python version (default: the lock's)")
    p_ensure.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DBKSVD_CACHE", Path.home() / ".cache" / "dbksvd-pipeline")) / "judge-wheels",
    )
    sub.add_parser("check", help="start the installed server and ask for one token")
    args = parser.parse_args(argv)
    logs = Path(tempfile.mkdtemp(prefix="judge-check-"))
    if args.command == "check":
        error = check_installed(logs / "check.log")
        print("judge: answers" if error is None else f"judge: {error}")
        return 0 if error is None else 1
    if args.version is None:
        from tools.lock import read_lock

        args.version = read_lock()["llama-cpp-python"]
    ok = ensure(args.version, args.cache, logs)
    if not ok:
        status = read_status() or {}
        print(f"judge: {skip_reason(status)}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
