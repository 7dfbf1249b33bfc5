"""DB-KSVD learner: planted recovery, Matryoshka, resume, determinism, schedules and bad input."""

import pytest
import torch

from pipeline.core.coders import encode
from pipeline.core.learner import PAPER_SCHEDULE, learn_dictionary
from pipeline.core.matryoshka import Group, matryoshka_groups, total_budget
from pipeline.core.synthetic import planted_problem, recovered_fraction


def pca_fvu(Y, rank):
    """FVU of the best rank-``rank`` affine approximation of Y (PCA, float64 SVD): the reference a k-sparse
    dictionary must beat, as it spends the same number of coefficients per sample."""
    s = torch.linalg.svdvals((Y - Y.mean(0)).double())
    return float(s[rank:].pow(2).sum() / s.pow(2).sum())


def sparse_fvu(Y, atoms, k):
    """FVU of ``k``-sparse codes of Y over ``atoms`` (the default coder)."""
    return float((Y - encode(Y, atoms, k).decode(atoms)).pow(2).sum() / (Y - Y.mean(0)).pow(2).sum())


def initial_dictionary(data, n_atoms, k, **opts):
    """The dictionary a fit starts from: the same call stopped before its first iteration."""
    D0 = learn_dictionary(data, n_atoms, k, **{**opts, "max_iters": 0, "epochs": None})
    assert D0.metadata["iterations"] == 0 and D0.history == []
    return D0


@pytest.mark.parametrize("nonnegative", [True, False])
def test_planted_recovery_with_default_options(nonnegative):
    """Aharon, Elad & Bruckstein (2006): d=20, K=50, k=3, n=1500, 20 dB; >= 90% of atoms at |cos| > 0.99."""
    scores = []
    for seed in range(3):
        p = planted_problem(nonnegative=nonnegative, seed=seed)
        D = learn_dictionary(p.Y, 50, 3, nonnegative=nonnegative, seed=seed, progress=False)
        scores.append(recovered_fraction(p.D, D.atoms))
    assert sum(scores) / 3 >= 0.90, scores


def test_history_and_dictionary_contents():
    p = planted_problem(seed=0)
    opts = dict(max_iters=5, tol=None, progress=False, atom_batch_size=1)
    D = learn_dictionary(p.Y, 50, 3, **opts)
    assert len(D.history) == 5
    from pipeline.core.learner import HISTORY_FIELDS

    # every recorded field is documented, and no more (held-out FVU only when held-out rows are given)
    assert set(D.history[-1]) == set(HISTORY_FIELDS) - {"heldout_fvu"}
    # the update can only remove coefficients (non-negative refits), never add them
    assert all(rec["l0_after_update"] <= rec["l0"] + 1e-9 for rec in D.history)
    # atom batch 1 is sequential K-SVD: on the iteration's fixed supports the update never raises the error
    for rec in D.history:
        assert rec["fvu_after_update"] <= rec["fvu"] * (1 + 1e-6), rec
    # the first record is the initial dictionary's FVU; 5 iterations cut it by a quarter or more (0.39 -> 0.25)
    start = initial_dictionary(p.Y, 50, 3, **opts).fvu(p.Y)
    assert D.history[0]["fvu"] == pytest.approx(start, rel=1e-4)
    assert D.fvu(p.Y) < 0.75 * start
    assert D.fvu(p.Y) < 0.5 * pca_fvu(p.Y, 3)  # 3-sparse over 50 atoms vs the best 3-dim subspace (0.67)
    torch.testing.assert_close(D.atoms.norm(dim=1), torch.ones(50))
    assert D.coder.k == 3 and D.metadata["stop_reason"].startswith("max_iters")


def test_matryoshka_with_3000_atoms():
    p = planted_problem(d=48, n_atoms=400, k=6, n=4000, seed=0)
    groups = matryoshka_groups(3000, 6, 8)
    assert [(g.start, g.end) for g in groups] == [(0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 3000)]
    assert all(g.budget == 2 for g in groups)
    opts = dict(matryoshka=8, max_iters=3, tol=None, progress=False)
    D = learn_dictionary(p.Y, 3000, 6, **opts)
    assert D.groups == groups
    codes = D.encode(p.Y[:500])
    assert codes.k == total_budget(groups) == 10
    for slot, g in enumerate(groups):  # slots 2g, 2g+1 belong to group g
        used = codes.values[:, 2 * slot : 2 * slot + 2] != 0
        ids = codes.indices[:, 2 * slot : 2 * slot + 2][used]
        assert bool(((ids >= g.start) & (ids < g.end)).all())
    Y = p.Y[:500]
    D0 = initial_dictionary(p.Y, 3000, 6, **opts)
    assert D.fvu(Y) < 0.75 * D0.fvu(Y)  # 0.11 -> 0.06
    assert D.fvu(Y) < 0.2 * pca_fvu(Y, 6)  # the best 6-dim subspace leaves 0.77
    # the first group alone (256 atoms, 2 per sample) is a dictionary in its own right (nested structure):
    # better than the best 2-dim subspace (0.92) and than the first group it started from (0.63)
    first = sparse_fvu(Y, D.atoms[:256], 2)
    assert first < 0.7 * pca_fvu(Y, 2)
    assert first < sparse_fvu(Y, D0.atoms[:256], 2) - 0.05


def test_groups_for_any_k_and_width():
    g = matryoshka_groups(4096, 20, 8)
    assert g == [Group(0, 256, 4), Group(256, 512, 4), Group(512, 1024, 4), Group(1024, 2048, 4), Group(2048, 4096, 4)]
    g = matryoshka_groups(16384, 3, 8)  # 7 groups from 2^8 are too many for k=3: the smallest grows to 2^12
    assert g == [Group(0, 4096, 1), Group(4096, 8192, 1), Group(8192, 16384, 1)]
    g = matryoshka_groups(300, 7, 8)  # 2 groups: ceil(7/2) = 4 atoms each, the total slightly exceeds k
    assert g == [Group(0, 256, 4), Group(256, 300, 4)] and total_budget(g) == 8


@pytest.mark.parametrize("batch_size", [1500, 500])
def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, batch_size):
    p = planted_problem(seed=4)
    opts = dict(max_iters=8, tol=None, progress=False, batch_size=batch_size, seed=3)
    full = learn_dictionary(p.Y, 50, 3, **opts)

    class Killed(Exception):
        pass

    def kill_at_5(it, rec, D):
        if it == 5:
            raise Killed

    ckpt = tmp_path / "fit.ckpt"
    with pytest.raises(Killed):
        learn_dictionary(p.Y, 50, 3, checkpoint_path=str(ckpt), checkpoint_every=2, callback=kill_at_5, **opts)
    assert ckpt.exists()
    resumed = learn_dictionary(p.Y, 50, 3, checkpoint_path=str(ckpt), resume=True, **opts)
    assert torch.equal(resumed.atoms, full.atoms)
    assert [h["fvu"] for h in resumed.history] == [h["fvu"] for h in full.history]


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    p = planted_problem(seed=0)
    ckpt = str(tmp_path / "fit.ckpt")
    learn_dictionary(p.Y, 50, 3, max_iters=2, tol=None, progress=False, checkpoint_path=ckpt)
    with pytest.raises(ValueError, match="different settings"):
        learn_dictionary(p.Y, 50, 4, max_iters=2, tol=None, progress=False, checkpoint_path=ckpt, resume=True)


def test_checkpoint_round_trip_loads_as_plain_tensors(tmp_path):
    """A real checkpoint (atoms, centre, history, generator state, settings) loads with torch.load's
    weights_only=True, the generator's state intact: the resumed fit draws the same numbers."""
    from dataclasses import replace

    from pipeline.core.checkpoint import load_checkpoint
    from pipeline.core.learner_config import LearnerConfig

    p = planted_problem(seed=2)
    ckpt = tmp_path / "fit.ckpt"
    opts = dict(max_iters=3, tol=None, progress=False, center=True, checkpoint_every=1, seed=5)
    fitted = learn_dictionary(p.Y, 50, 3, checkpoint_path=str(ckpt), **opts)
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # plain tensors and types only
    cfg = replace(LearnerConfig.from_options(50, 3, **opts), checkpoint_path=str(ckpt))
    state = load_checkpoint(cfg, torch.device("cpu"))
    assert state["iteration"] == raw["iteration"] == 3 and state["history"] == fitted.history
    assert torch.equal(state["atoms"], fitted.atoms.cpu()) and state["centre"] is not None
    g = torch.Generator()
    g.set_state(state["generator"])
    h = torch.Generator()
    h.set_state(raw["generator"])
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=h))


class _Planted:
    """Pickled into a checkpoint, it would run code on load (what weights_only=False allows)."""

    ran = False

    def __reduce__(self):
        return (_Planted._run, ())

    @staticmethod
    def _run():
        _Planted.ran = True
        return {}


def test_a_checkpoint_holding_code_is_refused(tmp_path):
    import pickle

    from pipeline.core.checkpoint import load_checkpoint
    from pipeline.core.learner_config import LearnerConfig

    ckpt = tmp_path / "fit.ckpt"
    torch.save({"atoms": torch.zeros(2, 2), "history": [_Planted()]}, ckpt)
    _Planted.ran = False
    cfg = LearnerConfig.from_options(2, 1, checkpoint_path=str(ckpt))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(cfg, torch.device("cpu"))
    assert not _Planted.ran


def test_deterministic_for_a_seed():
    p = planted_problem(seed=5)
    a = learn_dictionary(p.Y, 50, 3, max_iters=4, tol=None, progress=False, seed=7)
    b = learn_dictionary(p.Y, 50, 3, max_iters=4, tol=None, progress=False, seed=7)
    assert torch.equal(a.atoms, b.atoms)


def test_paper_schedule_on_an_iterable_with_centring():
    p = planted_problem(d=20, n_atoms=50, k=3, n=3000, seed=6)
    Y = p.Y + 5.0  # a large mean direction, as in real residual streams
    batches = [Y[i : i + 1000] for i in range(0, 3000, 1000)]
    opts = dict(PAPER_SCHEDULE, batch_size=1000, center=True)
    D = learn_dictionary(batches, 50, 3, progress=False, **opts)
    assert len(D.history) == 9  # 3 batches x 3 epochs, one update each
    assert D.centre is not None and float((D.centre - Y[:1000].mean(0)).abs().max()) < 1e-4
    # 9 updates from the reference's uniform init: FVU 0.52 -> 0.25; the best 3-dim subspace leaves 0.66
    assert D.fvu(Y) < 0.6 * initial_dictionary(batches, 50, 3, progress=False, **opts).fvu(Y)
    assert D.fvu(Y) < 0.5 * pca_fvu(Y, 3)


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (torch.randn(40, 20), dict(n_atoms=50, k=3), "fewer than n_atoms"),
        (torch.randn(100, 20), dict(n_atoms=50, k=30), "exceeds the dimension"),
        (torch.randn(100, 20), dict(n_atoms=5, k=8), "smaller than k"),
        (torch.randn(100, 20), dict(n_atoms=50, k=0), "at least 1"),
        (torch.full((100, 20), float("nan")), dict(n_atoms=50, k=3), "NaN or Inf"),
        (torch.randn(100, 20, 2), dict(n_atoms=50, k=3), "must be 2-D"),
        (torch.randn(100, 20), dict(n_atoms=50, k=3, bogus=1), "unknown option"),
        (torch.randn(100, 20), dict(n_atoms=50, k=3, method="lasso"), "method"),
        ([torch.randn(100, 20), torch.randn(100, 21)], dict(n_atoms=50, k=3, max_iters=3), "d = 21"),
        (torch.randn(100, 20), dict(n_atoms=50, k=3, kernel="numba", rank1_solver="gram"), "coder.kernel = 'numba'"),
    ],
)
def test_bad_input_raises_clear_errors(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        learn_dictionary(data, progress=False, **kwargs)


def test_forced_compiled_loops_are_refused_before_coding_in_a_data_parallel_fit():
    """kernel='numba' in a data-parallel fit is refused with the fix named, before any batch is coded (the
    compiled update runs in one process); 'auto' fits."""
    from tests.core.ranks import run_ranks

    Y = planted_problem(seed=0).Y

    def fit(comm, kernel):
        try:
            return learn_dictionary(Y, 50, 3, process_group=comm, kernel=kernel, max_iters=1, tol=None, progress=False)
        except ValueError as err:
            return err

    errors = run_ranks(2, lambda comm: fit(comm, "numba"))
    assert all(
        isinstance(e, ValueError) and "a data-parallel fit" in str(e) and "kernel='auto'" in str(e) for e in errors
    )
    assert all(len(D.history) == 1 for D in run_ranks(2, lambda comm: fit(comm, "auto")))


def test_matryoshka_groups_get_atom_batches_scaled_to_their_size():
    from pipeline.core.learner import group_atom_batch
    from pipeline.core.matryoshka import matryoshka_groups

    groups = matryoshka_groups(2048, 32, 8)  # 256, 256, 512, 1024 atoms
    assert [group_atom_batch(16, g, 2048) for g in groups] == [2, 2, 4, 8]
    assert group_atom_batch(1, groups[0], 2048) == 1  # never below one atom
    p = planted_problem(seed=0)
    D = learn_dictionary(p.Y, 64, 4, matryoshka=4, max_iters=2, tol=None, progress=False, atom_batch_size=8)
    assert D.metadata["group_atom_batch_sizes"] == [2, 2, 4]  # groups of 16, 16, 32 atoms


def test_heldout_curve_on_the_log_grid_off_the_clock():
    """With held-out rows, their FVU is recorded after the log-grid iterations (1, 2, 3, 4, 6, 8, 11) and the
    last, equal to the finished dictionary's FVU on them at the last; the learner's clock leaves it out."""
    p = planted_problem(d=16, n_atoms=40, k=3, n=3000, nonnegative=True, seed=0)
    Y, H = p.Y[:2500], p.Y[2500:]
    D = learn_dictionary(Y, 40, 3, max_iters=12, batch_size=256, seed=0, heldout=H)
    marked = [h["iteration"] for h in D.history if "heldout_fvu" in h]
    assert marked == [1, 2, 3, 4, 6, 8, 11, 12]
    assert D.history[-1]["heldout_fvu"] == pytest.approx(D.fvu(H), rel=1e-6)
    fvus = [h["heldout_fvu"] for h in D.history if "heldout_fvu" in h]
    assert fvus[-1] < fvus[0]
    assert D.metadata["heldout_eval_seconds"] > 0
    plain = learn_dictionary(Y, 40, 3, max_iters=12, batch_size=256, seed=0)
    assert torch.equal(plain.atoms, D.atoms)  # measuring does not change the fit
