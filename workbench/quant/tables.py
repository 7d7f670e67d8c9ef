"""Code tables and bnb's decision thresholds, measured once per quant type.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from workbench.quant.bnb import _bnb_codes
from workbench.quant.config import QuantConfig, _check_config


@dataclass(frozen=True)
class _Tables:
    """Per-quant-type lookup tables, float32 / int64 on CPU.

    ``values[k]`` is code k's normalized value; ``rank[k]`` its position in ascending
    value order; the ``*_by_rank`` arrays are indexed by that position.
    """

    values: Tensor  # (K,)
    order: Tensor  # (K,) code indices sorted by value
    rank: Tensor  # (K,) inverse permutation of order
    midpoints: Tensor  # (K-1,) (v_j + v_{j+1}) / 2 in ascending value order
    thresholds: Tensor  # (K-1,) bnb's measured decision thresholds (see _measure_thresholds)
    upper_by_rank: Tensor  # (K,) upper threshold, +inf for the top code
    lower_by_rank: Tensor  # (K,) lower threshold, -inf for the bottom code
    width_by_rank: Tensor  # (K,) bin width (see BinGeometry)
    # the same, indexed by code: per-weight look-ups then need no rank gather
    upper_by_code: Tensor
    lower_by_code: Tensor
    width_by_code: Tensor


def _float_key(x: Tensor) -> Tensor:
    """float32 -> int64 whose order is the float order (+0 and -0 share key 0)."""
    bits = x.contiguous().view(torch.int32).long()
    return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)


def _key_float(key: Tensor) -> Tensor:
    bits = torch.where(key < 0, (-key) | 0x80000000, key)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # reinterpret as signed int32
    return bits.to(torch.int32).view(torch.float32)


def _ranks_at_unit_absmax(s: Tensor, qtype: str, rank: Tensor) -> Tensor:
    """Rank of bnb's code for normalized values ``s`` (each block pinned to absmax 1)."""
    per = 63
    nb = -(-s.numel() // per)
    body = torch.zeros(nb * per)
    body[: s.numel()] = s
    # w / 1.0 == w exactly, whether bnb divides or multiplies by 1/absmax
    x = torch.cat([torch.ones(nb, 1), body.view(nb, per)], dim=1)
    c = _bnb_codes(x.reshape(-1), QuantConfig(qtype, 64))  # type: ignore[arg-type]
    return rank[c.codes.view(nb, 64)[:, 1:].reshape(-1)[: s.numel()].long()]


def _measure_thresholds(qtype: str, rank: Tensor) -> Tensor:
    """For each j, the largest float32 ``s`` in [-1, 1] bnb maps to a code of rank <= j.

    Measured by bisection over float32 values with bnb itself (32 tiny calls), because
    kernels differ: bnb's pure-torch 4-bit kernel snaps to the exact midpoints, but its
    CPU 8-bit kernel finds codes with an approximate binary search whose thresholds sit
    off the midpoints for a fraction of the dynamic map. bnb's assignment is monotone in
    ``s``, so one threshold per adjacent pair describes it completely.
    """
    k = rank.numel()
    j = torch.arange(k - 1)
    lo = _float_key(torch.full((k - 1,), -1.0))  # -1 maps to rank 0 <= j
    hi = _float_key(torch.full((k - 1,), 1.0))  # +1 maps to rank K-1 > j
    while bool((hi - lo > 1).any()):
        active = hi - lo > 1
        mid = torch.div(lo + hi, 2, rounding_mode="floor")
        below = _ranks_at_unit_absmax(_key_float(mid), qtype, rank) <= j
        lo = torch.where(active & below, mid, lo)
        hi = torch.where(active & ~below, mid, hi)
    return _key_float(lo)


@cache
def _tables(qtype: str) -> _Tables:
    import bitsandbytes.functional as bnbf

    if qtype == "int8":
        values = bnbf.create_dynamic_map(signed=True).float()
    else:
        values = bnbf.get_4bit_type(qtype, device="cpu").float()
    # bnb 4-bit on CPU ranks codes with torch.argsort(code); FP4 has +0 (code 0) and -0
    # (code 8), and which of the two sits lower decides which one a tiny positive weight
    # gets. A stable sort reproduces bnb's order (checked in the tests).
    order = torch.argsort(values, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    v = values[order]
    mids = (v[:-1] + v[1:]) / 2  # bnb's own fp32 expression for its 4-bit bounds
    thresholds = _measure_thresholds(qtype, rank)
    inf = torch.tensor([math.inf])
    upper = torch.cat([thresholds, inf])
    lower = torch.cat([-inf, thresholds])
    # edge codes' intervals are clipped by the absmax at +-1; mirror the one neighbour
    # instead, so an edge bin is as wide as the gap to its neighbour
    lo_virtual = v[:1] - (v[1:2] - v[:1]) / 2
    hi_virtual = v[-1:] + (v[-1:] - v[-2:-1]) / 2
    width = torch.cat([mids, hi_virtual]) - torch.cat([lo_virtual, mids])
    by_code = (upper[rank], lower[rank], width[rank])
    return _Tables(values, order, rank, mids, thresholds, upper, lower, width, *by_code)


def _lookup(table: Tensor, codes: Tensor) -> Tensor:
    """``table[codes]`` for uint8 codes (int32 index_select: the cheapest gather on CPU)."""
    return table.to(codes.device).index_select(0, codes.int())


def code_table(cfg: QuantConfig) -> Tensor:
    """Normalized code values indexed by code, float32 ``(16,)`` or ``(256,)``.

    Dequantized weight = ``code_table(cfg)[code] * effective_absmax``. NF4 and int8 tables
    are ascending; FP4's is in bit-pattern order (see :func:`code_order`).
    """
    return _tables(_check_config(cfg).type).values.clone()


def decision_boundaries(cfg: QuantConfig) -> Tensor:
    """bnb's decision thresholds on the normalized scale, float32 ``(K-1,)``, ascending.

    Threshold ``j`` separates the codes ``code_order(cfg)[j]`` and ``[j + 1]``: a weight
    with ``w / absmax <= t_j`` gets the lower one. Measured from bnb (see module
    docstring): for NF4/FP4 these are exactly the midpoints between adjacent code values;
    for int8 on CPU, bnb's C kernel puts some of them off the midpoints.
    """
    return _tables(_check_config(cfg).type).thresholds.clone()


def code_order(cfg: QuantConfig) -> Tensor:
    """Code indices in ascending order of value, int64 ``(16,)`` or ``(256,)``.

    ``counts[code_order(cfg)]`` puts :func:`bin_histogram` bars in value order. Identity
    for NF4 and int8; for FP4 it places +0 (code 0) just below -0 (code 8), as bnb does.
    """
    return _tables(_check_config(cfg).type).order.clone()
