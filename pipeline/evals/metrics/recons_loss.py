"""SAEBench core's reconstruction metrics of one batch, with the zero-ablation half computed once per batch.

SAEBench's ``get_recons_loss`` (``sae_bench.evals.core.main``, 0.6.0) gives, per batch of eval contexts, five
per-token tensors: the CE loss of the clean forward, of the forward with the SAE's reconstruction spliced in at
the hook, and of the forward with the hook zero-ablated, and the KL divergence of the spliced and of the ablated
predictions from the clean ones. Two of the five (the ablated CE and KL) do not depend on the SAE, yet SAEBench
computes them again for every SAE and every position set; on a 49k-token vocabulary the KL is a softmax, a log
and a product over ``(batch, pos, vocab)`` each time, about half of core's per-SAE time on 2 CPU cores.

:func:`recons_loss` makes the same calls and the same arithmetic, in the same order, so its five tensors are
SAEBench's bit for bit (``tests/evals/test_recons_loss.py``), but asks the model for the ablated pair through
:meth:`~pipeline.evals.metrics.shared_forwards.SharedForwards.memo`: the first SAE's call computes it (one
zero-ablated forward and one KL), every later SAE, position set and run on the same tokens reads it back. The
splice's hook carries a name :class:`~pipeline.evals.metrics.shared_forwards.SharedForwards` recognises
(:data:`SPLICE_HOOK`), so the spliced forward still starts at the hook from the kept residual.

It covers SAEBench's residual-stream case: hooks without a head dimension and no extra model arguments. For
anything else, or a model that keeps nothing, :func:`shared_recons_loss` hands the call to SAEBench's own
function unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch

#: Hook names whose activations carry a head dimension: SAEBench reshapes for them; left to SAEBench.
HEAD_DIM_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")
#: Qualified name of :func:`recons_loss`'s splice hook (matched by ``SharedForwards``).
SPLICE_HOOK = "recons_loss.<locals>.replacement_hook"
#: Positions per chunk of :func:`kl` on CPU.
KL_CHUNK_ROWS = 32
#: The :meth:`SharedForwards.memo` name of the zero-ablated CE and KL of a batch.
ZERO_ABLATION_MEMO = "core.zero_ablation.kl_and_ce"


def kl(original_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_original || p_new) ``(batch, pos)`` of logits ``(batch, pos, vocab)``, as SAEBench 0.6.0's
    core computes it: probabilities by softmax, their logs by ``torch.log``, then ``sum(p * (log p - log q))``.

    On CPU it runs :data:`KL_CHUNK_ROWS` positions at a time, so its five temporaries stay a few MB instead of five
    ``(batch, pos, vocab)`` tensors (200 MB each for 8 x 128 positions of a 49k vocabulary): several times faster
    on 2 cores, and the same bits. Every operation is per position (the softmax and the sum over the vocabulary of
    one row do not depend on the other rows), and a chunk of two or more rows is reduced row by row as the whole
    tensor is, whatever the number of threads; a one-row tensor would have its sum split across threads, so no
    chunk has one row. Elsewhere (CUDA, whose reductions may split a row when there are few), the whole tensor at
    once."""
    shape, vocab = original_logits.shape[:-1], original_logits.shape[-1]
    rows = original_logits.reshape(-1, vocab)
    if original_logits.device.type != "cpu" or rows.shape[0] <= KL_CHUNK_ROWS + 1:
        return _kl_rows(original_logits, new_logits)
    new_rows = new_logits.reshape(-1, vocab)
    starts = list(range(0, rows.shape[0], KL_CHUNK_ROWS))
    if rows.shape[0] - starts[-1] == 1:  # a last chunk of one row joins the one before
        starts.pop()
    bounds = [*starts, rows.shape[0]]
    parts = [_kl_rows(rows[a:b], new_rows[a:b]) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(parts).reshape(shape)


def _kl_rows(original_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    p = torch.nn.functional.softmax(original_logits, dim=-1)
    log_p = torch.log(p)
    q = torch.nn.functional.softmax(new_logits, dim=-1)
    log_q = torch.log(q)
    return (p * (log_p - log_q)).sum(dim=-1)


def _reusable(model: Any, hook_name: str, model_kwargs: Mapping[str, Any]) -> bool:
    return (
        callable(getattr(model, "memo", None))
        and bool(getattr(model, "keeps", False))
        and not model_kwargs
        and not any(s in hook_name for s in HEAD_DIM_HOOKS)
    )


@torch.no_grad()
def recons_loss(
    sae: Any,
    model: Any,
    batch_tokens: torch.Tensor,
    compute_kl: bool,
    compute_ce_loss: bool,
    ignore_tokens: set[int | None],
    exclude_special_tokens_from_reconstruction: bool,
) -> dict[str, torch.Tensor]:
    """SAEBench's ``get_recons_loss`` metrics of ``batch_tokens: (batch, pos)`` for ``sae`` at a residual-stream
    hook (module docstring): ``kl_div_with_sae``, ``kl_div_with_ablation`` ``(batch, pos)``; ``ce_loss_with_sae``,
    ``ce_loss_without_sae``, ``ce_loss_with_ablation`` ``(batch, pos - 1)``. ``model`` has ``memo`` (a
    ``SharedForwards``, or a wrapper of one that maps the tokens)."""
    hook_name = sae.cfg.hook_name
    original_logits, original_ce_loss = model(batch_tokens, return_type="both", loss_per_token=True)
    if ignore_tokens and exclude_special_tokens_from_reconstruction:
        mask = torch.logical_not(torch.any(torch.stack([batch_tokens == t for t in ignore_tokens], dim=0), dim=0))
    else:
        mask = torch.ones_like(batch_tokens, dtype=torch.bool)

    def replacement_hook(activations: torch.Tensor, hook: Any) -> torch.Tensor:
        device = activations.device
        activations = activations.to(sae.device)
        reconstructed = sae.decode(sae.encode(activations)).to(activations.dtype)
        return torch.where(mask[..., None], reconstructed, activations).to(device)

    def zero_ablate_hook(activations: torch.Tensor, hook: Any) -> torch.Tensor:
        device = activations.device
        return torch.zeros_like(activations.to(sae.device)).to(device)

    recons_logits, recons_ce_loss = model.run_with_hooks(
        batch_tokens, return_type="both", fwd_hooks=[(hook_name, partial(replacement_hook))], loss_per_token=True
    )

    def zero_ablation(plain_model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, ce = plain_model.run_with_hooks(
            tokens, return_type="both", fwd_hooks=[(hook_name, zero_ablate_hook)], loss_per_token=True
        )
        return kl(original_logits, logits), ce

    zero_abl_kl_div, zero_abl_ce_loss = model.memo(ZERO_ABLATION_MEMO, batch_tokens, zero_ablation)
    metrics: dict[str, torch.Tensor] = {}
    if compute_kl:
        metrics["kl_div_with_sae"] = kl(original_logits, recons_logits)
        metrics["kl_div_with_ablation"] = zero_abl_kl_div
    if compute_ce_loss:
        metrics["ce_loss_with_sae"] = recons_ce_loss
        metrics["ce_loss_without_sae"] = original_ce_loss
        metrics["ce_loss_with_ablation"] = zero_abl_ce_loss
    return metrics


def shared_recons_loss(original: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A stand-in for SAEBench's ``get_recons_loss`` (``original``) with its signature: :func:`recons_loss` where
    it applies (module docstring), ``original`` otherwise."""

    def get_recons_loss(
        sae: Any,
        model: Any,
        batch_tokens: torch.Tensor,
        activation_store: Any,
        compute_kl: bool,
        compute_ce_loss: bool,
        ignore_tokens: set[int | None] = set(),  # noqa: B006 (SAEBench's signature; never mutated)
        exclude_special_tokens_from_reconstruction: bool = False,
        model_kwargs: Mapping[str, Any] = {},  # noqa: B006
    ) -> dict[str, Any]:
        if not _reusable(model, sae.cfg.hook_name, model_kwargs):
            return original(
                sae,
                model,
                batch_tokens,
                activation_store,
                compute_kl=compute_kl,
                compute_ce_loss=compute_ce_loss,
                ignore_tokens=ignore_tokens,
                exclude_special_tokens_from_reconstruction=exclude_special_tokens_from_reconstruction,
                model_kwargs=model_kwargs,
            )
        exclude = exclude_special_tokens_from_reconstruction
        return recons_loss(sae, model, batch_tokens, compute_kl, compute_ce_loss, ignore_tokens, exclude)

    return get_recons_loss


@contextmanager
def zero_ablation_shared() -> Iterator[None]:
    """SAEBench's core uses :func:`shared_recons_loss` for the duration (its module looks the function up at
    call time)."""
    import sae_bench.evals.core.main as core

    from pipeline.evals.saebench_patches import patched_attr

    with patched_attr(core, "get_recons_loss", shared_recons_loss(core.get_recons_loss)):
        yield
