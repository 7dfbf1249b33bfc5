"""The learned dictionary: atoms plus the coder settings that encode with them, saved as safetensors + JSON."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from pipeline.core.coders import KERNELS, encode, gram
from pipeline.core.codes import Codes
from pipeline.core.matryoshka import Group, encode_cascade, groups_from_list, groups_to_list
from pipeline.core.validation import check_atoms, check_samples
from pipeline.utils.atomic import atomic_write, atomic_write_text

#: Tensors of a saved dictionary (atoms, optional centre).
DICTIONARY_WEIGHTS = "dictionary.safetensors"
#: Settings, fit history and metadata of a saved dictionary.
DICTIONARY_META = "dictionary.json"
FORMAT_VERSION = 1


@dataclass
class CoderSettings:
    """How a dictionary encodes (see :func:`pipeline.core.coders.encode`)."""

    k: int
    """Maximum atoms per sample (per Matryoshka group: its budget)."""
    method: str = "mp"
    """"mp" (matching pursuit, the reference) or "omp" (Batch-OMP)."""
    nonnegative: bool = True
    """Codes >= 0 (SAE convention); False gives the reference's signed codes."""
    rtol: float = 0.05
    """Stop a sample once ‖residual‖ <= rtol ‖y‖."""
    refit: bool = False
    """Least-squares refit on the final support."""
    max_iter: int | None = None
    """MP step cap (default 4k)."""
    candidates: int | None = None
    """Restrict MP's greedy loop to this many top initial correlations (speed; approximate)."""
    precision: str = "fp32"
    """Matmul precision of the correlations: fp32, tf32 or bf16."""
    reference_rules: bool = False
    """KSVD.jl's matching-pursuit stopping rules exactly (strict rtol test before the k + 1 drop, so a sample can
    keep k + 1 atoms and codes are k + 1 wide); the ``reference`` preset sets it."""
    kernel: str = "auto"
    """Where the CPU loops run: "numba" (compiled per-sample MP, and in fits the compiled atom-update sweep with
    per-atom refits, rank1_solver="direct"; CPU, no candidate lists, one process), "torch" (batched tensor ops,
    any device) or "auto" (numba wherever it applies). A speed choice: the same codes up to rounding, refits the
    same to ``rank1_tol``."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for a choice the coders do not have."""
        choices = dict(method=("mp", "omp"), precision=("fp32", "tf32", "bf16"), kernel=KERNELS)
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"coder.{key} = {getattr(self, key)!r} is not one of {allowed}.")
        if not 0 <= self.rtol < 1:
            raise ValueError(f"coder.rtol = {self.rtol} must be in [0, 1).")
        if self.reference_rules and self.method != "mp":
            raise ValueError(
                f"coder.reference_rules are KSVD.jl's matching-pursuit rules; coder.method = "
                f"{self.method!r} must be 'mp' with them."
            )

    def kwargs(self) -> dict[str, Any]:
        return dict(
            method=self.method,
            nonnegative=self.nonnegative,
            rtol=self.rtol,
            refit=self.refit,
            max_iter=self.max_iter,
            candidates=self.candidates,
            precision=self.precision,
            reference_rules=self.reference_rules,
            kernel=self.kernel,
        )


def code_width(coder: CoderSettings, groups: list[Group] | None = None) -> int:
    """Slots per sample of the codes ``coder`` gives: k, or k + 1 with ``reference_rules`` (Matryoshka: the sum
    over the groups' budgets)."""
    budgets = [coder.k] if groups is None else [g.budget for g in groups]
    return sum(b + int(coder.reference_rules) for b in budgets)


def apply_coder(
    Y: Tensor, atoms: Tensor, G: Tensor, coder: CoderSettings, groups: list[Group] | None = None, **overrides
) -> Codes:
    """Codes of ``Y: (n, d)`` (already centred) over ``atoms: (K, d)`` with Gram ``G`` and ``coder``'s settings
    (``overrides`` replace them): the Matryoshka cascade when ``groups`` are given, else the plain coder."""
    kw = coder.kwargs() | overrides
    k = kw.pop("k", coder.k)
    if groups is not None:
        return encode_cascade(Y, atoms, groups, G=G, validate=False, **kw)[0]
    return encode(Y, atoms, k, G=G, validate=False, **kw)


@dataclass
class Dictionary:
    """A sparse dictionary ``atoms: (K, d)`` (unit-norm rows) with its coder, centre and fit history."""

    atoms: Tensor
    coder: CoderSettings
    centre: Tensor | None = None
    groups: list[Group] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_atoms(self.atoms, "atoms")
        self._gram: Tensor | None = None

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    @property
    def d(self) -> int:
        return self.atoms.shape[1]

    @property
    def code_width(self) -> int:
        """Slots per sample of this dictionary's codes (:func:`code_width`)."""
        return code_width(self.coder, self.groups)

    @property
    def signed(self) -> bool:
        return not self.coder.nonnegative

    @property
    def gram(self) -> Tensor:
        """(K, K) ``D Dᵀ``, computed once."""
        if self._gram is None or self._gram.device != self.atoms.device:
            self._gram = gram(self.atoms.float())
        return self._gram

    def to(self, device: torch.device | str) -> Dictionary:
        out = Dictionary(
            self.atoms.to(device),
            self.coder,
            None if self.centre is None else self.centre.to(device),
            self.groups,
            self.history,
            self.metadata,
        )
        return out

    def encode(self, Y: Tensor, *, plain: bool = False, **overrides) -> Codes:
        """Codes of ``Y: (n, d)`` with this dictionary's coder (``overrides`` replace settings; ``plain=True``
        codes a Matryoshka dictionary with the plain coder instead of its group cascade)."""
        check_samples(Y, d=self.d)
        Y = Y.to(self.atoms.device, torch.float32 if Y.dtype != torch.float64 else Y.dtype)
        if self.centre is not None:
            Y = Y - self.centre.to(Y.dtype)
        groups = None if plain else self.groups
        return apply_coder(Y, self.atoms.to(Y.dtype), self.gram.to(Y.dtype), self.coder, groups, **overrides)

    def decode(self, codes: Codes) -> Tensor:
        """(n, d) reconstruction, centre added back."""
        out = codes.decode(self.atoms.to(codes.values.dtype))
        return out if self.centre is None else out + self.centre.to(out.dtype)

    def reconstruct(self, Y: Tensor) -> Tensor:
        return self.decode(self.encode(Y))

    def fvu(self, Y: Tensor) -> float:
        """Fraction of variance unexplained ‖Y − Ŷ‖² / ‖Y − mean(Y)‖² on ``Y: (n, d)``."""
        Y = Y.to(self.atoms.device, torch.float32)
        err = (Y - self.reconstruct(Y)).pow(2).sum()
        return float(err / (Y - Y.mean(0)).pow(2).sum().clamp(min=1e-30))

    # ---------------------------------------------------------------------------------------------- I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/dictionary.safetensors`` and ``path/dictionary.json`` (each atomically)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"atoms": self.atoms.detach().float().cpu().contiguous()}
        if self.centre is not None:
            tensors["centre"] = self.centre.detach().float().cpu().contiguous()
        meta = {
            "format_version": FORMAT_VERSION,
            "n_atoms": self.n_atoms,
            "d": self.d,
            "coder": asdict(self.coder),
            "groups": groups_to_list(self.groups),
            "history": self.history,
            "metadata": self.metadata,
        }
        atomic_write(path / DICTIONARY_WEIGHTS, lambda p: save_file(tensors, str(p)))
        atomic_write_text(path / DICTIONARY_META, json.dumps(meta, indent=2, default=_json_default))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> Dictionary:
        path = Path(path)
        if not (path / DICTIONARY_WEIGHTS).exists() or not (path / DICTIONARY_META).exists():
            raise FileNotFoundError(
                f"no dictionary at {path}: expected {DICTIONARY_WEIGHTS} and "
                f"{DICTIONARY_META} there (written by Dictionary.save)."
            )
        meta = json.loads((path / DICTIONARY_META).read_text())
        tensors = load_file(str(path / DICTIONARY_WEIGHTS), device=str(device))
        return cls(
            tensors["atoms"],
            CoderSettings(**meta["coder"]),
            tensors.get("centre"),
            groups_from_list(meta.get("groups")),
            meta.get("history", []),
            meta.get("metadata", {}),
        )


def _json_default(o):
    if isinstance(o, float) and o != o:
        return None
    if isinstance(o, Tensor):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
