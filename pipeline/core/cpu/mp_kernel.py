"""The compiled matching-pursuit loop (numba), the coder's kernel on CPU; its driver is
:mod:`pipeline.core.cpu.mp_driver`. It calls nothing outside this file (numba's cache check sees every change).

Every function here works on one sample's correlation row ``c: (K,)`` at a time, in place. The largest c is
found as the largest of c's bit patterns read as signed integers of the same width (``bits``, a view of c made
inside the compiled code, so the compiler sees that the two alias): positive floats order as their bit
patterns, and negative ones come below every positive one, which is all a non-negative pick needs. The largest
|c| is the largest pattern with the sign bit masked off. Integer maxima vectorise; float maxima with an index
do not, and this is what makes the loop run at the speed of memory.
"""

from __future__ import annotations

import numba
import numpy as np

#: Entries per block of the argmax search: a vectorised any-equal over the block, then a scan inside it.
BLOCK = 256


@numba.njit(nogil=True, cache=True)
def _find(bits, key, mask, start):
    """First ``j >= start`` with ``bits[j] & mask == key``, or ``len(bits)``."""
    K = bits.shape[0]
    j0 = start
    while j0 + BLOCK <= K:
        block = bits[j0 : j0 + BLOCK]
        hit = False
        for j in range(BLOCK):
            hit |= (block[j] & mask) == key
        if hit:
            break
        j0 += BLOCK
    for j in range(j0, K):
        if (bits[j] & mask) == key:
            return j
    return K


@numba.njit(nogil=True, cache=True)
def _pick(bits, best, mask, every, nonnegative):
    """The greedy choice, as the torch loop makes it: the first index of the largest c (``best`` is its bit
    pattern); signed (``best`` the largest |c|'s masked pattern): the first index of the largest |c|, except that
    a +x anywhere wins over a -x of the same magnitude (the torch loop takes the max when ``max >= -min``)."""
    K = bits.shape[0]
    if nonnegative:
        return _find(bits, best, every, 0)
    p = _find(bits, best, mask, 0)
    if bits[p] != best:  # the first of that magnitude is negative: a positive one later wins
        q = _find(bits, best, every, p + 1)
        if q < K:
            return q
    return p


@numba.njit(nogil=True, cache=True)
def _largest(bits, mask, nonnegative):
    """The largest pattern of ``bits`` (signed: with the sign masked off)."""
    best = bits[0] if nonnegative else bits[0] & mask
    if nonnegative:
        for j in range(1, bits.shape[0]):
            best = max(best, bits[j])
    else:
        for j in range(1, bits.shape[0]):
            best = max(best, bits[j] & mask)
    return best


@numba.njit(nogil=True, cache=True)
def _update(c, g, a, masks, nonnegative):
    """``c -= a g`` and the largest pattern after it (signed: with the sign masked off), in one pass.

    The bit view is made here, beside the loop that writes c: made by the caller and passed in, the compiler
    could not tell that it aliases c, and the loop would run scalar."""
    bits = c.view(masks.dtype)
    mask = masks[0]
    if nonnegative:
        c[0] = c[0] - a * g[0]
        best = bits[0]
        for j in range(1, c.shape[0]):
            c[j] = c[j] - a * g[j]
            best = max(best, bits[j])
    else:
        best = bits[0] & 0  # masked patterns are >= 0
        for j in range(c.shape[0]):
            c[j] = c[j] - a * g[j]
            best = max(best, bits[j] & mask)
    return best


@numba.njit(nogil=True, cache=True)
def _under(e, th, strict):
    """The rtol test of :func:`pipeline.core.coders._under_rtol`: ``e < th or e <= 0`` (KSVD.jl's, strict) or
    ``e <= th``."""
    return (e < th or e <= 0) if strict else e <= th


@numba.njit(nogil=True, cache=True)
def _residual_energy(y, D, idx, val, count, r):
    """``‖y − Σ_s val[s] D[idx[s]]‖²`` over the first ``count`` slots, accumulated in fp64 in ``r: (d,)``."""
    for t in range(y.shape[0]):
        r[t] = y[t]
    for s in range(count):
        a = np.float64(val[s])
        row = D[idx[s]]
        for t in range(y.shape[0]):
            r[t] -= a * row[t]
    e = 0.0
    for t in range(y.shape[0]):
        e += r[t] * r[t]
    return e


@numba.njit(nogil=True, cache=True)
def mp_rows(
    C, G, masks, norm2, thresh, k, max_iter, nonnegative, reference_rules, out_idx, out_val, Y, D, band, lo, hi
):
    """Matching pursuit on rows ``lo:hi`` of ``C: (m, K)`` (consumed), writing ``out_idx, out_val: (m, k+1)``.

    ``masks`` holds two integers of C's width, all bits but the sign and all bits (its dtype types the bit view);
    ``norm2, thresh: (m,)`` are ``‖y‖²`` and ``rtol² ‖y‖²``. The rules are :func:`pipeline.core.coders._mp_loop`'s.
    With ``reference_rules``, a row whose running energy is at most ``band[i]`` has its residual energy recomputed
    from ``Y: (m, d)``, ``D: (K, d)`` and its support (:func:`pipeline.core.coders._residual_energy`) for the test.
    """
    mask, every = masks[0], masks[1]
    r = np.empty(Y.shape[1], dtype=np.float64)
    for i in range(lo, hi):
        c = C[i]
        bits = c.view(masks.dtype)
        e = norm2[i]
        th = thresh[i]
        idx = out_idx[i]
        val = out_val[i]
        if norm2[i] <= 0 or _under(e, th, reference_rules):
            continue
        count = 0
        best = _largest(bits, mask, nonnegative)
        for step in range(max_iter):
            p = _pick(bits, best, mask, every, nonnegative)
            a = c[p]
            if nonnegative and not a > 0:
                break
            best = _update(c, G[p], a, masks, nonnegative)
            e = e - a * a
            pos = count
            for s in range(count):
                if idx[s] == p:
                    pos = s
                    break
            if pos == count:
                idx[pos] = p
                val[pos] = a
                count += 1
            else:
                val[pos] += a
            if reference_rules and e <= band[i]:  # near the threshold: KSVD.jl's ‖r‖, not the running energy
                under = _under(_residual_energy(Y[i], D, idx, val, count, r), th, True)
            else:
                under = _under(e, th, reference_rules)
            if count > k:
                if reference_rules and (under or step == max_iter - 1):
                    break  # KSVD.jl tests the residual first: k + 1 atoms stay
                drop = 0
                smallest = abs(val[0])
                for s in range(1, k + 1):
                    if abs(val[s]) < smallest:
                        smallest = abs(val[s])
                        drop = s
                idx[drop] = idx[k]
                val[drop] = val[k]
                idx[k] = 0
                val[k] = 0
                break
            if under:
                break
