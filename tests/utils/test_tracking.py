"""Experiment tracking (``pipeline.utils.tracking``): wandb runs written offline into a temporary folder, the
disabled default (nothing written, wandb never imported), the fallbacks, and sae-lens's trainer logging into
a tracker's run.

wandb 0.31 writes an offline run as ``<WANDB_DIR>/wandb/offline-run-*/run-<id>.wandb`` (a LevelDB-style log
of protobuf records; no ``wandb-summary.json``): :func:`read_offline_run` reads it back with wandb's own
protobuf classes.
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.utils.tracking import NEVER, Tracker, TrackingConfig, flatten, open_tracker, plain, sae_lens_logging
from pipeline.utils.typed_config import typed_node
from tests.conftest import REPO

_BLOCK = 32768  # LevelDB log block size used by the .wandb file
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path: Path) -> list[Any]:
    """The protobuf ``Record``s of a ``.wandb`` file (7-byte ``:W&B`` header, then LevelDB log blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        assert kind in (_FULL, _FIRST, _MIDDLE, _LAST), f"bad chunk type {kind} at {pos}"
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (_FULL, _LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def read_offline_run(wandb_dir: Path) -> dict[str, Any]:
    """The single offline run under ``wandb_dir`` (see :func:`read_offline_runs`)."""
    runs = read_offline_runs(wandb_dir)
    assert len(runs) == 1, f"expected one offline run under {wandb_dir}, found {[r['dir'] for r in runs]}"
    return runs[0]


def read_offline_runs(wandb_dir: Path) -> list[dict[str, Any]]:
    """Every offline run under ``wandb_dir``: its folder, run record, final summary (nested keys as nested
    dicts), history rows and metric definitions.

    ``run.finish()`` can return before wandb's service has flushed the ``.wandb`` file (seen here about one run in
    five: the file still held only its 7-byte header); ``wandb.teardown()`` waits for the service to close it."""
    import wandb

    wandb.teardown()
    return [_read_run(folder) for folder in sorted((wandb_dir / "wandb").glob("offline-run-*"))]


def _read_run(folder: Path) -> dict[str, Any]:
    logs = list(folder.glob("run-*.wandb"))
    assert len(logs) == 1, f"no .wandb file in {folder}"
    run, summary, history, metrics = None, {}, [], {}
    for record in _records(logs[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "summary":
            for item in record.summary.update:
                path = list(item.nested_key) or [item.key]
                node = summary
                for part in path[:-1]:
                    node = node.setdefault(part, {})
                node[path[-1]] = json.loads(item.value_json)
        elif kind == "history":
            history.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif kind == "metric":
            metrics[record.metric.name] = record.metric
    assert run is not None, "no run record"
    return {
        "dir": folder,
        "run": run,
        "summary": summary,
        "history": history,
        "metrics": metrics,
        "config": {i.key: json.loads(i.value_json) for i in run.config.update},
    }


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb offline, every folder it writes under ``tmp_path``; wandb's process state (it reads its environment
    once per process) is torn down before and after. Returns ``WANDB_DIR``."""
    import wandb

    root = tmp_path / "wandb_dir"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for name in ("CACHE", "CONFIG", "DATA", "ARTIFACT"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    wandb.teardown()
    yield root
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()


def test_offline_run_records_a_curve_metrics_and_a_table(wandb_env: Path):
    history = [
        {"iteration": i, "seconds": torch.tensor(1.5 * i), "fvu": np.float32(1 / (i + 1)), "l0": 4} for i in range(3)
    ]
    rows = [
        {"sae": "dictionary", "fvu": torch.tensor(0.25), "l0": np.int64(32)},
        {"sae": "topk", "fvu": 0.3, "extra": {"dead": 2}},
    ]
    cfg = TrackingConfig(enabled=True, tags=["unit"])
    with open_tracker(
        cfg,
        name="fit-test",
        job_type="fit",
        config={"k": np.int64(4), "lr": torch.tensor(0.5), "path": Path("/x")},
        default_group="tiny/multirun-1",
        tags=["extra"],
    ) as tracker:
        assert tracker.active
        tracker.log_curve("fit", history, x="iteration")
        tracker.log_metrics("heldout", {"fvu": torch.tensor(0.125), "nested": {"l0": np.float64(3.5)}, "none": None})
        tracker.log_table("summary", rows)
    assert not tracker.active and tracker.failures == 0

    out = read_offline_run(wandb_env)
    run, summary = out["run"], out["summary"]
    assert (run.project, run.run_group, run.job_type, run.display_name) == (
        "dbksvd-pipeline",
        "tiny/multirun-1",
        "fit",
        "fit-test",
    )
    assert list(run.tags) == ["unit", "extra"]
    assert {k: out["config"][k] for k in ("k", "lr", "path")} == {"k": 4, "lr": 0.5, "path": "/x"}
    # the curve: one history row per point, plotted against fit/iteration
    curve = [row for row in out["history"] if "fit/iteration" in row]
    assert [r["fit/iteration"] for r in curve] == [0, 1, 2]
    assert [r["fit/seconds"] for r in curve] == [0.0, 1.5, 3.0]
    assert curve[-1]["fit/fvu"] == pytest.approx(1 / 3)
    assert out["metrics"]["fit/fvu"].step_metric == "fit/iteration"
    assert out["metrics"]["fit/seconds"].step_metric == "fit/iteration"
    assert summary["fit/iteration"] == 2 and summary["fit/fvu"] == pytest.approx(1 / 3) and summary["fit/l0"] == 4
    # metrics: flattened, converted, None skipped
    assert summary["heldout/fvu"] == 0.125 and summary["heldout/nested/l0"] == 3.5
    assert "heldout/none" not in summary
    # the table: a table file under files/, columns in first-seen order, nested cells as JSON text
    assert summary["summary"]["_type"] == "table-file"
    table = json.loads((out["dir"] / "files" / summary["summary"]["path"]).read_text())
    assert table["columns"] == ["sae", "fvu", "l0", "extra"]
    assert table["data"] == [["dictionary", 0.25, 32, None], ["topk", 0.3, None, '{"dead": 2}']]


def test_sae_lens_trainer_logs_into_the_tracker_run(wandb_env: Path, tmp_path: Path):
    from sae_lens.config import LoggingConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from pipeline.baselines.config import BaselineSpec
    from pipeline.baselines.lens import build_training_sae, trainer_config

    steps, batch, d_in, width, k = 20, 32, 16, 32, 4
    spec = BaselineSpec(architecture="topk", batch_size=batch)
    torch.manual_seed(0)
    data = torch.randn(steps * batch, d_in)
    cfg = TrackingConfig(enabled=True, mode="offline", dir=str(tmp_path / "explicit"), group="explicit-group")
    with open_tracker(cfg, name="baseline-topk", job_type="baseline", default_group="ignored") as tracker:
        kwargs = sae_lens_logging(tracker, log_every=5)
        assert kwargs["log_to_wandb"] is True and kwargs["wandb_log_frequency"] == 5
        trainer_cfg = trainer_config(spec, steps * batch, 0, 1000, "cpu")
        trainer_cfg.logger = LoggingConfig(**kwargs)
        sae = build_training_sae(spec, d_in, width, k, 0, "cpu")
        trainer = SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(data.split(batch)))
        trainer.fit()
        assert trainer.n_training_steps == steps
        tracker.log_metrics("heldout", {"fvu": 0.5})  # after fit(): above sae-lens's last step, so kept
    assert tracker.failures == 0
    assert not (wandb_env / "wandb").exists(), "cfg.dir must win over WANDB_DIR"

    out = read_offline_run(tmp_path / "explicit")
    assert (out["run"].run_group, out["run"].job_type) == ("explicit-group", "baseline")
    logged = [row for row in out["history"] if "losses/mse_loss" in row]
    assert [row["_step"] for row in logged] == [4, 9, 14, 19]  # every 5th step, at sae-lens's own step numbers
    summary = out["summary"]
    for key in (
        "losses/mse_loss",
        "losses/overall_loss",
        "losses/auxiliary_reconstruction_loss",
        "metrics/explained_variance",
        "metrics/l0",
        "sparsity/dead_features",
        "details/current_learning_rate",
    ):
        assert isinstance(summary.get(key), (int, float)), f"{key} missing from the summary: {sorted(summary)}"
    assert summary["metrics/l0"] == pytest.approx(k)
    assert summary["details/n_training_samples"] == steps * batch
    assert summary["heldout/fvu"] == 0.5


def test_sae_lens_logging_is_off_without_a_live_run():
    from sae_lens.config import LoggingConfig

    off = sae_lens_logging(open_tracker(TrackingConfig(), name="x", job_type="baseline"))
    assert off == {"log_to_wandb": False, "eval_every_n_wandb_logs": NEVER}
    assert LoggingConfig(**off).log_to_wandb is False
    with pytest.raises(ValueError, match="log_every"):
        sae_lens_logging(Tracker(), log_every=0)


def test_disabled_tracking_writes_nothing_and_never_imports_wandb(tmp_path: Path):
    script = textwrap.dedent("""
        import json, sys
        from pipeline.utils.tracking import TrackingConfig, open_tracker, sae_lens_logging
        imported_by_module = "wandb" in sys.modules
        for cfg in (TrackingConfig(), TrackingConfig(enabled=True, mode="disabled")):
            with open_tracker(cfg, name="n", job_type="fit", config={"a": 1}) as tracker:
                tracker.log_curve("fit", [{"iteration": 0, "fvu": 1.0}], x="iteration")
                tracker.log_metrics("m", {"x": 1})
                tracker.log_table("t", [{"a": 1}])
                kwargs = sae_lens_logging(tracker)
        print(json.dumps({"by_module": imported_by_module, "after": "wandb" in sys.modules,
                          "active": tracker.active, "log_to_wandb": kwargs["log_to_wandb"]}))
    """)
    work = tmp_path / "cwd"
    work.mkdir()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(work),
        "HOME": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"by_module": False, "after": False, "active": False, "log_to_wandb": False}
    assert list(work.iterdir()) == []


def test_missing_wandb_falls_back_to_a_no_op(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING, logger="pipeline.utils.tracking"):
        tracker = open_tracker(TrackingConfig(enabled=True, mode="offline"), name="n", job_type="fit")
    assert not tracker.active
    assert "cannot be imported" in caplog.text
    tracker.log_metrics("m", {"x": 1})
    tracker.log_table("t", [{"a": 1}])
    tracker.finish()


def test_init_failure_falls_back_to_a_no_op(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    import wandb

    def boom(**kwargs: Any) -> None:
        raise RuntimeError("api_key not configured")

    monkeypatch.setattr(wandb, "init", boom)
    with caplog.at_level(logging.WARNING, logger="pipeline.utils.tracking"):
        with open_tracker(TrackingConfig(enabled=True), name="n", job_type="fit") as tracker:
            tracker.log_curve("fit", [{"iteration": 0, "fvu": 1.0}], x="iteration")
    assert not tracker.active
    assert "wandb.init failed" in caplog.text and "api_key not configured" in caplog.text


class _BrokenRun:
    """A run whose logging fails: the tracker warns once, skips the calls and still finishes the run."""

    def __init__(self) -> None:
        self.finished: list[int | None] = []

    def log(self, row: dict[str, Any]) -> None:
        raise OSError("service gone")

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    def finish(self, exit_code: int | None = None) -> None:
        self.finished.append(exit_code)


def test_a_failing_call_is_skipped_with_one_warning(caplog: pytest.LogCaptureFixture):
    run = _BrokenRun()
    with caplog.at_level(logging.WARNING, logger="pipeline.utils.tracking"):
        with pytest.raises(KeyError):
            with Tracker(run) as tracker:
                tracker.log_metrics("m", {"x": 1})
                tracker.log_curve("fit", [{"fvu": 1.0}], x="iteration")  # no x value: refused, not raised
                tracker.log_metrics("m", {"x": 2})
                raise KeyError("the pipeline's own error propagates")
    assert tracker.failures == 3
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert "service gone" in caplog.text
    assert run.finished == [1] and not tracker.active
    tracker.finish()  # idempotent
    assert run.finished == [1]


def test_mode_is_validated_naming_the_key():
    with pytest.raises(ValueError, match=r"wandb\.mode .*'onlin'"):
        TrackingConfig(enabled=True, mode="onlin")
    with pytest.raises(ValueError, match=r"wandb\.mode"):
        typed_node({"enabled": True, "mode": "bogus"}, TrackingConfig, "wandb")
    cfg = typed_node({"enabled": True, "mode": "offline", "tags": ["a"], "group": "g"}, TrackingConfig, "wandb")
    assert cfg == TrackingConfig(enabled=True, mode="offline", tags=["a"], group="g")
    assert cfg.active and not TrackingConfig().active and not TrackingConfig(enabled=True, mode="disabled").active


def test_values_are_made_json_friendly():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"xs": [1, 2], "d": {"y": 3}})
    values = {
        "t": torch.tensor(2.5),
        "v": torch.arange(3),
        "n": np.float32(0.5),
        "i": np.int64(7),
        "b": np.bool_(True),
        "a": np.array([[1, 2]]),
        "p": Path("/tmp/x"),
        "nested": {"c": {"d": 1}},
        "skip": None,
        "node": node,
        "nan": float("nan"),
    }
    flat = flatten(values, "pre")
    assert set(flat) == {
        "pre/t",
        "pre/v",
        "pre/n",
        "pre/i",
        "pre/b",
        "pre/a",
        "pre/p",
        "pre/nested/c/d",
        "pre/node/xs",
        "pre/node/d/y",
        "pre/nan",
    }
    assert flat["pre/t"] == 2.5 and flat["pre/v"] == [0, 1, 2] and flat["pre/n"] == 0.5 and flat["pre/i"] == 7
    assert flat["pre/b"] is True and flat["pre/a"] == [[1, 2]] and flat["pre/p"] == "/tmp/x"
    assert flat["pre/node/xs"] == [1, 2] and flat["pre/node/d/y"] == 3
    assert json.loads(json.dumps({k: v for k, v in flat.items() if k != "pre/nan"})) == {
        k: v for k, v in flat.items() if k != "pre/nan"
    }
    assert all(type(v) in (bool, int, float, str, list) for v in flat.values())
    assert flatten({"a": 1}) == {"a": 1}
    assert plain({1: (np.int32(1), "s")}) == {"1": [1, "s"]}
