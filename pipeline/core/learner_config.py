"""The options of the DB-KSVD learner: :class:`LearnerConfig` (each field documented under it, the schema of the
``dictionary`` config node) and :data:`PAPER_SCHEDULE`, the paper's option set."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from pipeline.core.dictionary import CoderSettings
from pipeline.core.validation import check_sparsity

#: The reference's algorithm and the paper's schedule (arXiv 2505.18441; KSVD.jl and its ksvd_gemma.jl):
#: KSVD.jl's signed matching pursuit with its stopping rules (codes up to k + 1 wide), exact rank-1 refits, its
#: Matryoshka loop order, fixed contiguous 65,536-sample batches (a partial last one skipped) cut from one seeded
#: shuffle of the rows (its activations were written shuffled), one update per batch, 3 epochs, no convergence
#: stop, uniform init, random re-seeding of dead atoms, no near-duplicate replacement, no centring, and the
#: least-squares refit its SAEBench wrapper encodes with. The same settings as a Hydra preset:
#: ``dictionary=reference`` (conf/dictionary/reference.yaml).
PAPER_SCHEDULE: dict[str, Any] = dict(
    nonnegative=False,
    reference_rules=True,
    refit=False,
    method="mp",
    rtol=0.05,
    max_iter=None,
    rank1_solver="direct",
    approximate=False,
    matryoshka_loop="reference",
    sample_order="contiguous",
    shuffle_once=True,
    batch_size=65_536,
    epochs=3,
    max_iters=None,
    tol=None,
    init="uniform",
    reseed="random",
    duplicate_threshold=None,
    center=False,
    eval_refit=True,
)


@dataclass
class LearnerConfig:
    """Options of :func:`learn_dictionary` (each field's docstring is its documentation)."""

    n_atoms: int
    """K, the number of atoms."""
    coder: CoderSettings
    """The sparse coder used while training, and saved with the dictionary: ``coder.k`` non-zeros per sample
    (for Matryoshka: split over the groups), ``coder.method`` ("mp", the reference's matching pursuit, or
    "omp"), ``coder.nonnegative`` (False: the reference's signed codes), ``coder.rtol``, ``coder.refit`` (the
    reference trains without), and the GPU speed options ``coder.candidates`` / ``coder.precision``."""
    atom_batch_size: int | None = None
    """Atoms refitted in parallel against one residual; 1 = sequential K-SVD, n_atoms = fully parallel
    (converges much worse). None: ``max(1, n_atoms // 128)``, the benchmarked default: at K = 16384 on a GPU,
    K/128 reached the best held-out FVU in the same time as K/32, while K/8 collapsed atoms onto shared
    directions (BENCHMARKS.md)."""
    rank1_solver: str = "direct"
    """How each atom's rank-1 refit is solved. "direct" (default) and "gram" are exact, as the reference: an
    atom batch's restricted errors are gathered once into contiguous blocks and each refit is iterated to
    ``rank1_tol`` (signed refits certified, or finished by an eigensolver), on the block itself ("direct":
    fastest on CPUs) or in the small space of its Gram matrix ("gram": one batched matmul, then cheap steps).
    "alternating": matrix-free steps over scattered rows. Data-parallel fits take "direct" or "alternating"
    ("gram" pairs samples with samples, which ranks cannot)."""
    rank1_tol: float = 1e-6
    """Convergence threshold of each rank-1 refit: "direct" / "gram", 1 − cos between the atom and the exact
    refit (certified for signed codes, estimated for non-negative ones); "alternating", 1 − cos between
    successive atoms."""
    rank1_max_iters: int = 100
    """Cap on the iterations of a rank-1 refit; refits stopped by it are counted in the history
    (``rank1_capped``) and logged."""
    approximate: bool = False
    """One alternating step per atom (Rubinstein's approximate K-SVD) instead of iterating to rank1_tol."""
    batch_size: int = 65_536
    """Samples per iteration; a tensor with fewer rows is used whole each iteration."""
    sample_order: str = "shuffled"
    """"shuffled": a new random order every epoch (a last partial batch of at least half a batch is used);
    "contiguous": the reference's fixed consecutive batches in store order, a partial last batch skipped."""
    shuffle_once: bool = False
    """With ``sample_order="contiguous"``: cut the fixed batches from one seeded permutation of the rows (``seed``;
    the same every epoch, so the same rows are skipped) instead of store order. The paper's activations were
    written to their file from a shuffling activation buffer and read back in contiguous batches; a store here is
    context-major, so without it a batch is whole consecutive contexts. The ``reference`` preset sets it. A
    store streamed (too large for memory) is shuffled within groups of shards, the loader's buffer, the same
    order every epoch. No effect with ``"shuffled"``."""
    max_iters: int | None = 200
    """Iteration cap (None: no cap)."""
    epochs: int | None = None
    """Passes over the data (None: no cap)."""
    time_budget: float | None = None
    """Stop after this many seconds."""
    tol: float | None = 1e-4
    """Stop once the FVU improved by less than this fraction over ``patience`` iterations (None: never)."""
    patience: int = 5
    """Iterations over which ``tol`` is judged."""
    center: bool = False
    """Subtract the data mean before fitting (exported later as the SAE's b_dec). The paper does not."""
    eval_refit: bool | None = None
    """``coder.refit`` of the saved dictionary, i.e. how it encodes after the fit (held-out FVU, SAEBench);
    None: as in training. The reference trains without the least-squares refit and evaluates with it (True)."""
    init: str = "data"
    """"data": random distinct samples; "uniform": uniform(−0.5, 0.5) columns, normalised (the reference)."""
    reseed: str | None = "worst"
    """Dead atoms: "worst" (residuals of the worst-reconstructed samples), "random" (the reference), None."""
    duplicate_threshold: float | None = 0.95
    """Replace the less used of two atoms whose |cos| exceeds this (the K-SVD paper replaces near-duplicate
    atoms too); at 0.95 more planted atoms are recovered than without it (BENCHMARKS.md (c)). None: off."""
    matryoshka: int | None = None
    """log2 of the smallest Matryoshka group (the paper uses 8); None: a plain dictionary."""
    matryoshka_loop: str = "cascade"
    """Order of a Matryoshka iteration. "cascade": code group g on what groups < g left, then update g with those
    codes. "reference" (KSVD.jl's MatryoshkaLoop): code the batch with all atoms, then per group update g with
    its share of those codes against what groups < g left, re-seed its dead atoms, re-code g with its budget,
    subtract."""
    seed: int = 0
    """Seed of every random choice (init, shuffles, re-seeding, sample order)."""
    device: str | None = None
    """Where to fit; default the tensor's device, else CUDA when available."""
    chunk_size: int | None = None
    """Coder chunk size (default from free memory)."""
    checkpoint_path: str | None = None
    """File to checkpoint into (atomically); with ``resume`` a fit continues from it."""
    checkpoint_every: int = 10
    """Iterations between checkpoints."""
    resume: bool = False
    """Continue from ``checkpoint_path`` when it exists."""
    progress: bool = True
    """Show a tqdm bar with FVU, mean L0 and dead fraction."""

    @classmethod
    def from_options(cls, n_atoms: int, k: int, **options: Any) -> LearnerConfig:
        """The config of ``learn_dictionary(data, n_atoms, k, **options)``: ``options`` are fields of this class
        or of :class:`~pipeline.core.dictionary.CoderSettings` (``method="omp"``, ``nonnegative=False``, ...)."""
        coder_keys = {f.name for f in fields(CoderSettings)} - {"k"}
        own_keys = {f.name for f in fields(cls)} - {"n_atoms", "coder"}
        unknown = set(options) - coder_keys - own_keys
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)}; valid options are the fields of LearnerConfig "
                f"and CoderSettings: {sorted(own_keys | coder_keys)}."
            )
        coder = CoderSettings(k=k, **{key: v for key, v in options.items() if key in coder_keys})
        return cls(n_atoms=n_atoms, coder=coder, **{key: v for key, v in options.items() if key in own_keys})

    def validate(self, d: int) -> None:
        """Raise ``ValueError`` naming the field for a value the learner cannot use with data of dimension d."""
        check_sparsity(self.coder.k, self.n_atoms, d)
        self.coder.validate()
        choices = dict(
            init=("data", "uniform"),
            reseed=("worst", "random", None),
            rank1_solver=("direct", "gram", "alternating"),
            sample_order=("shuffled", "contiguous"),
            matryoshka_loop=("cascade", "reference"),
        )
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} = {getattr(self, key)!r} is not one of {allowed}.")
        positive = dict(
            batch_size=self.batch_size,
            rank1_max_iters=self.rank1_max_iters,
            atom_batch_size=self.atom_batch_size or 1,
            checkpoint_every=self.checkpoint_every,
        )
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"{key} = {value} must be >= 1.")
        if self.coder.kernel == "numba" and not (self.rank1_solver == "direct" and not self.approximate):
            raise ValueError(
                "coder.kernel = 'numba' forces the compiled loops, and the atom update has them only for "
                "rank1_solver='direct' (not approximate); use coder.kernel='auto', which compiles what "
                "it can and runs the rest with torch."
            )
        if self.resume and not self.checkpoint_path:
            raise ValueError("resume=True needs checkpoint_path (the file to resume from).")
        if self.max_iters is None and self.epochs is None and self.time_budget is None and self.tol is None:
            raise ValueError("no stopping rule: set max_iters, epochs, time_budget or tol.")
        self.validate_schedule(min_passes=0)

    def validate_schedule(self, min_passes: int = 1) -> None:
        """Raise ``ValueError`` naming the field for a stopping rule that cannot work: ``patience`` < 1, ``tol``
        negative or NaN, ``time_budget`` <= 0 or NaN, ``duplicate_threshold`` outside (0, 1], and ``max_iters`` or
        ``epochs`` below ``min_passes`` (the library takes 0, a fit that stops before its first iteration: the
        initial dictionary; the config check asks for at least 1)."""
        for key in ("max_iters", "epochs"):
            value = getattr(self, key)
            if value is not None and value < min_passes:
                raise ValueError(
                    f"{key} = {value} must be >= {min_passes}; set it to a positive count, or null for no such cap."
                )
        if self.patience < 1:
            raise ValueError(
                f"patience = {self.patience} must be >= 1: it is the number of iterations over which tol is judged "
                "(e.g. 5)."
            )
        if self.tol is not None and not self.tol >= 0:  # NaN fails too
            raise ValueError(
                f"tol = {self.tol} must be >= 0 (the relative FVU improvement below which the fit stops); null: never."
            )
        if self.time_budget is not None and not self.time_budget > 0:
            raise ValueError(f"time_budget = {self.time_budget} must be > 0 seconds; null: no time limit.")
        if self.duplicate_threshold is not None and not 0 < self.duplicate_threshold <= 1:
            raise ValueError(
                f"duplicate_threshold = {self.duplicate_threshold} must be in (0, 1] (an |cos| between two atoms, "
                "e.g. 0.95); null: no near-duplicate replacement."
            )
