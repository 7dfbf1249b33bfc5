"""Batched sparse coding over a dictionary: matching pursuit (the reference's coder) and Batch-OMP.

One module for both coders (~500 lines): they share the chunking, the correlations, the Gram rows, the
least-squares refit and the dispatch to the compiled loop, and each coder alone is ~150 lines.

Notation: samples as rows. ``Y: (n, d)``, atoms ``D: (K, d)`` with unit-norm rows, Gram ``G = D Dᵀ: (K, K)``.
Both coders work on correlations only: ``C = Y Dᵀ`` is formed in one matmul per chunk of samples and every
greedy step updates it with gathered rows of ``G``; no residual vectors are kept.

Matching pursuit (``method="mp"``), as KSVD.jl's ``matching_pursuit_`` does it, batched over samples:
pick ``j = argmax |c|`` (``nonnegative=True``: the largest *positive* c, so codes are >= 0), ``a = c_j``,
``x_j += a`` (an atom may be picked again), ``c -= a G[j]``, ``‖r‖² -= a²``. A row stops when
``‖r‖ <= rtol ‖y‖``, after ``max_iter`` (default 4k) steps, when no positive correlation is left (non-negative
mode), or when a (k+1)-th distinct atom enters, in which case the atom with the smallest |coefficient| is
dropped. Codes never hold more than k atoms.

``reference_rules=True`` applies KSVD.jl's stopping rules exactly as its loop orders them: each step begins with
the residual test ``‖r‖ == 0 or ‖r‖ < rtol ‖y‖`` (strict), then the support test (more than k distinct atoms: drop
the smallest |coefficient| and stop), then picks. So a sample whose (k+1)-th atom brings it under rtol, or that
reaches ``max_iter`` right after that atom entered, keeps k + 1 atoms, and codes are ``k + 1`` slots wide. KSVD.jl
tests the norm of its residual vector, not a running energy: near the threshold (:data:`EXACT_BAND`) each row's
residual ``y − Σ x_j d_j`` is recomputed from its support in fp64 and the test reads that, so a row is not
decided by the running energy's fp32 error (``‖y‖²`` is ~400 × the threshold at ``rtol = 0.05``, and atoms of norm
1 ± ε put ε Σ a² into it: rows within 1e-4 of the threshold flip, ``tests/core/test_reference.py``).

Batch-OMP (``method="omp"``, Rubinstein, Zibulevsky & Elad 2008): same selection rule, coefficients are the
least-squares fit on the support via a progressive Cholesky factor of ``G`` restricted to the support.

``refit=True`` re-solves least squares on the final support (the reference's SAEBench wrapper does this at
evaluation time); in non-negative mode negative coefficients are removed by a small active-set loop.

Speed: on CPU, MP runs as a compiled per-sample loop (``kernel``, :mod:`pipeline.core.cpu`) whose
correlation row stays in cache, several times faster than the batched loop (BENCHMARKS.md (e)). The batched
tensor loop (GPUs, candidate lists) moves the (n, K) correlation block once or twice through memory every step,
so large K is memory-bound. ``candidates=M`` restricts the greedy loop, after two steps on all atoms, to each sample's M
largest correlations (an approximation that is exact whenever the greedy choice never leaves that set; its
effect on the reconstruction is measured in BENCHMARKS.md). ``precision`` selects the matmul for ``Y Dᵀ`` ("fp32",
"tf32" or "bf16" tensor cores); the greedy loop always accumulates in fp32 (fp64 for fp64 input).

Length (~400 lines): both coders, with the helpers they share (correlations, chunk sizing, the least-squares
refit on a support), stay in one module so that one entry point, :func:`encode`, dispatches between them.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.core.codes import Codes
from pipeline.core.cpu import mp_driver, runtime
from pipeline.core.cpu.runtime import KERNELS
from pipeline.core.validation import check_atoms, check_samples, check_sparsity
from pipeline.utils.devices import free_memory

Method = Literal["mp", "omp"]
Precision = Literal["fp32", "tf32", "bf16"]
Kernel = Literal["auto", "torch", "numba"]

#: How often (in greedy steps) the MP loop checks whether every row has stopped, and compacts.
_CHECK_EVERY = 4
#: With ``candidates``, greedy steps taken on all atoms before each sample's candidate list is drawn.
_CANDIDATE_WARMUP = 2
#: ``reference_rules``: rows whose running energy ``‖y‖² − Σ a²`` is below ``(4 rtol² + EXACT_BAND) ‖y‖²`` take the
#: rtol test on their recomputed residual (:func:`exact_band`). The running energy's error (cancellation against
#: ‖y‖², atoms of norm 1 ± ε, the drift of the correlations) is a few 1e-7 ‖y‖² per step in fp32, so no row is
#: decided on it.
EXACT_BAND = 1e-3


def encode(
    Y: Tensor,
    D: Tensor,
    k: int,
    method: Method = "mp",
    nonnegative: bool = True,
    rtol: float = 0.05,
    refit: bool = False,
    max_iter: int | None = None,
    reference_rules: bool = False,
    *,
    G: Tensor | None = None,
    chunk_size: int | None = None,
    candidates: int | None = None,
    precision: Precision = "fp32",
    kernel: Kernel = "auto",
    validate: bool = True,
) -> Codes:
    """Sparse-code ``Y: (n, d)`` over unit-norm atoms ``D: (K, d)`` with at most ``k`` atoms per sample.

    Args:
        Y: (n, d) samples (any float dtype; computed in fp32, or fp64 when Y is fp64).
        D: (K, d) atoms with unit-norm rows, on the device where the work should run.
        k: maximum number of distinct atoms per sample.
        method: ``"mp"`` (matching pursuit, the reference) or ``"omp"`` (Batch-OMP).
        nonnegative: pick only positive correlations, so codes are >= 0 (SAE convention). ``False`` is the
            reference's signed coder.
        rtol: stop a sample once ``‖residual‖ <= rtol ‖y‖`` (reference default 0.05; 0 disables).
        refit: least-squares refit of the coefficients on the final support.
        max_iter: MP step cap (default ``4 k``, as the reference); ignored by OMP.
        reference_rules: KSVD.jl's stopping rules exactly (module docstring): strict rtol test before the
            support test, so codes are ``k + 1`` wide and a sample may keep k + 1 atoms. MP only.
        G: optional precomputed ``D Dᵀ`` (K, K) in the compute dtype.
        chunk_size: samples per chunk; default chosen from free memory.
        candidates: after two steps on all atoms, restrict MP's greedy loop to each sample's ``candidates``
            largest correlations (GPU speed; approximate).
        precision: matmul precision of ``Y Dᵀ``: ``"fp32"``, ``"tf32"`` or ``"bf16"``.
        kernel: MP's greedy loop: ``"numba"`` (compiled, one pass per step over each sample's own correlation
            row, :mod:`pipeline.core.cpu`; CPU, all atoms), ``"torch"`` (batched tensor ops, any device,
            the only one with ``candidates``), or ``"auto"``: numba wherever it applies. Both give the same codes
            up to the rounding of a multiply-add.
        validate: check the inputs (NaN/Inf, shapes, unit norm); disable only in trusted inner loops.

    Returns:
        :class:`~pipeline.core.codes.Codes` with ``indices, values: (n, k)`` (``(n, k + 1)`` with
        ``reference_rules``) on ``D``'s device.
    """
    K, d = D.shape
    if validate:
        check_atoms(D)
        check_samples(Y, d=d)
        check_sparsity(k, K, d)
        if method not in ("mp", "omp"):
            raise ValueError(f"method must be 'mp' or 'omp', got {method!r}.")
        if precision not in ("fp32", "tf32", "bf16"):
            raise ValueError(f"precision must be 'fp32', 'tf32' or 'bf16', got {precision!r}.")
        if rtol < 0:
            raise ValueError(f"rtol = {rtol} must be >= 0 (0 disables the residual stop).")
        if candidates is not None and not (k < candidates):
            raise ValueError(f"candidates = {candidates} must exceed k = {k} (or be None for all atoms).")
        if reference_rules and method != "mp":
            raise ValueError("reference_rules are matching pursuit's (KSVD.jl's); use method='mp'.")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}.")
    dtype = torch.float64 if Y.dtype == torch.float64 else torch.float32
    device = D.device
    Dc = D.to(dtype)
    if G is None:
        G = gram(Dc)
    if candidates is not None and candidates >= K:
        candidates = None
    max_iter = 4 * k if max_iter is None else max_iter
    compiled = _use_compiled(kernel, method, device, candidates)
    n = Y.shape[0]
    if chunk_size is None:
        chunk_size = auto_chunk_size(K, k, method, candidates, device, bytes_per=torch.finfo(dtype).bits // 8)
    parts = []
    for start in range(0, n, chunk_size):
        Yc = Y[start : start + chunk_size].to(device=device, dtype=dtype)
        C0 = correlations(Yc, Dc, precision)
        if method == "mp":
            codes = _mp_chunk(
                Yc, C0, Dc, G, k, nonnegative, rtol, refit, max_iter, candidates, reference_rules, compiled
            )
        else:
            codes = _omp_chunk(Yc, C0, G, k, nonnegative, rtol)
        parts.append(codes)
    if not parts:
        empty = torch.zeros(0, k + int(reference_rules), device=device)
        return Codes(empty.long(), empty.to(dtype))
    return Codes.cat(parts)


def _use_compiled(kernel: str, method: str, device: torch.device, candidates: int | None) -> bool:
    """Whether MP runs the compiled per-sample loop (:mod:`pipeline.core.cpu`) for ``kernel``."""
    if method != "mp":
        return False
    return runtime.use(
        kernel,
        device.type == "cpu" and candidates is None,
        f"kernel='numba' runs matching pursuit on CPU over all atoms; here device={device}, "
        f"candidates={candidates}. Use kernel='torch' or 'auto'.",
    )


def gram(D: Tensor, precision: Precision = "fp32") -> Tensor:
    """(K, K) Gram matrix ``D Dᵀ``; fp32 by default, ``"tf32"``/``"bf16"`` use tf32 tensor cores (CUDA).

    The diagonal is set to exactly 1 (the atoms are unit norm), so a picked atom's correlation drops to 0.
    """
    with _matmul_precision("tf32" if precision in ("tf32", "bf16") else "fp32"):
        G = D @ D.T
    return G.fill_diagonal_(1.0)


def correlations(Y: Tensor, D: Tensor, precision: Precision = "fp32") -> Tensor:
    """(n, K) ``Y Dᵀ`` in Y's dtype, with the matmul run at ``precision``.

    At reduced precision the rows' mean ``μ`` is split off first: ``Y Dᵀ = (Y − μ) Dᵀ + μ Dᵀ`` with the
    second term in full fp32, so the rounding error scales with the samples' spread, not with a large shared
    direction (residual streams carry one whose norm dwarfs the rest).
    """
    if precision == "fp32" or Y.dtype == torch.float64:
        with _matmul_precision("fp32"):
            return Y @ D.T
    mu = Y.mean(dim=0, keepdim=True)
    with _matmul_precision("fp32"):
        shared = mu @ D.T
    if precision == "bf16":
        C = (Y - mu).to(torch.bfloat16) @ D.to(torch.bfloat16).T
        return C.to(Y.dtype).add_(shared)
    with _matmul_precision("tf32"):
        return ((Y - mu) @ D.T).add_(shared)


@contextlib.contextmanager
def _matmul_precision(precision: str):
    """Temporarily allow or forbid tf32 in CUDA matmuls."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def auto_chunk_size(
    K: int, k: int, method: str, candidates: int | None, device: torch.device, bytes_per: int = 4
) -> int:
    """Samples per chunk so that the coder's working set fits comfortably in free memory.

    Per sample the MP coder holds its correlation row (K or ``candidates`` values) plus one gathered Gram row;
    OMP also keeps a k × k Cholesky factor. CPU chunks stay near the size of the last-level cache.
    """
    width = candidates if candidates is not None else K
    per_row = bytes_per * (3 * width + (k * k if method == "omp" else 0)) + 8 * width + 64 * k
    per_row += bytes_per * K  # the initial correlation block
    if device.type == "cuda":
        budget, cap = free_memory(device) // 3, 1 << 17
    else:
        budget, cap = min(free_memory(device) // 4, 96 << 20), 4096
    return int(max(16, min(cap, budget // per_row)))


# ----------------------------------------------------------------------------------------------------------
# matching pursuit
# ----------------------------------------------------------------------------------------------------------


def _mp_chunk(
    Y: Tensor,
    C0: Tensor,
    D: Tensor,
    G: Tensor,
    k: int,
    nonnegative: bool,
    rtol: float,
    refit: bool,
    max_iter: int,
    candidates: int | None,
    reference_rules: bool = False,
    compiled: bool = False,
) -> Codes:
    """Matching pursuit on one chunk. ``C0: (m, K)`` initial correlations, consumed in place.

    ``compiled`` runs the per-sample compiled loop (:func:`pipeline.core.cpu.mp_driver.mp_codes`) instead of the
    batched tensor loop below.

    With ``candidates``, the first :data:`_CANDIDATE_WARMUP` steps run on all K atoms (they remove the large
    shared directions, e.g. a residual stream's mean, that would otherwise fill every sample's candidate list
    with the same atoms); then each sample keeps its ``candidates`` largest current correlations.
    """
    width = k + 1 if reference_rules else k
    norm2 = Y.pow(2).sum(dim=1)
    if compiled:
        out_idx, out_val = mp_driver.mp_codes(
            C0, G, norm2, rtol, k, max_iter, nonnegative, reference_rules, Y, D, exact_band(norm2, rtol)
        )
    else:
        out_idx, out_val = _mp_loop(Y, C0, D, G, k, nonnegative, rtol, max_iter, candidates, reference_rules)
    indices, values = out_idx[:, :width], out_val[:, :width]
    if refit:
        values = refit_coefficients(G, indices, values, support_correlations(Y, D, indices), nonnegative)
    return Codes(indices, values)


def _mp_loop(
    Y: Tensor,
    C0: Tensor,
    D: Tensor,
    G: Tensor,
    k: int,
    nonnegative: bool,
    rtol: float,
    max_iter: int,
    candidates: int | None,
    reference_rules: bool,
) -> tuple[Tensor, Tensor]:
    """The batched tensor loop of :func:`_mp_chunk`: ``(m, k + 1)`` atom ids and coefficients. ``Y: (m, d)`` and
    ``D: (K, d)`` are read only with ``reference_rules``, for the exact residual near the threshold."""
    m, K = C0.shape
    device, dtype = C0.device, C0.dtype
    C, S = C0, None
    norm2 = Y.pow(2).sum(dim=1)
    energy = norm2.clone()
    thresh = (rtol * rtol) * norm2
    band = exact_band(norm2, rtol)
    # per-row support table: atom ids and accumulated coefficients, k+1 slots
    slot_atom = torch.zeros(m, k + 1, dtype=torch.long, device=device)
    slot_val = torch.zeros(m, k + 1, dtype=dtype, device=device)
    count = torch.zeros(m, dtype=torch.long, device=device)
    done = (norm2 <= 0) | _under_rtol(energy, thresh, reference_rules)
    live = torch.arange(m, device=device)  # chunk rows still in the working set
    out_idx = torch.zeros(m, k + 1, dtype=torch.long, device=device)
    out_val = torch.zeros(m, k + 1, dtype=dtype, device=device)
    slot_ids = torch.arange(k + 1, device=device)
    Gflat = G.reshape(-1)
    for step in range(max_iter):
        if candidates is not None and S is None and step == min(_CANDIDATE_WARMUP, max_iter - 1):
            S = (C if nonnegative else C.abs()).topk(candidates, dim=1).indices  # (m, M) atom ids
            C = C.gather(1, S)
        if step % _CHECK_EVERY == 0 and step > 0:
            n_done = int(done.sum())
            if n_done == done.numel():
                break
            if n_done > 0.5 * done.numel() and done.numel() > 64:
                out_idx[live[done]] = slot_atom[done]
                out_val[live[done]] = slot_val[done]
                keep = ~done
                live, C, slot_atom, slot_val = live[keep], C[keep], slot_atom[keep], slot_val[keep]
                count, energy, thresh, band, done = count[keep], energy[keep], thresh[keep], band[keep], done[keep]
                if S is not None:
                    S = S[keep]
        rows = torch.arange(C.shape[0], device=device)
        if nonnegative:
            a, p = C.max(dim=1)
            done = done | (a <= 0)
        else:
            hi, p_hi = C.max(dim=1)
            lo, p_lo = C.min(dim=1)
            p = torch.where(hi >= -lo, p_hi, p_lo)
            a = torch.where(hi >= -lo, hi, lo)
        a = torch.where(done, torch.zeros_like(a), a)
        was_done = done
        if S is None:
            atom = p
            C.addcmul_(G.index_select(0, atom), a[:, None], value=-1)
        else:
            atom = S.gather(1, p[:, None]).squeeze(1)
            C.addcmul_(Gflat.take(atom[:, None] * K + S), a[:, None], value=-1)
        energy = energy - a * a
        # add a to the slot holding this atom, or open a new slot
        match = (slot_atom == atom[:, None]) & (slot_ids[None, :] < count[:, None])
        has = match.any(dim=1)
        pos = torch.where(has, match.to(torch.uint8).argmax(dim=1), count.clamp(max=k))
        slot_val[rows, pos] += a
        slot_atom[rows, pos] = torch.where(done, slot_atom[rows, pos], atom)
        count = count + (~has & ~done).long()
        # a (k+1)-th distinct atom: drop the smallest |coefficient| and stop the row. The reference tests the
        # residual first, and only at the start of a next step: under rtol, or at max_iter, k + 1 atoms stay.
        over = count > k
        if reference_rules:
            under = _under_rtol(energy, thresh, True)
            near = (~done & (energy <= band)).nonzero().squeeze(1)  # KSVD.jl's ‖r‖ decides near the threshold
            if near.numel():
                used = int(count[near].max())  # the slots beyond every near row's count hold 0
                exact = _residual_energy(Y[live[near]], D, slot_atom[near, :used], slot_val[near, :used])
                under[near] = _under_rtol(exact, thresh[near].to(exact.dtype), True)
            done = done | over | under
            over = over & ~was_done & ~under & (step < max_iter - 1)
        drop = slot_val.abs().argmin(dim=1)
        last_val, last_atom = slot_val[:, k].clone(), slot_atom[:, k].clone()
        slot_val[rows, drop] = torch.where(over, last_val, slot_val[rows, drop])
        slot_atom[rows, drop] = torch.where(over, last_atom, slot_atom[rows, drop])
        slot_val[:, k] = torch.where(over, torch.zeros_like(last_val), slot_val[:, k])
        slot_atom[:, k] = torch.where(over, torch.zeros_like(last_atom), slot_atom[:, k])
        count = torch.where(over, torch.full_like(count, k), count)
        done = done | over | (under if reference_rules else _under_rtol(energy, thresh, False))
    out_idx[live] = slot_atom
    out_val[live] = slot_val
    return out_idx, out_val


def _under_rtol(energy: Tensor, thresh: Tensor, strict: bool) -> Tensor:
    """Rows whose residual energy ``‖r‖²`` passes the rtol test against ``thresh = rtol² ‖y‖²``: KSVD.jl's
    ``‖r‖ == 0 or ‖r‖ < rtol ‖y‖`` when ``strict`` (the running energy can round just below 0), else ``<=``."""
    return (energy < thresh) | (energy <= 0) if strict else energy <= thresh


def exact_band(norm2: Tensor, rtol: float) -> Tensor:
    """(m,) the running energies at or below which ``reference_rules`` recompute the residual for the rtol test:
    ``4 rtol² ‖y‖² + EXACT_BAND ‖y‖²`` (``‖r‖`` within about twice the threshold), from ``norm2: (m,)``."""
    return (4 * rtol * rtol + EXACT_BAND) * norm2


def _residual_energy(Y: Tensor, D: Tensor, atoms: Tensor, values: Tensor) -> Tensor:
    """(b,) ``‖y − Σ_s values[:, s] D[atoms[:, s]]‖²`` in fp64 for ``Y: (b, d)`` over their support ``atoms, values:
    (b, s)`` (empty slots hold value 0): the residual KSVD.jl forms, one slot at a time ((b, d) memory)."""
    R = Y.to(torch.float64)
    for s in range(atoms.shape[1]):
        R = R - values[:, s, None].to(torch.float64) * D[atoms[:, s]].to(torch.float64)
    return R.pow(2).sum(dim=1)


# ----------------------------------------------------------------------------------------------------------
# least-squares refit on a fixed support
# ----------------------------------------------------------------------------------------------------------


def support_gram(G: Tensor, indices: Tensor) -> Tensor:
    """(m, k, k) ``G[S, S]`` for each row's support ``indices: (m, k)``."""
    K = G.shape[0]
    flat = indices[:, :, None] * K + indices[:, None, :]
    return G.reshape(-1).take(flat)


def support_correlations(Y: Tensor, D: Tensor, indices: Tensor, block: int = 1024) -> Tensor:
    """(m, k) ``⟨y_i, d_j⟩`` for each row's support ``indices: (m, k)``, in row blocks (bounded memory)."""
    out = torch.empty(indices.shape, dtype=Y.dtype, device=Y.device)
    for s in range(0, Y.shape[0], block):
        atoms = D[indices[s : s + block]]  # (b, k, d)
        out[s : s + block] = torch.bmm(atoms, Y[s : s + block].unsqueeze(-1)).squeeze(-1)
    return out


def refit_coefficients(
    G: Tensor, indices: Tensor, values: Tensor, c0: Tensor, nonnegative: bool, max_rounds: int = 8
) -> Tensor:
    """Least-squares coefficients on each row's support (slots with value 0 are unused).

    Args:
        G: (K, K) Gram matrix.
        indices, values: (m, k) current support and coefficients.
        c0: (m, k) correlations ``⟨y, d_j⟩`` of each sample with its support atoms.
        nonnegative: drop atoms whose least-squares coefficient is negative and re-solve (active set).

    Returns:
        (m, k) refitted coefficients (0 in unused or dropped slots).
    """
    valid = values != 0
    Gs = support_gram(G, indices)
    x = values
    for _ in range(max_rounds):
        x = _masked_solve(Gs, c0, valid)
        if not nonnegative:
            break
        neg = valid & (x < 0)
        if not bool(neg.any()):
            break
        valid = valid & ~neg
    if nonnegative:
        x = x.clamp(min=0)
    return x


def _masked_solve(Gs: Tensor, c: Tensor, valid: Tensor) -> Tensor:
    """Solve ``Gs[v, v] x_v = c_v`` per row on the valid slots v; x is 0 elsewhere."""
    k = Gs.shape[-1]
    eye = torch.eye(k, dtype=Gs.dtype, device=Gs.device)
    pair = valid[:, :, None] & valid[:, None, :]
    A = torch.where(pair, Gs, torch.zeros_like(Gs)) + torch.where(valid[:, :, None], 0.0, 1.0) * eye
    # a tiny ridge keeps near-duplicate supports solvable without changing well-posed solutions visibly
    A = A + (1e-6 if Gs.dtype == torch.float32 else 1e-12) * eye
    rhs = torch.where(valid, c, torch.zeros_like(c)).unsqueeze(-1)
    L, info = torch.linalg.cholesky_ex(A)
    x = torch.cholesky_solve(rhs, L).squeeze(-1)
    bad = info != 0
    if bool(bad.any()):
        x[bad] = torch.linalg.lstsq(A[bad], rhs[bad]).solution.squeeze(-1)
    return torch.where(valid, x, torch.zeros_like(x))


# ----------------------------------------------------------------------------------------------------------
# Batch-OMP
# ----------------------------------------------------------------------------------------------------------


def _omp_chunk(Y: Tensor, C0: Tensor, G: Tensor, k: int, nonnegative: bool, rtol: float) -> Codes:
    """Batch-OMP on one chunk: progressive Cholesky of ``G`` on the support, correlations only.

    Each step recomputes ``c = C0 − G[S] x_S`` straight from the rows of G (an embedding-bag sum, no copies
    of Gram rows), adds the best atom to the factor ``L L^T = G[S, S]`` and re-solves ``x_S``.
    """
    m, K = C0.shape
    device, dtype = C0.device, C0.dtype
    norm2 = Y.pow(2).sum(dim=1)
    thresh = (rtol * rtol) * norm2
    idx = torch.zeros(m, k, dtype=torch.long, device=device)
    L = torch.zeros(m, k, k, dtype=dtype, device=device)
    x_out = torch.zeros(m, k, dtype=dtype, device=device)
    c0s_all = torch.zeros(m, k, dtype=dtype, device=device)  # C0 at the support (0 where no atom was added)
    active = (norm2 > 0) & (norm2 > thresh)
    c = C0
    Gflat = G.reshape(-1)
    tiny = 1e-6 if dtype == torch.float32 else 1e-12
    for t in range(k):
        if not bool(active.any()):
            break
        if t > 0:  # selected atoms are orthogonal to the residual; keep rounding from re-selecting them
            c.scatter_(1, idx[:, :t], 0.0)
        if nonnegative:
            a, j = c.max(dim=1)
            ok = a > 0
        else:
            hi, j_hi = c.max(dim=1)
            lo, j_lo = c.min(dim=1)
            j = torch.where(hi >= -lo, j_hi, j_lo)
            ok = torch.maximum(hi, -lo) > 0
        if t > 0:
            g = Gflat.take(idx[:, :t] * K + j[:, None]).unsqueeze(-1)  # (m, t, 1) = G[S, j]
            w = torch.linalg.solve_triangular(L[:, :t, :t], g, upper=False).squeeze(-1)
            diag2 = 1 - (w * w).sum(dim=1)
            ok = ok & (diag2 > tiny)
            L[:, t, :t] = torch.where((active & ok)[:, None], w, torch.zeros_like(w))
            L[:, t, t] = torch.where(active & ok, diag2.clamp(min=tiny).sqrt(), torch.ones_like(diag2))
        else:
            L[:, 0, 0] = 1
        active = active & ok
        idx[:, t] = torch.where(active, j, idx[:, t])
        c0s_all[:, t] = C0.gather(1, j[:, None]).squeeze(1) * active
        c0s = c0s_all[:, : t + 1]
        x = torch.cholesky_solve(c0s.unsqueeze(-1), L[:, : t + 1, : t + 1]).squeeze(-1)
        x_out[:, : t + 1] = torch.where(active[:, None], x, x_out[:, : t + 1])
        energy = norm2 - (x * c0s).sum(dim=1)
        c = C0 - F.embedding_bag(idx[:, : t + 1], G, per_sample_weights=x, mode="sum")
        active = active & (energy > thresh)
    values = x_out
    if nonnegative:
        values = _nonneg_from_ls(G, idx, values, C0)
    return Codes(idx, values)


def _nonneg_from_ls(G: Tensor, idx: Tensor, values: Tensor, C0: Tensor) -> Tensor:
    """Project least-squares codes to >= 0 with the active-set refit."""
    if not bool((values < 0).any()):
        return values
    return refit_coefficients(G, idx, values, C0.gather(1, idx), nonnegative=True)
