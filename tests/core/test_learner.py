"""DB-KSVD learner: planted recovery, Matryoshka, resume, determinism, schedules and bad input."""

import pytest
import torch

from pipeline.core.learner import PAPER_SCHEDULE, learn_dictionary
from pipeline.core.matryoshka import matryoshka_groups
from pipeline.core.synthetic import planted_problem, recovered_fraction


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
    D = learn_dictionary(p.Y, 50, 3, max_iters=5, tol=None, progress=False)
    assert len(D.history) == 5
    for key in ("fvu", "fvu_after_update", "l0", "dead_fraction", "seconds", "rank1_iters"):
        assert key in D.history[-1]
    assert D.history[-1]["fvu"] < D.history[0]["fvu"]
    torch.testing.assert_close(D.atoms.norm(dim=1), torch.ones(50))
    assert D.coder.k == 3 and D.metadata["stop_reason"].startswith("max_iters")


def test_matryoshka_with_3000_atoms():
    p = planted_problem(d=48, n_atoms=400, k=6, n=4000, seed=0)
    groups = matryoshka_groups(3000, 6, 8)
    assert [(g.start, g.end) for g in groups] == [(0, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 3000)]
    assert all(g.budget == 2 for g in groups)
    D = learn_dictionary(p.Y, 3000, 6, matryoshka=8, max_iters=3, tol=None, progress=False)
    assert D.groups == groups
    codes = D.encode(p.Y[:500])
    assert codes.k == 10
    for slot, g in enumerate(groups):  # slots 2g, 2g+1 belong to group g
        used = codes.values[:, 2 * slot:2 * slot + 2] != 0
        ids = codes.indices[:, 2 * slot:2 * slot + 2][used]
        assert bool(((ids >= g.start) & (ids < g.end)).all())
    assert D.history[-1]["fvu"] < D.history[0]["fvu"]
    # the first group alone already explains a good part of the variance (nested structure)
    first = D.atoms[:256]
    from pipeline.core.coders import encode
    c = encode(p.Y[:500], first, 2)
    assert float((p.Y[:500] - c.decode(first)).pow(2).sum() / (p.Y[:500] - p.Y[:500].mean(0)).pow(2).sum()) < 1


def test_groups_for_any_k_and_width():
    g = matryoshka_groups(4096, 20, 8)
    assert [x.end for x in g] == [256, 512, 1024, 2048, 4096] and g[0].budget == 4
    g = matryoshka_groups(16384, 3, 8)  # too many groups for k=3: the smallest group grows
    assert len(g) <= 3 and g[-1].end == 16384


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


def test_deterministic_for_a_seed():
    p = planted_problem(seed=5)
    a = learn_dictionary(p.Y, 50, 3, max_iters=4, tol=None, progress=False, seed=7)
    b = learn_dictionary(p.Y, 50, 3, max_iters=4, tol=None, progress=False, seed=7)
    assert torch.equal(a.atoms, b.atoms)


def test_paper_schedule_on_an_iterable_with_centring():
    p = planted_problem(d=20, n_atoms=50, k=3, n=3000, seed=6)
    Y = p.Y + 5.0  # a large mean direction, as in real residual streams
    batches = [Y[i:i + 1000] for i in range(0, 3000, 1000)]
    opts = dict(PAPER_SCHEDULE, batch_size=1000, center=True)
    D = learn_dictionary(batches, 50, 3, progress=False, **opts)
    assert len(D.history) == 9  # 3 batches x 3 epochs, one update each
    assert D.centre is not None and float((D.centre - Y[:1000].mean(0)).abs().max()) < 1e-4
    assert D.fvu(Y) < 1.0


@pytest.mark.parametrize("data, kwargs, message", [
    (torch.randn(40, 20), dict(n_atoms=50, k=3), "fewer than n_atoms"),
    (torch.randn(100, 20), dict(n_atoms=50, k=30), "exceeds the dimension"),
    (torch.randn(100, 20), dict(n_atoms=5, k=8), "smaller than k"),
    (torch.randn(100, 20), dict(n_atoms=50, k=0), "at least 1"),
    (torch.full((100, 20), float("nan")), dict(n_atoms=50, k=3), "NaN or Inf"),
    (torch.randn(100, 20, 2), dict(n_atoms=50, k=3), "must be 2-D"),
    (torch.randn(100, 20), dict(n_atoms=50, k=3, bogus=1), "unknown option"),
    (torch.randn(100, 20), dict(n_atoms=50, k=3, method="lasso"), "method"),
    ([torch.randn(100, 20), torch.randn(100, 21)], dict(n_atoms=50, k=3, max_iters=3), "d = 21"),
])
def test_bad_input_raises_clear_errors(data, kwargs, message):
    with pytest.raises(ValueError, match=message):
        learn_dictionary(data, progress=False, **kwargs)
