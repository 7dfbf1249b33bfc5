"""Matryoshka dictionaries: disjoint nested atom groups coded as a residual cascade.

Groups are contiguous atom ranges with boundaries 2^m, 2^(m+1), …, up to K (any K; the last group ends at K).
Each group gets ``ceil(k / n_groups)`` of the sparsity budget, so the total can slightly exceed k (as in the
reference). Coding walks the groups in order, each coding the residual the earlier groups left, so the first
groups must explain as much as possible on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from pipeline.core.coders import encode
from pipeline.core.codes import Codes


@dataclass(frozen=True)
class Group:
    """Atoms ``start:end`` of the dictionary, coded with at most ``budget`` of them per sample."""

    start: int
    end: int
    budget: int


def matryoshka_groups(n_atoms: int, k: int, log2min: int = 8) -> list[Group]:
    """The nested groups for ``n_atoms`` atoms and sparsity ``k``.

    The smallest group has ``2**log2min`` atoms; ``log2min`` is raised when there would be more groups than
    the budget k can serve (one atom each at least), as the reference does.
    """
    if n_atoms < 1 or k < 1:
        raise ValueError(f"need n_atoms >= 1 and k >= 1, got n_atoms={n_atoms}, k={k}.")
    if log2min < 0:
        raise ValueError(f"log2min = {log2min} must be >= 0.")
    while True:
        bounds = []
        p = 2**log2min
        while p < n_atoms:
            bounds.append(p)
            p *= 2
        bounds.append(n_atoms)
        if len(bounds) <= k:
            break
        log2min += 1
    budget = math.ceil(k / len(bounds))
    groups, start = [], 0
    for end in bounds:
        groups.append(Group(start, end, min(budget, end - start)))
        start = end
    return groups


def encode_cascade(Y: Tensor, D: Tensor, groups: list[Group], G: Tensor | None = None, **coder) -> tuple[Codes, Tensor]:
    """Code ``Y: (n, d)`` group by group on the running residual.

    Returns:
        (codes with global atom ids and ``Σ budget`` slots, final residual (n, d)).
    """
    E = Y
    parts = []
    for g in groups:
        Dg = D[g.start : g.end]
        Gg = None if G is None else G[g.start : g.end, g.start : g.end]
        codes = encode(E, Dg, min(g.budget, Dg.shape[1]), G=Gg, **coder)
        E = E - codes.decode(Dg)
        parts.append(Codes(codes.indices + g.start, codes.values))
    return Codes.hcat(parts), E


def groups_to_list(groups: list[Group] | None) -> list[list[int]] | None:
    return None if groups is None else [[g.start, g.end, g.budget] for g in groups]


def groups_from_list(raw) -> list[Group] | None:
    return None if raw is None else [Group(int(a), int(b), int(c)) for a, b, c in raw]


def total_budget(groups: list[Group]) -> int:
    return sum(g.budget for g in groups)
