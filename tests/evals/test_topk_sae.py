"""TopK SAE baseline: trains on the same data interface, exactly k active latents, save/load."""

import torch

from pipeline.core.synthetic import planted_problem
from pipeline.evals.topk_sae import TopKSAE, train_topk_sae


def test_trains_and_reduces_fvu(tmp_path):
    p = planted_problem(d=32, n_atoms=64, k=4, n=6000, nonnegative=True, seed=0)
    sae = train_topk_sae(p.Y, 64, 4, epochs=8, batch_size=256, progress=False, seed=0)
    assert sae.history[-1]["fvu"] < 0.5 * sae.history[0]["fvu"]
    assert sae.fvu(p.Y) < 0.5
    acts = sae.encode(p.Y[:100].reshape(10, 10, 32))
    assert acts.shape == (10, 10, 64)
    assert int((acts != 0).sum(-1).max()) <= 4 and float(acts.min()) >= 0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    sae.save(tmp_path / "sae")
    again = TopKSAE.load(tmp_path / "sae")
    torch.testing.assert_close(again(p.Y[:10]), sae(p.Y[:10]))


def test_iterable_data_and_step_cap():
    p = planted_problem(d=16, n_atoms=32, k=2, n=2000, seed=1)
    batches = [p.Y[i:i + 500] for i in range(0, 2000, 500)]
    sae = train_topk_sae(batches, 32, 2, batch_size=100, max_steps=7, epochs=None, progress=False)
    assert len(sae.history) == 7


def test_trains_even_when_the_caller_switched_autograd_off():
    """SAEBench's SCR/TPP leave torch.set_grad_enabled(False) behind; the next fit of a sweep must still train."""
    p = planted_problem(d=16, n_atoms=32, k=2, n=1000, seed=2)
    previous = torch.is_grad_enabled()
    torch.set_grad_enabled(False)
    try:
        sae = train_topk_sae(p.Y, 32, 2, batch_size=100, max_steps=3, epochs=None, progress=False)
        assert len(sae.history) == 3
    finally:
        torch.set_grad_enabled(previous)
