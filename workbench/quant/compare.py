"""Before/after comparison of a weight update under a quantizer: codes changed, bucket overlap,
|Δw| / bin width, bin occupancy, per module and overall (:func:`compare_quantization`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, each
from workbench.quant.bnb import _bnb_codes, _check_weight, _layout, _per_weight
from workbench.quant.config import QuantConfig, _check_config
from workbench.quant.parameters import _check_names, _check_transposed
from workbench.quant.tables import _lookup, _Tables, _tables

# |Δw| / bin width is binned on a fine log grid (200 bins per decade); quantiles of large
# sets are read off it, and the public histogram is a coarsening of it.
_FINE_LO, _FINE_HI, _FINE_PER_DECADE = -12, 6, 200


_FINE_BINS = (_FINE_HI - _FINE_LO) * _FINE_PER_DECADE


_COARSE_LO, _COARSE_HI, _COARSE_PER_DECADE = -6, 2, 2


_EXACT_MAX = 1 << 16  # quantiles of up to this many ratios are exact (a partial sort)


RATIO_EDGES: tuple[float, ...] = tuple(
    10.0 ** (_COARSE_LO + i / _COARSE_PER_DECADE)
    for i in range((_COARSE_HI - _COARSE_LO) * _COARSE_PER_DECADE + 1)
)
"""Edges of the ``|Δw| / bin width`` histogram of :class:`ModuleComparison` (1e-6 … 1e2,
two bins per decade); values outside are counted in ``ratio_below`` / ``ratio_above``."""


def _fine_hist(ratio: Tensor) -> np.ndarray:
    """Counts on the fine grid: [0] below 1e-12, [1.._FINE_BINS], [-1] at/above 1e6 (and inf)."""
    pos = (torch.log10(ratio.float()) - _FINE_LO) * _FINE_PER_DECADE
    idx = pos.clamp_(-1.0, float(_FINE_BINS)).floor_().int() + 1
    return torch.bincount(idx, minlength=_FINE_BINS + 2).cpu().numpy().astype(np.int64)


def _coarse(fine: np.ndarray) -> tuple[tuple[int, ...], int, int]:
    step = _FINE_PER_DECADE // _COARSE_PER_DECADE
    start = (_COARSE_LO - _FINE_LO) * _FINE_PER_DECADE + 1
    stop = (_COARSE_HI - _FINE_LO) * _FINE_PER_DECADE + 1
    counts = fine[start:stop].reshape(-1, step).sum(axis=1)
    return tuple(int(c) for c in counts), int(fine[:start].sum()), int(fine[stop:].sum())


def _hist_quantile(fine: np.ndarray, q: float) -> float | None:
    """Quantile estimate from the fine grid, log-linear inside a bin (relative error < 0.6%)."""
    total = int(fine.sum())
    if total == 0:
        return None
    target = q * (total - 1)  # 0-based rank, as in linear-interpolation quantiles
    cum = np.cumsum(fine)
    j = int(np.searchsorted(cum, target, side="right"))
    if j == 0:
        return 10.0**_FINE_LO  # saturates: everything below the grid reads as its floor
    if j == len(fine) - 1:
        return math.inf
    frac = min((target - cum[j - 1] + 0.5) / fine[j], 1.0)
    return float(10.0 ** (_FINE_LO + (j - 1 + frac) / _FINE_PER_DECADE))


def _exact_quantiles(ratio: np.ndarray) -> tuple[float, float]:
    a = ratio.astype(np.float64)
    big = np.finfo(np.float64).max  # inf would make the interpolation nan
    a[np.isinf(a)] = big
    med, p90 = np.quantile(a, [0.5, 0.9])
    return (math.inf if med >= big else float(med)), (math.inf if p90 >= big else float(p90))


def _quantiles(exact: np.ndarray | None, fine: np.ndarray) -> tuple[float | None, float | None]:
    if exact is not None:
        return _exact_quantiles(exact) if exact.size else (None, None)
    return _hist_quantile(fine, 0.5), _hist_quantile(fine, 0.9)


def _json_float(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass(frozen=True)
class ModuleComparison:
    """Quantization of ``base`` vs ``base + delta`` for one weight (or ``"overall"``).

    Counts are over weights (``n_weights``) or blocks (``n_blocks``). "Changed" weights are
    those with ``delta != 0``. ``|Δw| / bin width`` uses the base weight's
    :class:`BinGeometry` bin width.

    Attributes:
        name: HF parameter name, or ``"overall"``.
        n_weights, n_blocks: sizes.
        n_changed: weights with nonzero delta.
        code_flips: weights whose code index changed, for any reason (own move or a block
            rescale).
        changed_flips: code flips among changed weights.
        agreeing_flips: changed flips whose code moved (in value order) in the direction of
            the sign of Δw.
        stable_weights: weights whose code *and* exact block absmax are unchanged (without
            double quantization: exactly the weights whose dequantized value is
            bit-identical; with it, the shared statistics may still nudge their scale, see
            ``scale_changes``). A dense update moves nearly every block's absmax weight, so
            this is near 0 for gradient unlearning; ``code_overlap`` is the code-only view.
        absmax_changes: blocks whose exact absmax changed.
        scale_changes: blocks whose effective (dequantization) absmax changed; equals
            ``absmax_changes`` without double quantization, and can exceed it with it (the
            shared mean offset and 256-block statistics move too).
        ratio_median, ratio_p90: of ``|Δw| / bin width`` over changed weights (None if
            none); exact for up to 65,536 ratios, otherwise read off a 200-per-decade log
            histogram (relative error < 0.6%). ``inf`` where a bin has zero width
            (all-zero block).
        ratio_counts: histogram of that ratio over :data:`RATIO_EDGES` (len(edges) - 1 bins).
        ratio_below, ratio_above: ratios below the first / at or above the last edge.
        delta_sq: ``‖Δ‖²``.
        qdelta_sq: ``‖Q(w+Δ) − Q(w)‖²``.
        qdelta_dot: ``⟨Q(w+Δ) − Q(w), Δ⟩``. Both computed in float64 from codes and block
            scales (bnb's float32 rounding of each dequantized product is ignored).
        occupancy_before, occupancy_after: weights per code of ``Q(w)`` and ``Q(w+Δ)``,
            indexed by code **in ascending value order** (``code_order``), so bars plot
            left to right; ``(16,)`` for 4-bit, ``(256,)`` for int8.
    """

    name: str
    n_weights: int
    n_blocks: int
    n_changed: int
    code_flips: int
    changed_flips: int
    agreeing_flips: int
    stable_weights: int
    absmax_changes: int
    scale_changes: int
    ratio_median: float | None
    ratio_p90: float | None
    ratio_counts: tuple[int, ...]
    ratio_below: int
    ratio_above: int
    delta_sq: float
    qdelta_sq: float
    qdelta_dot: float
    occupancy_before: tuple[int, ...] = ()
    occupancy_after: tuple[int, ...] = ()

    @property
    def bucket_overlap(self) -> float:
        """Fraction of weights whose code and block absmax are unchanged."""
        return self.stable_weights / self.n_weights if self.n_weights else 1.0

    @property
    def code_overlap(self) -> float:
        """Fraction of weights whose code is unchanged (QUAIL-style overlap; 1.0 = no code
        moved, though block rescales may still shift values)."""
        return 1.0 - self.code_flips / self.n_weights if self.n_weights else 1.0

    @property
    def flip_fraction(self) -> float:
        """Fraction of all weights whose code changed."""
        return self.code_flips / self.n_weights if self.n_weights else 0.0

    @property
    def changed_flip_fraction(self) -> float | None:
        """Fraction of changed weights whose code changed (None if nothing changed)."""
        return self.changed_flips / self.n_changed if self.n_changed else None

    @property
    def direction_agreement(self) -> float | None:
        """Fraction of changed weights' code flips that go the way of Δw (None if no flips)."""
        return self.agreeing_flips / self.changed_flips if self.changed_flips else None

    @property
    def update_projection(self) -> float | None:
        """``⟨Q(w+Δ)−Q(w), Δ⟩ / ‖Δ‖²``: how much of the update the quantized model
        carries along Δ (≈1: rounding dithers the update through; 0: erased). None if
        Δ = 0."""
        return self.qdelta_dot / self.delta_sq if self.delta_sq > 0 else None

    @property
    def update_norm_ratio(self) -> float | None:
        """``‖Q(w+Δ)−Q(w)‖ / ‖Δ‖`` (None if Δ = 0)."""
        return math.sqrt(self.qdelta_sq / self.delta_sq) if self.delta_sq > 0 else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        d: dict[str, Any] = dataclasses.asdict(self)
        d["ratio_counts"] = list(self.ratio_counts)
        d["occupancy_before"] = list(self.occupancy_before)
        d["occupancy_after"] = list(self.occupancy_after)
        for key in ("ratio_median", "ratio_p90"):
            d[key] = _json_float(d[key])
        for key in (
            "bucket_overlap",
            "code_overlap",
            "flip_fraction",
            "changed_flip_fraction",
            "direction_agreement",
            "update_projection",
            "update_norm_ratio",
        ):
            d[key] = _json_float(getattr(self, key))
        return d


@dataclass(frozen=True)
class QuantComparison:
    """Result of :func:`compare_quantization`: one :class:`ModuleComparison` per name and
    their aggregate ``overall``."""

    config: QuantConfig
    modules: tuple[ModuleComparison, ...]
    overall: ModuleComparison
    ratio_edges: tuple[float, ...] = field(default=RATIO_EDGES)

    def module(self, name: str) -> ModuleComparison:
        for m in self.modules:
            if m.name == name:
                return m
        raise WorkbenchError(f"no comparison for parameter {name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "label": self.config.label,
            "ratio_edges": list(self.ratio_edges),
            "overall": self.overall.to_dict(),
            "modules": [m.to_dict() for m in self.modules],
        }


def _block_sums(x: Tensor, bs: int, dtype: torch.dtype | None = None) -> Tensor:
    """Per-block sums of a flat per-weight tensor (the last block may be short)."""
    n = x.numel()
    full = n // bs
    sums = x[: full * bs].view(full, bs).sum(1, dtype=dtype)
    if full * bs < n:
        sums = torch.cat([sums, x[full * bs :].sum(dtype=dtype).reshape(1)])
    return sums


def _occupancy(codes: Tensor, cfg: QuantConfig, t: _Tables) -> tuple[int, ...]:
    """Weights per code in ascending value order (what a histogram plots left to right)."""
    counts = torch.bincount(codes.long(), minlength=cfg.n_codes)
    return tuple(int(c) for c in counts[t.order])


def _compare_one(
    name: str, base: Tensor, delta: Tensor | None, cfg: QuantConfig, transposed: bool
) -> tuple[ModuleComparison, np.ndarray, np.ndarray | None]:
    """Summaries for one weight, its fine ratio histogram, and its ratios if few."""
    t = _tables(cfg.type)
    bs = cfg.blocksize
    xb = _layout(base, transposed, f"parameter {name!r}")
    qb = _bnb_codes(xb, cfg)
    n, nb = xb.numel(), qb.absmax.numel()
    occ_before = _occupancy(qb.codes, cfg, t)
    no_hist = np.zeros(_FINE_BINS + 2, dtype=np.int64)
    unchanged = ModuleComparison(
        name, n, nb, 0, 0, 0, 0, n, 0, 0, None, None, _coarse(no_hist)[0], 0, 0, 0.0, 0.0, 0.0,
        occ_before, occ_before,
    )
    if delta is None:
        return unchanged, no_hist, np.zeros(0, dtype=np.float32)
    xd_native = _layout(delta.to(base.dtype), transposed, f"delta {name!r}")
    xd = xd_native.float()  # statistics in float32; after = base + delta in the base dtype
    is_changed = xd != 0
    n_changed = int(torch.count_nonzero(is_changed))
    if n_changed == 0:
        return unchanged, no_hist, np.zeros(0, dtype=np.float32)

    qa = _bnb_codes(xb + xd_native, cfg)
    flip = qb.codes != qa.codes
    code_flips = int(torch.count_nonzero(flip))
    absmax_changed = qb.absmax != qa.absmax
    scale_changed = qb.scale != qa.scale

    # Overlap asks whether a weight kept its bucket: its code and its own block's absmax.
    # Under double quantization one absmax change shifts the shared mean offset and so
    # every block's effective scale by a hair; that is reported as scale_changes and
    # enters Q(w+Δ) − Q(w), but does not count as leaving the bucket.
    all_flip_idx = torch.nonzero(flip).squeeze(1)  # flips are few: index them once
    stable = n - code_flips
    if bool(absmax_changed.any()):
        lengths = torch.full((nb,), bs, dtype=torch.int64)
        lengths[-1] = n - (nb - 1) * bs
        in_rescaled = int(lengths[absmax_changed].sum())
        flipped_in_rescaled = int(torch.count_nonzero(absmax_changed[all_flip_idx // bs]))
        stable -= in_rescaled - flipped_in_rescaled

    # |Δw| / bin width over changed weights; a dense update skips the index gathers
    sel = None if n_changed == n else torch.nonzero(is_changed).squeeze(1)
    d_chg = xd if sel is None else xd[sel]
    codes_chg = qb.codes if sel is None else qb.codes[sel]
    am_chg = _per_weight(qb.absmax, n, bs) if sel is None else qb.absmax[sel // bs]
    ratio = d_chg.abs() / (_lookup(t.width_by_code, codes_chg) * am_chg)  # width 0 -> inf

    flip_idx = all_flip_idx[is_changed[all_flip_idx]]
    changed_flips = flip_idx.numel()
    up = _lookup(t.rank, qa.codes[flip_idx]) > _lookup(t.rank, qb.codes[flip_idx])
    agreeing = int(torch.count_nonzero(up == (xd[flip_idx] > 0)))

    # Q(w+Δ) − Q(w) = v_b·Δs on weights whose code kept still (Δs = block scale change),
    # plus the full difference at code flips: block sums keep the dense part cheap
    sb, sa = qb.scale.double(), qa.scale.double()
    blk_f = all_flip_idx // bs
    vb_f = _lookup(t.values, qb.codes[all_flip_idx]).double()
    va_f = _lookup(t.values, qa.codes[all_flip_idx]).double()
    d_f = xd[all_flip_idx].double()
    diff_f = va_f * sa[blk_f] - vb_f * sb[blk_f]
    qdelta_dot = float((diff_f * d_f).sum())
    qdelta_sq = float(diff_f.pow(2).sum())
    if bool(scale_changed.any()):
        ds = sa - sb
        vb = _lookup(t.values, qb.codes)
        dot_blocks = _block_sums(vb * xd, bs, torch.float64)
        sq_blocks = _block_sums(vb * vb, bs, torch.float64)
        still = vb_f * ds[blk_f]  # what the block term assumed at the flipped weights
        qdelta_dot += float((ds * dot_blocks).sum() - (still * d_f).sum())
        qdelta_sq += float((ds * ds * sq_blocks).sum() - still.pow(2).sum())
    d64 = d_chg.double()
    delta_sq = float(torch.dot(d64, d64))

    fine = _fine_hist(ratio)
    counts, below, above = _coarse(fine)
    exact = ratio.cpu().numpy() if n_changed <= _EXACT_MAX else None
    med, p90 = _quantiles(exact, fine)
    module = ModuleComparison(
        name=name,
        n_weights=n,
        n_blocks=nb,
        n_changed=n_changed,
        code_flips=code_flips,
        changed_flips=changed_flips,
        agreeing_flips=agreeing,
        stable_weights=stable,
        absmax_changes=int(torch.count_nonzero(absmax_changed)),
        scale_changes=int(torch.count_nonzero(scale_changed)),
        ratio_median=med,
        ratio_p90=p90,
        ratio_counts=counts,
        ratio_below=below,
        ratio_above=above,
        delta_sq=delta_sq,
        qdelta_sq=qdelta_sq,
        qdelta_dot=qdelta_dot,
        occupancy_before=occ_before,
        occupancy_after=_occupancy(qa.codes, cfg, t),
    )
    return module, fine, exact


def _sum_occupancy(rows: list[tuple[int, ...]]) -> tuple[int, ...]:
    return tuple(int(x) for x in np.sum(np.array(rows, dtype=np.int64), axis=0)) if rows else ()


def compare_quantization(
    base: Mapping[str, Tensor],
    delta: Mapping[str, Tensor],
    names: Iterable[str],
    cfg: QuantConfig,
    *,
    transposed: Collection[str] = (),
    progress: Progress | None = None,
) -> QuantComparison:
    """Does an update survive quantization? Compare ``Q(base)`` with ``Q(base + delta)``.

    Streams name by name: at most one extra copy of one weight (``base + delta``) and its
    codes exist at a time; only summaries are kept. Two bnb quantize calls per name (one
    if its delta is absent or all zero), the rest is vectorised torch.

    Args:
        base: parameter name -> base weight.
        delta: parameter name -> update of the same shape (``after = base + delta``); a
            name missing from ``delta`` has a zero update.
        names: parameters to analyse (e.g. :func:`quantizable_parameters`).
        cfg: the quantizer.
        transposed: names quantized along ``w.T`` (:func:`transposed_parameters`).
        progress: optional ``(fraction, message)`` callback; otherwise a tqdm bar.
    """
    cfg = _check_config(cfg)
    names = _check_names(base, names, "base state")
    if not isinstance(delta, Mapping):
        raise WorkbenchError(
            f"delta: expected a dict of parameter name -> tensor, got {type(delta).__name__}"
        )
    tr = _check_transposed(transposed)
    # validate everything up front: a bad entry should not surface after minutes of work
    for name in names:
        b = _check_weight(base[name], f"base parameter {name!r}")
        if name in delta:
            d = _check_weight(delta[name], f"delta {name!r}")
            if d.shape != b.shape:
                raise WorkbenchError(
                    f"delta {name!r}: shape {tuple(d.shape)} does not match the base "
                    f"parameter's {tuple(b.shape)}"
                )
        if name in tr and b.dim() != 2:
            raise WorkbenchError(
                f"parameter {name!r}: transposed (Conv1D) layout needs a 2-D weight"
            )

    modules: list[ModuleComparison] = []
    fine_total = np.zeros(_FINE_BINS + 2, dtype=np.int64)
    # every ratio is kept while there are few enough for exact overall quantiles
    pool: list[np.ndarray] = [np.zeros(0, dtype=np.float32)]
    pool_size, pooling = 0, True
    for name in each(names, f"{cfg.label} compare", progress, unit="param"):
        # one module at a time on the CPU (numpy): at most one extra copy of one module's weights
        d = delta.get(name)
        m, fine, exact = _compare_one(name, base[name].cpu(), d.cpu() if d is not None else None, cfg, name in tr)
        modules.append(m)
        fine_total += fine
        pool_size += m.n_changed
        if pooling and (exact is None or pool_size > _EXACT_MAX):
            pool, pooling = [], False
        elif pooling and exact is not None:
            pool.append(exact)

    def total(attr: str) -> Any:
        return sum(getattr(m, attr) for m in modules)

    counts, below, above = _coarse(fine_total)
    med, p90 = _quantiles(np.concatenate(pool) if pooling else None, fine_total)
    overall = ModuleComparison(
        name="overall",
        n_weights=total("n_weights"),
        n_blocks=total("n_blocks"),
        n_changed=total("n_changed"),
        code_flips=total("code_flips"),
        changed_flips=total("changed_flips"),
        agreeing_flips=total("agreeing_flips"),
        stable_weights=total("stable_weights"),
        absmax_changes=total("absmax_changes"),
        scale_changes=total("scale_changes"),
        ratio_median=med,
        ratio_p90=p90,
        ratio_counts=counts,
        ratio_below=below,
        ratio_above=above,
        delta_sq=float(total("delta_sq")),
        qdelta_sq=float(total("qdelta_sq")),
        qdelta_dot=float(total("qdelta_dot")),
        occupancy_before=_sum_occupancy([m.occupancy_before for m in modules]),
        occupancy_after=_sum_occupancy([m.occupancy_after for m in modules]),
    )
    return QuantComparison(config=cfg, modules=tuple(modules), overall=overall)
