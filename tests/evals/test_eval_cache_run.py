"""The shared eval cache end to end on the tiny fixtures: a metric evaluated without the cache, then cold and warm
with it, gives the same result JSON bit for bit (less the run's id and time); a changed key misses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SAEBENCH_TINY_RUN_WARNINGS, run_tiny_evaluate, tiny_eval_config

pytestmark = [*SAEBENCH_TINY_RUN_WARNINGS, pytest.mark.slow]

VOLATILE = ("eval_id", "datetime_epoch_millis")
"""Fields of a SAEBench result file that name the run, not the result."""
SAES = ("dbksvd_plain_K64_k4", "topk_K64_k4")


def _evaluate(inputs, out: Path, metric: str, cache: dict, change=None) -> Path:
    cfg = tiny_eval_config(inputs, out, [metric])
    cfg.eval["cache"] = cache
    if change is not None:
        change(cfg.eval)
    return run_tiny_evaluate(inputs, cfg, out)


RESULT_DIRS = {"core": ("core", "core_fit_positions")}
"""Result folders of a metric that writes more than one (core's two position sets)."""


def _results(folder: Path, metric: str) -> dict[str, dict]:
    assert json.loads((folder / "failed.json").read_text()) == []
    out = {}
    for sub in RESULT_DIRS.get(metric, (metric,)):
        for name in SAES:
            res = json.loads((folder / "eval_results" / sub / f"{name}_custom_sae_eval_results.json").read_text())
            out[f"{sub}/{name}"] = {k: v for k, v in res.items() if k not in VOLATILE}
    return out


def _cache_info(folder: Path, metric: str) -> dict:
    return json.loads((folder / "eval_info.json").read_text())["eval_cache"]["metrics"][metric]


CHANGES = {
    "core": lambda e: e.core.__setitem__("n_eval_sparsity_variance_batches", 3),
    "sparse_probing": lambda e: e.sparse_probing.config.__setitem__("probe_test_set_size", 18),
    "scr": lambda e: e.scr.config.__setitem__("probe_epochs", 3),
    "absorption": lambda e: e.absorption.__setitem__("vocab_size", 110),
}
"""A change of each metric's key (a config value its SAE-independent part reads)."""


PLAIN = {
    "core": lambda e: e.core.__setitem__("reuse_forwards_mb", 0),
    "absorption": lambda e: e.absorption.__setitem__("reuse_activations_mb", 0),
}
"""The uncached run of a metric whose forwards are also shared within a run: SAEBench's own path, every forward
in full (core: nothing kept, no splice from the hook)."""


@pytest.mark.parametrize("metric", ["core", "sparse_probing", "scr", "absorption"])
def test_cached_results_equal_uncached_and_a_changed_key_misses(eval_inputs, tmp_path, metric):
    root = tmp_path / "cache"
    on = {"enabled": True, "root": str(root), "max_gb": 1.0}
    plain_dir = _evaluate(eval_inputs, tmp_path / "plain", metric, {"enabled": False}, PLAIN.get(metric))
    plain = _results(plain_dir, metric)

    cold_dir = _evaluate(eval_inputs, tmp_path / "cold", metric, on)
    assert _cache_info(cold_dir, metric)["status"] == "miss" and _cache_info(cold_dir, metric)["published"]
    warm_dir = _evaluate(eval_inputs, tmp_path / "warm", metric, on)
    warm = _cache_info(warm_dir, metric)
    assert warm["status"] == "hit" and warm["bytes"] > 0
    assert json.loads((warm_dir / "eval_info.json").read_text())["eval_cache"]["hits"] == 1

    assert _results(cold_dir, metric) == plain  # bit-identical: same floats, not merely close
    assert _results(warm_dir, metric) == plain
    if metric == "core":  # warm: no forward below the hook; each SAE's splices run from the hook up
        info = json.loads((warm_dir / "eval_info.json").read_text())["sizes"]["core"]["shared_forwards"]
        splices = 2 * len(SAES)  # one reconstruction batch, two position sets
        assert info["loaded"] > 0 and info["forwards_run"] == info["started_at_hook"] == splices
    if metric == "absorption":  # cold: each prompt list ran once for both SAEs; warm: none ran
        cold_acts = json.loads((cold_dir / "eval_info.json").read_text())["sizes"]["absorption"]["prompt_activations"]
        warm_acts = json.loads((warm_dir / "eval_info.json").read_text())["sizes"]["absorption"]["prompt_activations"]
        assert cold_acts["runs"] > 0 and cold_acts["reused"] > 0
        assert warm_acts["runs"] == 0 and warm_acts["loaded"] > 0 and warm_acts["reused"] > 0

    changed = _evaluate(eval_inputs, tmp_path / "changed", metric, on, CHANGES[metric])
    assert _cache_info(changed, metric)["status"] == "miss"
    assert _cache_info(changed, metric)["key"] != warm["key"]
    assert len(list(root.glob(f"{metric}/*/manifest.json"))) == 2
