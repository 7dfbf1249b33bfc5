"""CUDA checks: the same code gives the same answers on the GPU. Skipped on machines without CUDA."""

import pytest
import torch

from pipeline.core.coders import encode
from pipeline.core.learner import learn_dictionary
from pipeline.core.synthetic import planted_problem, recovered_fraction

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("method", ["mp", "omp"])
@pytest.mark.parametrize("nonnegative", [True, False])
def test_codes_match_cpu(method, nonnegative):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(512, 64, generator=g)
    D = D / D.norm(dim=1, keepdim=True)
    Y = torch.randn(2000, 64, generator=g)
    cpu = encode(Y, D, 8, method=method, nonnegative=nonnegative)
    gpu = encode(Y.cuda(), D.cuda(), 8, method=method, nonnegative=nonnegative).to("cpu")
    same = (cpu.to_dense(512) - gpu.to_dense(512)).abs().max(dim=1).values < 1e-3
    assert float(same.float().mean()) > 0.98  # rare near-ties may break differently
    e_cpu = (Y - cpu.decode(D)).norm() / Y.norm()
    e_gpu = (Y - gpu.decode(D)).norm() / Y.norm()
    assert abs(float(e_cpu - e_gpu)) < 1e-3


def test_learner_on_gpu_recovers_planted_atoms():
    scores = []
    for seed in range(3):
        p = planted_problem(seed=seed)
        D = learn_dictionary(p.Y.cuda(), 50, 3, nonnegative=False, seed=seed, progress=False)
        assert D.atoms.is_cuda
        scores.append(recovered_fraction(p.D, D.atoms.cpu()))
    assert sum(scores) / 3 >= 0.9, scores
