"""Where each weight sits in its quantization bin, bin occupancy, and quantization error.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, each
from workbench.quant.bnb import _bnb_codes, _check_weight, _layout, _per_weight, _unlayout
from workbench.quant.codes import _qdq
from workbench.quant.config import QuantConfig, _check_config
from workbench.quant.parameters import _check_names, _check_transposed
from workbench.quant.tables import _lookup, _tables


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class BinGeometry:
    """Where each weight sits inside its quantization bin; every field has the weight's shape.

    With ``s = w / absmax``, code values ``v_0 < ... < v_{K-1}`` in ascending order and
    bnb's decision thresholds ``t_0 <= ... <= t_{K-2}`` (:func:`decision_boundaries`;
    ``t_j = (v_j + v_{j+1}) / 2`` for NF4/FP4), a weight whose code has rank ``r`` has
    ``t_{r-1} < s <= t_r``.

    Attributes:
        code: uint8, bnb's code index.
        rank: int64, position of that code in ascending value order (== code for NF4/int8).
        absmax: float32, the exact absmax of the weight's block (decides codes; under
            double quantization the dequantization scale differs slightly, the codes don't).
        bin_width: float32, ``absmax * (v_{r+1} - v_{r-1}) / 2``: the mean of the two code
            gaps around the weight's code, i.e. the width of its decision interval when
            thresholds are midpoints. For the bottom and top codes, whose intervals are
            clipped at -1 / +1, it is ``absmax *`` the gap to their single neighbour. It
            depends on the code values only (the normalizer for ``|Δw| / bin width``). 0 in
            an all-zero block.
        to_upper: float32 >= 0, ``absmax * t_r - w``: any increase strictly larger moves the
            weight to a higher code (if the block absmax does not change); ``+inf`` for the
            top code, which no own move can leave.
        to_lower: float32 <= 0, ``absmax * t_{r-1} - w``: any change ``<= to_lower`` moves
            it to a lower code; ``-inf`` for the bottom code.
        is_block_max: bool, ``|w|`` equals its block's absmax: moving this weight rescales
            every code of the block.

    Distances are exact up to float32 rounding of ``w / absmax`` (a few ulps of ``w``).
    """

    code: Tensor
    rank: Tensor
    absmax: Tensor
    bin_width: Tensor
    to_upper: Tensor
    to_lower: Tensor
    is_block_max: Tensor


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class BinPlacement:
    """:class:`BinGeometry` without the distances to the boundaries, each field flat in the
    weight's own layout: what a caller holding millions of weights per tensor needs (MANSU's
    grid) for about half the temporaries. ``rank`` is int16 (codes number at most 256)."""

    code: Tensor
    rank: Tensor
    absmax: Tensor
    bin_width: Tensor
    is_block_max: Tensor


def bin_placement(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> BinPlacement:
    """Per weight (flat, in ``w``'s layout): code, rank, block absmax, bin width and whether it
    is its block's absmax; the very values :func:`bin_geometry` gives (one bnb call, look-ups)."""
    return unpack_placement(packed_placement(w, cfg, transposed=transposed), w)


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class PackedPlacement:
    """A :class:`BinPlacement` in about one byte per weight: what decides every field of it.

    Attributes:
        code: uint8, bnb's code of each weight, flat in the weight's own layout.
        block_absmax: float32 ``(n_blocks,)``, each block's exact absmax, in bnb's order.
        shape: the weight's shape; ``transposed``: blocks run along its transpose (Conv1D).
        cfg: the quantizer (its tables give rank and bin width from the code).

    Ranks and bin widths are look-ups on the code, the per-weight absmax a broadcast of the
    block's, and whether a weight is its block's absmax a comparison with the weight itself:
    :func:`unpack_placement` rebuilds them without the quantizer (MANSU keeps its candidates'
    grids this way, 1 byte per weight instead of 13).
    """

    code: Tensor
    block_absmax: Tensor
    shape: torch.Size
    transposed: bool
    cfg: QuantConfig

    def nbytes(self) -> int:
        return self.code.nbytes + self.block_absmax.nbytes


def packed_placement(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> PackedPlacement:
    """:class:`PackedPlacement` of ``w`` (one bnb call)."""
    cfg = _check_config(cfg)
    w = _check_weight(w, "weight")
    c = _bnb_codes(_layout(w, transposed, "weight"), cfg)
    return PackedPlacement(code=_own_flat(c.codes, w.shape, transposed), block_absmax=c.absmax,
                           shape=w.shape, transposed=transposed, cfg=cfg)


def unpack_placement(packed: PackedPlacement, w: Tensor) -> BinPlacement:
    """The :class:`BinPlacement` ``packed`` holds; ``w`` is the weight it was packed from."""
    if tuple(w.shape) != tuple(packed.shape):
        raise WorkbenchError(f"unpack_placement: weight of shape {tuple(w.shape)}, "
                             f"packed from one of shape {tuple(packed.shape)}")
    t = _tables(packed.cfg.type)
    in_bnb_order = _per_weight(packed.block_absmax, w.numel(), packed.cfg.blocksize)
    absmax = _own_flat(in_bnb_order, w.shape, packed.transposed)
    return BinPlacement(code=packed.code, rank=_lookup(t.rank.to(torch.int16), packed.code), absmax=absmax,
                        bin_width=_lookup(t.width_by_code, packed.code) * absmax,
                        is_block_max=w.reshape(-1).float().abs() == absmax)


def _own_flat(flat: Tensor, shape: torch.Size, transposed: bool) -> Tensor:
    """A flat tensor in bnb's order, flat in the weight's own layout (the transpose undone)."""
    return _unlayout(flat, shape if transposed else torch.Size([flat.numel()]), transposed).reshape(-1)


def _placement(x: Tensor, cfg: QuantConfig) -> BinPlacement:
    """:class:`BinPlacement` of ``x``, flat in bnb's quantization order, int64 ranks."""
    c = _bnb_codes(x, cfg)
    t = _tables(cfg.type)
    am = _per_weight(c.absmax, x.numel(), cfg.blocksize)
    return BinPlacement(code=c.codes, rank=_lookup(t.rank, c.codes), absmax=am,
                        bin_width=_lookup(t.width_by_code, c.codes) * am, is_block_max=x.float().abs() == am)


def bin_geometry(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> BinGeometry:
    """Per-weight code, block absmax, bin width and signed distances to the decision boundaries.

    One bnb quantize call, then table look-ups; see :class:`BinGeometry` for definitions.
    Distances are in weight units (float32).
    """
    cfg = _check_config(cfg)
    w = _check_weight(w, "weight")
    x = _layout(w, transposed, "weight")
    placed = _placement(x, cfg)
    t = _tables(cfg.type)
    xf = x.float()
    rank, am, c = placed.rank, placed.absmax, placed.code
    # inf * 0 (top code in an all-zero block) must stay inf, not nan
    top = t.values.numel() - 1
    upper = torch.where(rank == top, math.inf, _lookup(t.upper_by_code, c) * am - xf)
    lower = torch.where(rank == 0, -math.inf, _lookup(t.lower_by_code, c) * am - xf)
    shape = w.shape
    return BinGeometry(
        code=_unlayout(c, shape, transposed),
        rank=_unlayout(rank, shape, transposed),
        absmax=_unlayout(am, shape, transposed),
        bin_width=_unlayout(placed.bin_width, shape, transposed),
        to_upper=_unlayout(upper, shape, transposed),
        to_lower=_unlayout(lower, shape, transposed),
        is_block_max=_unlayout(placed.is_block_max, shape, transposed),
    )


def bin_histogram(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> np.ndarray:
    """Number of weights per code, int64 ``(16,)`` or ``(256,)``, indexed by code.

    Index ``k`` counts code ``k`` (value ``code_table(cfg)[k]``); use
    ``counts[code_order(cfg)]`` for bars in value order (matters for FP4 only).
    """
    cfg = _check_config(cfg)
    return _histogram(_check_weight(w, "weight"), cfg, transposed)


def _histogram(w: Tensor, cfg: QuantConfig, transposed: bool) -> np.ndarray:
    c = _bnb_codes(_layout(w, transposed, "weight"), cfg)
    return torch.bincount(c.codes.long(), minlength=cfg.n_codes).cpu().numpy().astype(np.int64)


def bin_occupancy(
    state: Mapping[str, Tensor],
    names: Iterable[str],
    cfg: QuantConfig,
    *,
    transposed: Collection[str] = (),
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """:func:`bin_histogram` of every named weight, plus their sum under the key ``"overall"``."""
    cfg = _check_config(cfg)
    names = _check_names(state, names)
    tr = _check_transposed(transposed)
    out: dict[str, np.ndarray] = {}
    total = np.zeros(cfg.n_codes, dtype=np.int64)
    for name in each(names, f"{cfg.label} occupancy", progress, unit="param"):
        w = _check_weight(state[name], f"parameter {name!r}")
        out[name] = _histogram(w, cfg, name in tr)
        total += out[name]
    out["overall"] = total
    return out


def weight_relative_error(
    state: Mapping[str, Tensor],
    names: Iterable[str],
    cfg: QuantConfig,
    *,
    transposed: Collection[str] = (),
    progress: Progress | None = None,
) -> dict[str, float]:
    """``‖Q(w) − w‖ / ‖w‖`` (Frobenius) per name, and over all of them as ``"overall"``.

    ``"overall"`` is ``sqrt(Σ‖Q(w)−w‖² / Σ‖w‖²)``. An all-zero weight has error 0.
    """
    cfg = _check_config(cfg)
    names = _check_names(state, names)
    tr = _check_transposed(transposed)
    out: dict[str, float] = {}
    err_sq = norm_sq = 0.0
    for name in each(names, f"{cfg.label} error", progress, unit="param"):
        w = _check_weight(state[name], f"parameter {name!r}")
        q = _qdq(w, cfg, name in tr)
        e = float((q.double() - w.double()).pow(2).sum())
        s = float(w.double().pow(2).sum())
        out[name] = math.sqrt(e / s) if s > 0 else 0.0
        err_sq += e
        norm_sq += s
    out["overall"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    return out
