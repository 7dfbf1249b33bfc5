"""SCR/TPP's latent ablations with each batch's codes and reconstruction error computed once per SAE.

SAEBench's SCR and TPP (``sae_bench.evals.scr_and_tpp.main``, 0.6.0) score an SAE by zero-ablating its top
latents for each class and each ``n_values`` entry and re-reading the probes. ``perform_feature_ablations`` calls
``ablated_precomputed_activations`` once per (ablated class, n, evaluated class): 90 calls per SAE with the
default's one class pair and five n. Each call encodes every batch of the evaluated class's activations, decodes
it to get the reconstruction error, zeroes the chosen latents and decodes again. The codes and the error of a
batch are the same in all the calls on that class's activations; only the last decode depends on the latents
ablated. On 2 CPU cores the encodes and first decodes are about two thirds of SCR's per-SAE time.

:func:`shared_codes_ablations` runs SAEBench's ``perform_feature_ablations`` with ``ablated_precomputed_activations``
replaced, for that one call, by :func:`ablated_activations`: the same operations in the same order on the same
tensors, except that a batch's codes ``f`` and error ``x - decode(f)`` come from a memo filled by the first call
on those activations (the codes are cloned before the latents are zeroed, so the memo is never changed). The
memo lives for one ``perform_feature_ablations`` call (one SAE, one dataset), keyed by the activations tensor it
was given, and holds ``(n, pos, d_sae)`` codes of each evaluated class: about 50 MB per class per 2,048 latents at
the default's sizes. Results are SAEBench's bit for bit (``tests/evals/test_ablation_codes.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class CodesMemo:
    """Each batch's codes and reconstruction error, by (activations tensor, batch start, batch size)."""

    def __init__(self) -> None:
        self._held: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.computed = 0
        self.reused = 0

    def codes_and_error(
        self, sae: Any, acts_BLD: torch.Tensor, start: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_BLF, error_BLD)`` of ``acts_BLD[start:start + batch_size]``: ``f = sae.encode(x)`` (a copy the
        caller may edit) and ``error = x - sae.decode(f)``."""
        key = (id(acts_BLD), start, batch_size)
        held = self._held.get(key)
        if held is None or held[0] is not acts_BLD:
            x = acts_BLD[start : start + batch_size]
            f = sae.encode(x)
            error = x - sae.decode(f)
            held = (acts_BLD, f, error)  # the tensor itself is held, so its id is not reused meanwhile
            self._held[key] = held
            self.computed += 1
        else:
            self.reused += 1
        return held[1].clone(), held[2]


def ablated_activations(
    memo: CodesMemo, acts_BLD: torch.Tensor, sae: Any, to_ablate: torch.Tensor, sae_batch_size: int
) -> torch.Tensor:
    """SAEBench's ``ablated_precomputed_activations``: per input, the mean over its non-padding positions of the
    activations with the latents ``to_ablate`` zeroed in the SAE's codes and the reconstruction error added back,
    ``(B, D)`` from ``acts_BLD: (B, L, D)`` (padding positions already zero). Codes and error from ``memo``."""
    out = []
    for i in range(0, acts_BLD.shape[0], sae_batch_size):
        x = acts_BLD[i : i + sae_batch_size]
        nonzero_B = (x.sum(dim=-1) != 0.0).to(dtype=x.dtype).sum(dim=-1)
        f, error = memo.codes_and_error(sae, acts_BLD, i, sae_batch_size)
        f[..., to_ablate] = 0.0
        modified = sae.decode(f) + error
        out.append(modified.sum(dim=1) / nonzero_B[:, None])
    return torch.cat(out, dim=0)


def _with_memo(module: Any, perform: Callable[..., Any]) -> Callable[..., Any]:
    """``perform_feature_ablations`` (``perform``) run with a fresh :class:`CodesMemo` behind the module's
    ``ablated_precomputed_activations``."""
    from pipeline.evals.saebench_patches import patched_attr

    def perform_feature_ablations(*args: Any, **kwargs: Any) -> Any:
        memo = CodesMemo()

        def ablated(acts_BLD: torch.Tensor, sae: Any, to_ablate: torch.Tensor, sae_batch_size: int) -> torch.Tensor:
            return ablated_activations(memo, acts_BLD, sae, to_ablate, sae_batch_size)

        with patched_attr(module, "ablated_precomputed_activations", ablated):
            return perform(*args, **kwargs)

    return perform_feature_ablations


@contextmanager
def shared_codes_ablations() -> Iterator[None]:
    """SAEBench's SCR/TPP use the codes memo (module docstring) for the duration."""
    import sae_bench.evals.scr_and_tpp.main as st

    from pipeline.evals.saebench_patches import patched_attr

    with patched_attr(st, "perform_feature_ablations", _with_memo(st, st.perform_feature_ablations)):
        yield
