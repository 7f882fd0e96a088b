"""Make Triton's interpreter fold reductions and scans in the order compiled code does.

The interpreter folds every ``tl.reduce`` strictly in sequence order, so a combine that is associative but
not commutative passes there and is wrong once compiled. Compiled, each thread first folds the elements it
holds (strided: t, t + lanes, t + 2 lanes, ...), then lanes are folded in butterfly order (lane i takes
lane i ^ s, for s = lanes/2 ... 1). ``compiled_order()`` patches the interpreter to do exactly that for
generic reduces and for sums, and to run generic scans as a Hillis-Steele doubling scan (order-preserving,
but associated like a parallel scan rather than left to right). Vectorised over the other axes, it is
also much faster than the interpreter's element-by-element fallback.
"""
from __future__ import annotations

import contextlib

import numpy as np
import triton.language as tl
from triton.runtime import interpreter as interp

LANES = 8  # threads along the reduced axis; a (.., 64, ..) tile then holds 8 strided steps per thread


def _wrap(op, arrays, dtypes):
    return tuple(op.to_tensor(a, d) for a, d in zip(arrays, dtypes))


def _combine(op, acc, other, dtypes):
    """combine_fn over whole numpy blocks (the interpreter's tl ops are elementwise numpy)."""
    out = op.combine_fn.fn(*_wrap(op, acc, dtypes), *_wrap(op, other, dtypes))
    out = out if isinstance(out, tuple) else (out,)
    return [np.broadcast_to(o.handle.data, acc[0].shape).astype(a.dtype) for o, a in zip(out, acc)]


def _fold_compiled_order(op, arrays, dtypes, combine):
    """arrays: the reduced axis last, length n (a power of two). Per-thread strided folds, then butterfly."""
    n = arrays[0].shape[-1]
    lanes = min(LANES, n)
    per = n // lanes
    # element i * lanes + j belongs to thread j: (..., per, lanes)
    blocks = [a.reshape(*a.shape[:-1], per, lanes) for a in arrays]
    acc = [b[..., 0, :] for b in blocks]
    for i in range(1, per):
        acc = combine(op, acc, [b[..., i, :] for b in blocks], dtypes)
    s = lanes // 2
    while s >= 1:
        partner = [a[..., np.arange(lanes) ^ s] for a in acc]
        acc = combine(op, acc, partner, dtypes)
        s //= 2
    return [a[..., 0] for a in acc]


def _add(op, acc, other, dtypes):
    return [a + o for a, o in zip(acc, other)]


def _reduce(self, input):
    combine = None
    if self.combine_fn is tl.standard._sum_combine:
        combine = _add
    elif self.combine_fn not in (tl.standard._elementwise_max, tl.standard._elementwise_min,
                                 tl.standard._argmin_combine_tie_break_left, tl.standard._argmax_combine_tie_break_left,
                                 tl.standard._argmin_combine_tie_break_fast, tl.standard._argmax_combine_tie_break_fast):
        combine = _combine
    if combine is None or self.axis is None:
        return _ORIGINAL_REDUCE(self, input)
    dtypes = [t.dtype for t in input]
    arrays = [np.moveaxis(t.handle.data, self.axis, -1) for t in input]
    out = _fold_compiled_order(self, arrays, dtypes, combine)
    if self.keep_dims:
        out = [np.expand_dims(o, self.axis) for o in out]
    return [self.to_tensor(o, d) for o, d in zip(out, dtypes)]


def _scan(self, input):
    if self.combine_fn in (tl.standard._sum_combine, tl.standard._prod_combine):
        return _ORIGINAL_SCAN(self, input)
    dtypes = [t.dtype for t in input]
    arrays = [np.moveaxis(t.handle.data, self.axis, -1) for t in input]
    if self.reverse:
        arrays = [a[..., ::-1] for a in arrays]
    n, k = arrays[0].shape[-1], 1
    while k < n:  # x[i] <- combine(x[i - k], x[i]): earlier operand first, as the scan's order requires
        # (on whole rows rolled by k: the interpreter's blocks must keep power-of-two shapes)
        both = _combine(self, [np.roll(a, k, -1) for a in arrays], arrays, dtypes)
        arrays = [np.concatenate([a[..., :k], c[..., k:]], -1) for a, c in zip(arrays, both)]
        k *= 2
    if self.reverse:
        arrays = [a[..., ::-1] for a in arrays]
    return [self.to_tensor(np.ascontiguousarray(np.moveaxis(a, -1, self.axis)), d) for a, d in zip(arrays, dtypes)]


_ORIGINAL_REDUCE = interp.ReduceOps.apply_impl
_ORIGINAL_SCAN = interp.ScanOps.apply_impl


@contextlib.contextmanager
def compiled_order():
    """Inside: the interpreter reduces and scans in the compiled code's order (see the module docstring)."""
    interp.ReduceOps.apply_impl = _reduce
    interp.ScanOps.apply_impl = _scan
    try:
        yield
    finally:
        interp.ReduceOps.apply_impl = _ORIGINAL_REDUCE
        interp.ScanOps.apply_impl = _ORIGINAL_SCAN
