"""SAE baselines trained by sae-lens's own trainer: every architecture learns, saves as a plain sae-lens folder
that reloads identically, keeps its L0, and every budget mode is honoured."""

from __future__ import annotations

import contextlib
import json

import pytest
import sae_lens
import torch

from pipeline.baselines import (
    ARCHITECTURES,
    BaselineSpec,
    Budget,
    load_baseline,
    load_record,
    save_baseline,
    train_baseline,
)
from pipeline.baselines.io import CFG_FILE, RECORD_FILE, WEIGHTS_FILE
from pipeline.core.synthetic import planted_problem

D, WIDTH, K, BATCH = 16, 64, 4, 128
#: Per-architecture settings for a tiny problem: MP-SAE is slow per step (serial pursuit), and the docs'
#: L1 coefficient (5.0, for d_in = 1024) silences every latent at d_in = 16.
STEPS = {"matching_pursuit": 60}
EXTRA = {"standard": dict(l1_coefficient=0.05), "matryoshka_batchtopk": dict(matryoshka_widths=[16, 32, WIDTH])}


@pytest.fixture(scope="module")
def rows() -> tuple[torch.Tensor, torch.Tensor]:
    """Planted sparse rows plus a large common mean (as residual streams carry): 4096 train, 904 held-out."""
    p = planted_problem(d=D, n_atoms=48, k=3, n=5000, nonnegative=True, seed=0)
    Y = p.Y + 3 * torch.randn(D, generator=torch.Generator().manual_seed(1))
    return Y[:4096], Y[4096:]


def spec(architecture: str = "topk", **options) -> BaselineSpec:
    return BaselineSpec(
        architecture, **{"batch_size": BATCH, "lr": 1e-3, "device": "cpu", **EXTRA.get(architecture, {}), **options}
    )


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_learns_saves_and_reloads_with_plain_sae_lens(architecture, rows, tmp_path):
    train, heldout = rows
    steps = STEPS.get(architecture, 300)
    trained = train_baseline(train, D, WIDTH, K, spec(architecture), Budget("steps", steps=steps), heldout=heldout)
    rec = trained.record
    assert (rec.architecture, rec.width, rec.k, rec.d_in) == (architecture, WIDTH, K, D)
    assert rec.steps == steps and rec.samples == steps * BATCH
    assert rec.heldout_fvu < 1 and rec.heldout_fvu < rec.heldout_fvu_init, (rec.heldout_fvu, rec.heldout_fvu_init)
    assert rec.heldout_l0 > 0

    folder = save_baseline(trained, tmp_path / architecture)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILE, WEIGHTS_FILE, RECORD_FILE])
    assert [p.name for p in tmp_path.iterdir()] == [architecture]  # no temporary sibling left behind
    reloaded = sae_lens.SAE.load_from_disk(str(folder))
    assert type(reloaded) is type(trained.sae)
    x = heldout[:200]
    with torch.no_grad():
        acts = trained.sae.encode(x)
        torch.testing.assert_close(reloaded.encode(x), acts, rtol=0, atol=0)
        torch.testing.assert_close(reloaded.decode(acts), trained.sae.decode(acts), rtol=0, atol=0)
    assert load_record(folder)["heldout_fvu"] == pytest.approx(rec.heldout_fvu)
    assert type(load_baseline(folder)) is type(reloaded)

    l0 = (acts != 0).sum(-1).float()
    if architecture == "topk":
        assert int(l0.max()) <= K and float(l0.mean()) > K - 0.1
    if architecture in ("batchtopk", "matryoshka_batchtopk"):
        with torch.no_grad():  # training form: exactly k active per sample on average over the batch
            batch_l0 = (trained.training_sae.encode(x) != 0).sum(-1).float().mean()
        assert float(batch_l0) == pytest.approx(K, abs=0.05)
        # inference form (JumpReLU with the learned global threshold): near k, the threshold being an average
        assert K / 2 <= float(l0.mean()) <= 2 * K
    if architecture == "matching_pursuit":
        assert int(l0.max()) <= K  # max_iterations = k


def test_samples_budget_rounds_down_to_whole_batches(rows):
    trained = train_baseline(rows[0], D, WIDTH, K, spec(), Budget("samples", samples=1000))
    assert (trained.record.steps, trained.record.samples) == (1000 // BATCH, 1000 // BATCH * BATCH)
    tiny = train_baseline(rows[0], D, WIDTH, K, spec(), Budget("samples", samples=10))
    assert (tiny.record.steps, tiny.record.samples) == (1, BATCH)  # at least one batch


def test_time_budget_stops_cleanly_and_fit_still_finishes(rows, monkeypatch):
    """A time budget ends fit() through its own loop, at the first step whose check finds the budget spent (and
    no other), so its end-of-training work runs: the normalisation factor is folded into the weights (cfg back
    to "none") and the final L0 metadata is set. The training clock is :class:`_TickingClock`: on the wall clock
    a loaded machine could take one slow step from before the lr's decay window to past the budget, and the last
    lr would not have decayed; this way the steps, and where the decay starts, depend on the code alone."""
    from pipeline.baselines import control as control_module
    from pipeline.baselines import train as train_module

    monkeypatch.setattr(train_module, "_Clock", _TickingClock)
    decisions: list[bool] = []
    original = control_module.RunControl.after_step

    def spying_after_step(self, trainer):
        decisions.append(bool(original(self, trainer)))
        return decisions[-1]

    monkeypatch.setattr(control_module.RunControl, "after_step", spying_after_step)
    trained = train_baseline(
        rows[0],
        D,
        WIDTH,
        K,
        spec("topk", normalize_activations="expected_average_only_in"),
        Budget("time", seconds=2.0),
        heldout=rows[1],
    )
    rec = trained.record
    assert rec.steps >= 1 and rec.samples == rec.steps * BATCH
    assert decisions[-1] and not any(decisions[:-1]) and len(decisions) == rec.steps
    assert rec.seconds >= 2.0 and rec.stop_reason == "budget"
    assert trained.training_sae.cfg.normalize_activations == "none"
    assert trained.sae.cfg.normalize_activations == "none"
    assert trained.training_sae.cfg.metadata.l0 == pytest.approx(K, abs=0.01)
    assert rec.heldout_fvu < rec.heldout_fvu_init
    # the lr decays over the last 20% of the seconds (its shape: the next test), so the last step's is lower
    lrs = [p["lr"] for p in rec.heldout_curve]
    assert rec.lr_decay_steps == 0 and rec.final_lr < 1e-3 and lrs == sorted(lrs, reverse=True)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def paused(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _TickingClock(_FakeClock):
    """A training clock :data:`TICK` seconds later each time it is read (``paused`` changes nothing)."""

    def __call__(self) -> float:
        self.now += TICK
        return self.now


#: Seconds :class:`_TickingClock` moves per read: a 2-second budget is some tens of steps.
TICK = 0.02


def test_time_budget_lr_follows_the_elapsed_share_of_the_seconds():
    """Constant at the spec's lr, then linear to 0 over the last 20% of the seconds; warm-up as sae-lens's
    LinearLR (1/w at step 0, full from step w − 1)."""
    from pipeline.baselines.control import RunControl

    clock = _FakeClock()
    control = RunControl(BaselineSpec(lr_warm_up_steps=4), Budget("time", seconds=100.0), clock, None)
    expected = {0.0: 1.0, 50.0: 1.0, 80.0: 1.0, 90.0: 0.5, 95.0: 0.25, 100.0: 0.0, 120.0: 0.0}
    for t, factor in expected.items():
        clock.now = t
        assert control.lr_factor(10) == pytest.approx(factor)
    clock.now = 0.0
    assert [control.lr_factor(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    steps = RunControl(BaselineSpec(), Budget("steps", steps=10), clock, None)
    assert steps.lr_factor(3) is None  # sae-lens's own scheduler places the decay


def test_plateau_budget_stops_at_the_plateau_then_decays_the_lr(rows):
    """The held-out curve is measured on the log grid; once it improves by < threshold per doubling of samples
    the lr decays over a quarter of the steps so far (20% of the run) and the run ends; the record's last curve
    point is the final SAE's held-out FVU."""
    budget = Budget("plateau", samples=2**17, threshold=0.1, min_samples=2**12)
    rec = train_baseline(rows[0], D, WIDTH, K, spec(lr=1e-2), budget, heldout=rows[1]).record
    assert rec.stop_reason == "plateau" and rec.flattened is True
    assert rec.improvement_per_doubling is not None and rec.improvement_per_doubling < 0.1
    start = rec.decay_start_step
    assert rec.steps == start + -(-start // 4) and rec.samples < 2**22
    steps = [p["steps"] for p in rec.heldout_curve]
    assert steps == sorted(steps) and steps[:4] == [1, 2, 3, 4] and steps[-1] == rec.steps
    assert rec.heldout_curve[-1]["fvu"] == rec.heldout_fvu and rec.heldout_curve[-1]["lr"] == rec.final_lr
    assert all(p["lr"] == pytest.approx(1e-2) for p in rec.heldout_curve if p["steps"] <= start)
    assert rec.final_lr == pytest.approx(1e-2 / (rec.steps - start))  # sae-lens's last decay step: lr / n
    with pytest.raises(ValueError, match="heldout"):
        train_baseline(rows[0], D, WIDTH, K, spec(), budget)


class _FakeTrainer:
    """What :meth:`RunControl.after_step` reads of sae-lens's trainer."""

    def __init__(self, batch: int) -> None:
        self.n_training_steps, self.n_training_samples, self.batch = 0, 0, batch

    def step(self) -> None:
        self.n_training_steps += 1
        self.n_training_samples += self.batch


@pytest.mark.parametrize(
    ("l0_of", "flat"),
    [
        (lambda s: 32.0, True),  # L0 fixed (TopK): flat FVU is a plateau
        (lambda s: 32.0 * (1 + 1e-3 * (s % 2)), True),  # L0 jitters well under 5% per doubling
        (lambda s: 4000.0 / s**0.5, False),  # L0 still falling ~29% per doubling (JumpReLU early on)
    ],
)
def test_plateau_rule_needs_fvu_flat_and_l0_settled(l0_of, flat):
    """FVU flat from the start; the rule fires only where L0 has settled too (an L0-penalised SAE whose FVU
    stalls or rises while L0 falls has not reached its plateau). On the old rule (FVU only) every case fired."""
    from pipeline.baselines.control import STOP_PLATEAU, RunControl

    budget = Budget("plateau", samples=2**20, threshold=0.01, min_samples=2**12, l0_threshold=0.05)
    trainer = _FakeTrainer(BATCH)
    control = RunControl(BaselineSpec(), budget, _FakeClock(), lambda tr: (0.2, l0_of(tr.n_training_steps + 1)))
    while control.decay_start_step is None and trainer.n_training_samples < 2**19:
        control.after_step(trainer)
        trainer.step()
    assert (control.stop_reason == STOP_PLATEAU) is flat
    summary = control.summary()
    assert summary["flattened"] is flat and summary["improvement_per_doubling"] == pytest.approx(0.0)
    if not flat:
        assert summary["l0_change_per_doubling"] < -0.05
    with pytest.raises(ValueError, match="l0_threshold"):
        Budget("plateau", samples=2**20, l0_threshold=-1.0)


def test_plateau_budget_stops_at_its_cap_and_says_the_curve_had_not_flattened(rows):
    budget = Budget("plateau", samples=40 * BATCH, threshold=0.0, min_samples=0)
    rec = train_baseline(rows[0], D, WIDTH, K, spec(), budget, heldout=rows[1]).record
    assert rec.stop_reason == "cap_samples" and rec.flattened is False
    assert rec.samples == 40 * BATCH and rec.decay_start_step == 32  # decay over the last 20% of the cap


def test_dead_window_is_scaled_to_the_run_so_that_auxk_acts(rows):
    """sae-lens's default window (1,000 steps) is longer than a short run; ours is a share of it, so latents
    that stop firing are handed to AuxK within the run."""
    rec = train_baseline(rows[0], D, WIDTH, K, spec(), Budget("steps", steps=200), heldout=rows[1]).record
    assert rec.dead_window_steps == round(0.25 * 200)  # the floor (16,384 samples) capped at a quarter of the run
    assert rec.dead_mask_steps > 0
    assert BaselineSpec().dead_window_samples_for(10**8) == 4096 * 1000  # sae-lens's own window, at most
    assert BaselineSpec().dead_window_samples_for(10**7) == 0.05 * 10**7


def test_schedule_fractions_need_a_known_step_count(rows):
    rec = train_baseline(rows[0], D, WIDTH, K, spec(), Budget("steps", steps=50)).record
    assert rec.lr_decay_steps == 10 and rec.final_lr == pytest.approx(1e-3 / 10)  # lr / n at the last decay step
    with pytest.raises(ValueError, match="does not know in advance"):
        train_baseline(rows[0], D, WIDTH, K, spec("standard", sparsity_warm_up_fraction=0.1), Budget("time", seconds=1))


def test_streamed_batches_are_rebatched_across_epochs(rows):
    """Uneven batches (a re-iterable, like an ActivationLoader) become full batches, cycling epochs."""
    batches = [rows[0][i : i + 100] for i in range(0, 4096, 100)]  # 41 batches, the last of 96 rows
    rec = train_baseline(batches, D, WIDTH, K, spec(), Budget("steps", steps=77), heldout=rows[1]).record
    assert (rec.steps, rec.samples) == (77, 77 * BATCH)  # 9856 rows: more than two epochs
    assert rec.heldout_fvu < rec.heldout_fvu_init
    with pytest.raises(ValueError, match="one-shot iterator"):
        train_baseline(iter(batches), D, WIDTH, K, spec(), Budget("steps", steps=77))
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        train_baseline(rows[0][:, :8], D, WIDTH, K, spec(), Budget("steps", steps=1))


def test_trains_from_an_activation_store_loader(rows, tmp_path):
    """The stage's data path: a store's shuffled loader (a re-iterable of batches) and its held-out split."""
    import numpy as np

    from pipeline.data.store import ActivationStore
    from pipeline.data.store_writer import import_array

    np.save(tmp_path / "rows.npy", torch.cat(rows).numpy())
    store = ActivationStore(
        import_array(tmp_path / "rows.npy", tmp_path / "store", shard_rows=512, heldout_fraction=0.1)
    )
    loader = store.loader(100, seed=0)
    rec = train_baseline(loader, D, WIDTH, K, spec(), Budget("steps", steps=100), heldout=store.heldout()).record
    assert (rec.steps, rec.samples) == (100, 100 * BATCH) and rec.samples > store.n_rows()  # several epochs
    assert rec.heldout_fvu < rec.heldout_fvu_init and rec.heldout_rows == store.n_rows("heldout")


def test_save_replaces_a_previous_folder_and_sets_metadata(rows, tmp_path):
    first = train_baseline(rows[0], D, WIDTH, K, spec(seed=1), Budget("steps", steps=3))
    second = train_baseline(rows[0], D, WIDTH, K, spec(seed=2), Budget("steps", steps=5))
    save_baseline(first, tmp_path / "sae")
    folder = save_baseline(second, tmp_path / "sae", metadata={"hook_name": "blocks.3.hook_resid_post"})
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]
    assert load_record(folder)["steps"] == 5
    cfg = json.loads((folder / CFG_FILE).read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    torch.testing.assert_close(load_baseline(folder).W_dec, second.sae.W_dec.detach())


def test_trains_when_the_caller_switched_autograd_off(rows):
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        assert train_baseline(rows[0], D, WIDTH, K, spec(), Budget("steps", steps=3)).record.steps == 3
    finally:
        torch.set_grad_enabled(previous)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: BaselineSpec("gated"), "architecture"),
        (lambda: BaselineSpec(lr_decay_fraction=1.0), r"\[0, 1\)"),
        (lambda: BaselineSpec(normalize_activations="layer_norm"), "normalize_activations"),
        (lambda: Budget("time"), "seconds"),
        (lambda: Budget("epochs", steps=3), "budget mode"),
        (lambda: BaselineSpec("matryoshka_batchtopk", matryoshka_widths=[32, 16]).widths(64), "strictly increasing"),
    ],
)
def test_bad_settings_fail_early_with_a_message(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_reserved_options_cannot_be_overridden(rows):
    with pytest.raises(ValueError, match="may not set"):
        train_baseline(rows[0], D, WIDTH, K, spec(trainer_options={"lr": 1.0}), Budget("steps", steps=1))


def test_default_matryoshka_widths_double_from_2_to_the_8():
    assert BaselineSpec("matryoshka_batchtopk").widths(2048) == [256, 512, 1024, 2048]
    assert BaselineSpec("matryoshka_batchtopk").widths(3000) == [256, 512, 1024, 2048, 3000]


def test_our_sae_lens_filenames_are_sae_lens_own():
    from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME

    assert (CFG_FILE, WEIGHTS_FILE) == (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME)


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_is_evaluated_by_saebench_as_a_plain_sae_lens_folder(architecture, eval_inputs, tmp_path):
    """Trained on the tiny store's rows, saved, loaded back the way the evaluate stage loads it (plain
    ``SAE.load_from_disk``), and scored by SAEBench's core: the result file exists and its L0 is the SAE's."""
    from datasets import Dataset

    from pipeline.data.store import ActivationStore
    from pipeline.evals.metrics.core import run_core
    from pipeline.evals.sae_records import baseline_record
    from tests.evals.test_core_positions import N_CONTEXTS, _contexts, _core_config

    store = ActivationStore(eval_inputs["store"])
    Y = store.load_all()
    width, k = 32, 4
    trained = train_baseline(
        Y,
        store.d,
        width,
        k,
        spec(architecture, **({"matryoshka_widths": [16, width]} if architecture == "matryoshka_batchtopk" else {})),
        Budget("steps", steps=STEPS.get(architecture, 40) // 2),
        heldout=store.heldout(),
    )
    folder = save_baseline(trained, tmp_path / architecture, {"model_name": "tiny-local", "hook_name": store.hook})
    record = baseline_record(
        architecture, folder, device="cpu", context_size=store.manifest["context_length"], prepend_bos=True
    )
    assert record.description["architecture"] == architecture
    assert record.description["budget"]["steps"] == trained.record.steps
    path = tmp_path / "core.json"
    model = eval_inputs["model"]
    run_core(
        record, model, path, _core_config(), Dataset.from_dict({"tokens": _contexts(model, True, N_CONTEXTS)}), "cpu"
    )
    result = json.loads(path.read_text())
    assert result["sae_cfg_dict"]["d_sae"] == width
    l0 = result["eval_result_metrics"]["sparsity"]["l0"]
    if architecture in ("topk", "matching_pursuit"):
        assert 0 < l0 <= k + 1e-6
    else:
        assert l0 > 0  # BatchTopK / Matryoshka / JumpReLU thresholds and the L1 SAE's L0 only approach k
    assert result["eval_result_metrics"]["model_performance_preservation"]["ce_loss_score"] is not None
