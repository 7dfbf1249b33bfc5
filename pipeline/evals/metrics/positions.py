"""SAEBench's core eval on the positions the fit used (``eval.core.positions: fit``).

The harvest (``pipeline.data.harvest._harvest_shard``) leaves two kinds of position out of the store, so out of
the fit: a token id in the manifest's ``masking.masked_token_ids`` ("special"), and, when the manifest's
``masking.outlier_norm_factor`` F is set, a position whose residual norm at the hook exceeds F x the median norm
of the kept positions of its batch of ``batch_size`` contexts ("outlier", e.g. attention sinks). :class:`FitRule`
is that rule, read from the manifest.

The seam. SAEBench's core (``sae_bench.evals.core.main``) has exactly one notion of a left-out position: a token
whose id is in ``run_evals(..., ignore_tokens=...)``. With ``exclude_special_tokens_from_reconstruction=True``,
``get_recons_loss`` keeps the original activation there (``torch.where(mask, sae_out, activations)``) in the
CE/KL forward, ``get_downstream_reconstruction_metrics`` drops those positions' CE/KL from the means, and
``get_sparsity_and_variance_metrics`` drops them from every sparsity / variance / L2 / feature-density statistic.
It builds that mask inline (``batch_tokens == t for t in ignore_tokens``) in those three functions, so the token
ids SAEBench sees are the only way in. Hence, with nothing of SAEBench patched:

* :class:`MarkedTokens` wraps the ``ActivationsStore``: each batch it hands SAEBench has the left-out positions
  replaced by :data:`LEFT_OUT` (an id no tokenizer has), after running the model to the SAE's hook to apply the
  norm rule; it counts what it replaced (:class:`Tally`);
* :class:`TrueTokensModel` wraps the model: every forward SAEBench makes on such a batch runs on the true tokens;
* ``run_evals(..., ignore_tokens={LEFT_OUT})`` then computes every core metric over the positions the fit used.

An SAE wrapper could pass outliers through in ``get_recons_loss`` but could not take them out of the averages of
``get_sparsity_and_variance_metrics`` (a norm-10x sink passed through would still weigh in the explained
variance's total variance and in the L0 mean); the marking works for any SAE SAEBench takes (``BaseSAE`` or
sae-lens ``SAE``), as it never touches the SAE.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

#: Token id standing for "left out of the fit" in the batches SAEBench sees (no tokenizer has a negative id).
LEFT_OUT = -1
#: Result folder of core on the fit positions (next to ``core/``; same file names).
FIT_RESULTS = "core_fit_positions"
#: ``eval.core.positions`` -> the core runs it makes (``all`` = SAEBench's core as published).
POSITIONS: dict[str, tuple[str, ...]] = {"all": ("all",), "fit": ("fit",), "both": ("all", "fit")}


def position_runs(positions: str) -> tuple[str, ...]:
    """The core runs of an ``eval.core.positions`` value: ``("all",)``, ``("fit",)`` or ``("all", "fit")``."""
    if positions not in POSITIONS:
        raise ValueError(f"eval.core.positions={positions!r} must be one of {list(POSITIONS)}")
    return POSITIONS[positions]


@dataclass(frozen=True)
class FitRule:
    """Which positions the harvest left out of the store (its ``_harvest_shard`` rule)."""

    masked_token_ids: tuple[int, ...]
    """Token ids left out (the manifest's ``masking.masked_token_ids``)."""
    outlier_norm_factor: float | None
    """F: norm > F x median norm of the kept positions of a group is left out; None: no norm rule."""
    group_contexts: int | None
    """Contexts per median group (the harvest's ``batch_size``); None: the whole batch SAEBench asks for."""

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> FitRule:
        """The rule a store's ``manifest`` records (``masking`` and ``batch_size``)."""
        masking = manifest.get("masking") or {}
        if "masked_token_ids" not in masking:
            raise ValueError(
                "the store's manifest records no masking.masked_token_ids, so the positions the fit "
                "used are unknown; re-harvest, or set eval.core.positions=all"
            )
        factor = masking.get("outlier_norm_factor")
        group = manifest.get("batch_size")
        return cls(
            tuple(int(i) for i in masking["masked_token_ids"]),
            None if factor is None else float(factor),
            int(group) if group else None,
        )

    def left_out(self, tokens: torch.Tensor, acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(special, outlier)``: bool masks ``(B, L)`` of the positions of ``tokens`` ``(B, L)`` with hook
        activations ``acts`` ``(B, L, d)`` that the harvest leaves out (disjoint; on ``acts``' device)."""
        ids = torch.tensor(self.masked_token_ids, dtype=torch.long, device=tokens.device)
        special = torch.isin(tokens, ids).to(acts.device)
        keep = ~special
        if self.outlier_norm_factor is not None:
            norms = acts.float().norm(dim=-1)
            step = self.group_contexts or len(tokens)
            for lo in range(0, len(tokens), step):
                k, n = keep[lo : lo + step], norms[lo : lo + step]
                if bool(k.any()):  # as the harvest: the median of the kept positions of the group
                    keep[lo : lo + step] = k & (n <= self.outlier_norm_factor * n[k].median())
        return special, ~special & ~keep

    def describe(self, hook: str) -> str:
        """The rule in words (notes and the result file)."""
        ids = f"token ids {list(self.masked_token_ids)}" if self.masked_token_ids else "no token ids"
        if self.outlier_norm_factor is None:
            return f"{ids} (the store had no outlier-norm rule)"
        group = f"{self.group_contexts} contexts" if self.group_contexts else "batch"
        return (
            f"{ids}, and positions whose norm at {hook} exceeds {self.outlier_norm_factor:g} x the median norm "
            f"of the other kept positions of their group of {group}"
        )


@dataclass
class Tally:
    """Positions of the batches handed to SAEBench, and how many were left out of the fit."""

    positions: int = 0
    special: int = 0
    """Left out for their token id."""
    outlier: int = 0
    """Left out by the norm rule (not special)."""

    @property
    def passed_through(self) -> int:
        return self.special + self.outlier

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "passed_through": self.passed_through}


class MarkedTokens:
    """An ``ActivationsStore`` whose ``get_batch_tokens`` marks the positions the fit left out as
    :data:`LEFT_OUT`; everything else is the wrapped store's. ``tallies`` holds one :class:`Tally` per pass over
    the eval text (SAEBench's ``run_evals`` calls ``reset_input_dataset`` between its reconstruction and its
    sparsity/variance batches)."""

    def __init__(self, store: Any, model: Any, hook: str, rule: FitRule):
        from pipeline.data.harvest import stop_layer

        self._store, self._model, self._hook, self._rule = store, model, hook, rule
        self._stop = stop_layer([hook])
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self.tallies: list[Tally] = [Tally()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    @torch.no_grad()
    def get_batch_tokens(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The wrapped store's ``(B, L)`` batch with the left-out positions set to :data:`LEFT_OUT`."""
        tokens = self._store.get_batch_tokens(*args, **kwargs)
        _, cache = self._model.run_with_cache(tokens, names_filter=[self._hook], stop_at_layer=self._stop)
        acts = cache[self._hook]
        if acts.ndim != 3:
            raise ValueError(
                f"eval.core.positions=fit needs (batch, pos, d) activations at {self._hook}, got {tuple(acts.shape)}"
            )
        special, outlier = self._rule.left_out(tokens, acts)
        t = self.tallies[-1]
        t.positions += tokens.numel()
        t.special += int(special.sum())
        t.outlier += int(outlier.sum())
        marked = tokens.masked_fill((special | outlier).to(tokens.device), LEFT_OUT)
        self._last = (marked, tokens)
        return marked

    def reset_input_dataset(self) -> None:
        self._store.reset_input_dataset()
        self.tallies.append(Tally())

    def true_tokens(self, tokens: Any) -> Any:
        """The true ``(B, L)`` tokens of the batch last handed out, when ``tokens`` is that marked batch."""
        if self._last is not None and tokens is self._last[0]:
            return self._last[1]
        if isinstance(tokens, torch.Tensor) and bool((tokens == LEFT_OUT).any()):
            raise RuntimeError(
                "SAEBench ran the model on marked tokens other than the batch last handed out; "
                "eval.core.positions=fit does not support this SAEBench version"
            )
        return tokens


class TrueTokensModel:
    """The model SAEBench's core gets with :class:`MarkedTokens`: its three forwards (``__call__``,
    ``run_with_hooks``, ``run_with_cache``) and ``memo`` run on the true tokens; everything else is the wrapped
    model's."""

    def __init__(self, model: Any, marked: MarkedTokens):
        self._model, self._marked = model, marked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._model(self._marked.true_tokens(tokens), *args, **kwargs)

    def run_with_hooks(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._model.run_with_hooks(self._marked.true_tokens(tokens), *args, **kwargs)

    def run_with_cache(self, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        return self._model.run_with_cache(self._marked.true_tokens(tokens), *args, **kwargs)

    def memo(self, name: str, tokens: Any, compute: Any) -> Any:
        """The wrapped model's ``memo`` (``SharedForwards.memo``) on the true tokens."""
        return self._model.memo(name, self._marked.true_tokens(tokens), compute)


def phase_tallies(marked: MarkedTokens, config: Any) -> dict[str, dict[str, int]]:
    """``{"reconstruction": ..., "sparsity_variance": ...}`` (:meth:`Tally.as_dict`) of a finished ``run_evals``
    with SAEBench ``config`` (a phase is present when its metrics were on)."""
    phases = []
    if config.compute_kl or config.compute_ce_loss:
        phases.append("reconstruction")
    if config.compute_l2_norms or config.compute_sparsity_metrics or config.compute_variance_metrics:
        phases.append("sparsity_variance")
    return {p: t.as_dict() for p, t in zip(phases, marked.tallies)}


def with_positions(
    result: dict[str, Any], rule: FitRule, marked: MarkedTokens, config: Any, hook: str
) -> dict[str, Any]:
    """SAEBench's core ``result`` JSON with its ``eval_result_unstructured`` (SAEBench's slot for extra outputs,
    which core leaves empty) saying which positions it covers: the rule, and per phase how many positions of the
    eval text were passed through (:func:`phase_tallies`)."""
    text = rule.describe(hook)
    return {
        **result,
        "eval_result_unstructured": {
            "positions": "fit",
            "rule": asdict(rule),
            "rule_text": text,
            "covers": fit_covers(text),
            "passed_through": phase_tallies(marked, config),
        },
    }


ALL_COVERS = (
    "SAEBench's core as published: the SAE replaces the activation at every position of the eval text "
    "(special tokens and norm outliers included) in the CE/KL forward; CE, KL, L0/L1, MSE, explained "
    "variance, cossim, L2 ratio and feature density are means over the positions whose token is not "
    "pad/eos/bos (SAEBench's ignore_tokens)"
)


def fit_covers(rule_text: str) -> str:
    """What the numbers of a ``core_fit_positions`` result cover."""
    return (
        "the positions the fit used: the positions the harvest left out of the store (" + rule_text + ") keep "
        "their original activation in the CE/KL forward (SAEBench's exclude_special_tokens_from_reconstruction) "
        "and are left out of every mean (the CE/KL of the predictions made there, L0/L1, MSE, explained "
        "variance, cossim, L2 ratio, feature density: SAEBench's ignore_tokens)"
    )
