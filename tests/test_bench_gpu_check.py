"""``benchmarks/bench_gpu_check.py``, the one command for a lent GPU: its sizes are the preset's, its planned
memory composes, and ``--cpu-smoke`` runs every section end to end at tiny sizes on this machine's CPU."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "bench_gpu_check.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_the_full_sizes_are_the_gemma_preset(bench):
    from transformers import Gemma2Config

    from pipeline.data.architectures import GEMMA_2_2B

    s, cfg = bench.FULL, bench.compose(["experiment=gemma2b_paper"])
    assert s.gemma == {} and Gemma2Config().hidden_size == GEMMA_2_2B.d_model  # the config's defaults: gemma-2-2b
    assert (s.layer, s.n_ctx, s.context, s.harvest_batch) == (
        cfg.model.layer,
        cfg.model.n_ctx,
        cfg.harvest.context_length,
        cfg.harvest.batch_size,
    )
    assert (s.n_atoms, s.k, s.fit_rows) == (cfg.dictionary.n_atoms, cfg.dictionary.coder.k, cfg.dictionary.batch_size)
    assert s.core_prompts == cfg.eval.core.batch_size_prompts and s.dtype.__repr__() == f"torch.{cfg.model.dtype}"


def test_the_planned_memory_of_each_section(bench):
    planned = bench.planned(bench.FULL, [])
    assert set(planned) == {"harvest_forward", "evaluate_core", "fit_iteration", "sae_step"}
    assert 6e9 < planned["harvest_forward"] < 8e9  # 3.2 B bf16 parameters and a little
    assert bench.planned(bench.QUICK, [])["fit_iteration"] < planned["fit_iteration"]


@pytest.mark.slow
def test_the_cpu_smoke_run_writes_every_section(tmp_path):
    """The whole script at tiny sizes (~25 s on 2 cores): the gpu-marked tests (skipped here), a random Gemma-2
    through the loader, the harvest, core on both SAEs, the fit's sections and the SAE steps."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out)]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "cpu-smoke" and "failed" not in res
    assert res["gpu_tests"]["returncode"] in (0, 5) and "skipped" in res["gpu_tests"]["summary"]
    for name in ("harvest_forward", "harvest", "coder", "atom_update", "fit_iteration", "sae_step"):
        assert res[name]["tokens_per_s"] > 0, name
        assert res[name]["peak_gpu_bytes"] is None  # no CUDA here
    for sae in ("dictionary", "batchtopk"):
        assert res["evaluate_core"][sae]["core_seconds_extrapolated"] > 0
    assert res["evaluate_core"]["dictionary"]["d_sae"] == 2 * res["sizes"]["n_atoms"]  # signed: the ± split
    assert "section" in done.stdout and "written:" in done.stdout
