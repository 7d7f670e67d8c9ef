"""Post-training quantization through bitsandbytes, and the geometry of its bins.

The workbench's question is whether an unlearning update survives 4-bit quantization.
Everything here answers it with bitsandbytes' own quantizer (``bitsandbytes.functional``):
codes are never re-derived, they are read out of bnb's output.

Quantizers (:class:`QuantConfig`)
---------------------------------
``nf4`` / ``fp4``
    ``quantize_4bit`` (``quant_type`` named explicitly: bnb's ``Linear4bit`` and
    ``BitsAndBytesConfig`` default to FP4). ``double_quant`` is bnb's
    ``compress_statistics`` (the block absmax values are quantized again, 8-bit dynamic,
    blocks of 256, mean offset).
``int8``
    ``quantize_blockwise`` with bnb's signed dynamic 8-bit code map (256 values; the
    blockwise format of bnb's 8-bit optimizers, *not* the row-wise LLM.int8() format of
    ``Linear8bitLt``). ``double_quant`` is bnb's ``nested=True`` (blocks of ``blocksize``).

Conventions
-----------
- A weight tensor is flattened in row-major order and cut into blocks of ``blocksize``
  consecutive values; the last block may be shorter (bnb quantizes it with its own
  absmax, no padding values enter it). Code index ``k`` of a weight is bnb's index into
  :func:`code_table` (for FP4 that is the bit pattern, not the value order).
- 4-bit codes come out of bnb packed two per byte: the *earlier* weight is the **high**
  nibble (``byte >> 4``), the later one the low nibble; an odd count is padded with one
  code in the last byte's low nibble.
- Transformers' ``Conv1D`` (GPT-2) stores weights as ``[in, out]``; transformers' bnb
  loader transposes them to the ``nn.Linear`` layout ``[out, in]`` before quantizing, so
  blocks run along the input dimension. Functions taking ``transposed`` (a flag, or a
  collection of parameter names) quantize ``w.T`` for those weights, exactly like the
  loader; :func:`transposed_parameters` lists them for a model. Per-weight outputs are
  always returned in the weight's own shape, except :class:`QuantizedWeight`, whose
  flat arrays follow the quantization order.
- Two absmax values per block: the *exact* absmax, which decides codes (bnb scales
  ``x / absmax`` into [-1, 1] and picks a code), and the *effective* absmax multiplied at
  dequantization, which differs only under double quantization. Codes do not depend on
  double quantization.
- Decision boundaries (:func:`decision_boundaries`) are *measured* from bnb once per
  quant type, by bisection over float32 inputs: a weight whose normalized value is
  ``<= t_j`` gets the lower of the two codes. For NF4/FP4 they are exactly the midpoints
  between adjacent code values (ties go to the lower code). bnb 0.50.2's CPU 8-bit kernel
  uses an approximate binary search instead: most int8 thresholds sit within 0.1% of a
  gap from the midpoint, but near zero it never emits codes 124-130 (0 and the tiniest
  magnitudes) and maps ``0.0`` to code 131 (+2.1e-5 × absmax). The geometry follows bnb.
  See :class:`BinGeometry` for bin widths and distances.

Dequantization is ``code_table[k] * effective_absmax[block]`` in float32, the formula of
every bnb backend (tests check it is bit-identical to ``dequantize_4bit`` and
``dequantize_blockwise``). It is computed here rather than by calling bnb because bnb
0.50.2's AVX-512 CPU ``dequantize_4bit`` kernel indexes the absmax per *row*
(``row * (ncols // blocksize) + col // blocksize``), which is wrong whenever a row length
is not a multiple of the blocksize (e.g. SmolLM2's 576-wide rows at blocksize 128), and
its fallback for odd row lengths is ``torch.compile``-d per shape.

Tensors are float32 on CPU unless stated; float16/bfloat16 are accepted, float64 is
quantized through float32.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal, get_args

import numpy as np
import torch
from torch import Tensor, nn

from workbench.errors import WorkbenchError

__all__ = [
    "FOUR_BIT_BLOCKSIZES",
    "INT8_BLOCKSIZES",
    "RATIO_EDGES",
    "BinGeometry",
    "ModuleComparison",
    "QuantComparison",
    "QuantConfig",
    "QuantType",
    "QuantizedWeight",
    "bin_geometry",
    "bin_histogram",
    "bin_occupancy",
    "code_order",
    "code_table",
    "compare_quantization",
    "decision_boundaries",
    "fake_quantize_model",
    "fake_quantize_state",
    "quantizable_parameters",
    "quantize_codes",
    "quantize_dequantize",
    "quantize_weight",
    "transposed_parameters",
    "weight_relative_error",
]

QuantType = Literal["nf4", "fp4", "int8"]
_QUANT_TYPES: tuple[str, ...] = get_args(QuantType)

FOUR_BIT_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes ``quantize_4bit`` accepts (bnb rejects any other value)."""
INT8_BLOCKSIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes bnb documents for ``quantize_blockwise``. The CPU kernel would take any
positive size, but the CUDA one only these, and a config must mean the same everywhere."""

_DQ_BLOCKSIZE_4BIT = 256  # compress_statistics quantizes the absmax vector in blocks of 256

Progress = Callable[[float, str], None]

_LABEL_RE = re.compile(r"^(nf4|fp4|int8)/b(\d+)(/dq)?(\+emb)?(\+head)?$")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class QuantConfig:
    """Which quantizer, and which parameters it is applied to.

    Attributes:
        type: ``"nf4"``, ``"fp4"`` (bnb ``quantize_4bit``) or ``"int8"`` (bnb
            ``quantize_blockwise``, dynamic code map).
        blocksize: values per absmax block; one of :data:`FOUR_BIT_BLOCKSIZES` for 4-bit,
            :data:`INT8_BLOCKSIZES` for int8.
        double_quant: quantize the block absmax values again (bnb ``compress_statistics``
            for 4-bit, ``nested`` for int8).
        include_embeddings: also quantize ``nn.Embedding`` weights (token and, where the
            model has them, position embeddings). bnb's loaders never do.
        include_lm_head: also quantize the output embedding (``lm_head``). bnb's loaders
            skip it. With tied embeddings it is the token-embedding tensor itself.
    """

    type: QuantType
    blocksize: int = 64
    double_quant: bool = False
    include_embeddings: bool = False
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.type not in _QUANT_TYPES:
            raise WorkbenchError(
                f"QuantConfig.type: unknown quantization type {self.type!r}; "
                f"expected one of {', '.join(_QUANT_TYPES)}"
            )
        allowed = INT8_BLOCKSIZES if self.type == "int8" else FOUR_BIT_BLOCKSIZES
        # bool is an int subclass; True would silently mean blocksize 1
        if isinstance(self.blocksize, bool) or not isinstance(self.blocksize, int):
            raise WorkbenchError(
                f"QuantConfig.blocksize: must be an int, got {type(self.blocksize).__name__}"
            )
        if self.blocksize not in allowed:
            raise WorkbenchError(
                f"QuantConfig.blocksize: {self.blocksize} is not supported by bitsandbytes "
                f"for {self.type}; allowed: {', '.join(map(str, allowed))}"
            )
        for name in ("double_quant", "include_embeddings", "include_lm_head"):
            if not isinstance(getattr(self, name), bool):
                raise WorkbenchError(
                    f"QuantConfig.{name}: must be a bool, got {getattr(self, name)!r}"
                )

    @property
    def bits(self) -> int:
        """Bits per code: 4 or 8."""
        return 8 if self.type == "int8" else 4

    @property
    def n_codes(self) -> int:
        """Size of the code table: 16 or 256."""
        return 1 << self.bits

    @property
    def label(self) -> str:
        """Short stable name, e.g. ``"nf4/b64"``, ``"fp4/b128/dq"``, ``"int8/b64+emb+head"``."""
        s = f"{self.type}/b{self.blocksize}"
        if self.double_quant:
            s += "/dq"
        if self.include_embeddings:
            s += "+emb"
        if self.include_lm_head:
            s += "+head"
        return s

    @classmethod
    def from_label(cls, label: str) -> QuantConfig:
        """Inverse of :attr:`label`."""
        m = _LABEL_RE.match(label.strip()) if isinstance(label, str) else None
        if m is None:
            raise WorkbenchError(
                f"quantization label {label!r}: expected e.g. 'nf4/b64', 'fp4/b128/dq', "
                "'int8/b64+emb+head'"
            )
        return cls(
            type=m.group(1),  # type: ignore[arg-type]
            blocksize=int(m.group(2)),
            double_quant=m.group(3) is not None,
            include_embeddings=m.group(4) is not None,
            include_lm_head=m.group(5) is not None,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise WorkbenchError(f"QuantConfig: unknown field(s) {sorted(unknown)}")
        if "type" not in d:
            raise WorkbenchError("QuantConfig: field 'type' is required")
        return cls(**d)


# --------------------------------------------------------------------------- code tables


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


def _check_config(cfg: object) -> QuantConfig:
    if not isinstance(cfg, QuantConfig):
        raise WorkbenchError(f"expected a QuantConfig, got {type(cfg).__name__}")
    return cfg


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


# --------------------------------------------------------------------------- core quantization


def _check_weight(w: object, what: str) -> Tensor:
    if not isinstance(w, Tensor):
        raise WorkbenchError(f"{what}: expected a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise WorkbenchError(f"{what}: expected a floating-point tensor, got dtype {w.dtype}")
    if w.numel() == 0:
        raise WorkbenchError(f"{what}: empty tensor (shape {tuple(w.shape)}) cannot be quantized")
    # a NaN/inf anywhere makes the sum non-finite, and a sum is far cheaper than an
    # elementwise test; that only runs to confirm (a 16-bit sum can overflow harmlessly)
    if not math.isfinite(float(w.sum())) and not bool(torch.isfinite(w).all()):
        raise WorkbenchError(f"{what}: contains NaN or infinite values")
    return w


def _layout(w: Tensor, transposed: bool, what: str) -> Tensor:
    """Flat tensor in bnb's quantization order (a view when no copy is needed)."""
    if transposed:
        if w.dim() != 2:
            raise WorkbenchError(
                f"{what}: transposed (Conv1D) layout needs a 2-D weight, got shape {tuple(w.shape)}"
            )
        w = w.t()
    x = w.contiguous().reshape(-1)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        x = x.float()  # bnb takes 16/32-bit floats only
    return x


def _unlayout(flat: Tensor, shape: torch.Size, transposed: bool) -> Tensor:
    if transposed:
        return flat.reshape(shape[1], shape[0]).t().contiguous()
    return flat.reshape(shape)


def _per_weight(per_block: Tensor, n: int, blocksize: int) -> Tensor:
    """Broadcast one value per block to one value per weight, shape ``(n,)``."""
    out = torch.empty(n, dtype=per_block.dtype, device=per_block.device)
    full = n // blocksize
    out[: full * blocksize].view(full, blocksize).copy_(
        per_block[:full, None].expand(full, blocksize)
    )
    if full * blocksize < n:
        out[full * blocksize :] = per_block[full]
    return out


def _double_quantize(absmax: Tensor, blocksize: int) -> Tensor:
    """The absmax bnb multiplies at dequantization when statistics are double-quantized.

    Same steps as ``quantize_4bit(compress_statistics=True)`` / ``quantize_blockwise(
    nested=True)`` followed by their dequantization; codes are quantized against the exact
    absmax, so quantizing without double quantization and applying this is equivalent
    (the tests check it against bnb's own double-quantized path).
    """
    import bitsandbytes.functional as bnbf

    offset = absmax.mean()
    q, state = bnbf.quantize_blockwise(absmax - offset, blocksize=blocksize)
    eff = bnbf.dequantize_blockwise(q, state)
    eff += offset
    return eff.float()


@dataclass(frozen=True)
class _Codes:
    codes: Tensor  # uint8 (n,)
    absmax: Tensor  # float32 (n_blocks,), exact: decides codes
    scale: Tensor  # float32 (n_blocks,), effective: multiplied at dequantization


def _bnb_codes(x: Tensor, cfg: QuantConfig) -> _Codes:
    """One bnb quantize call on a flat tensor; codes unpacked from bnb's output."""
    import bitsandbytes.functional as bnbf

    n = x.numel()
    if cfg.type == "int8":
        q, state = bnbf.quantize_blockwise(x, blocksize=cfg.blocksize)
        codes = q.reshape(-1)
        dq_blocksize = cfg.blocksize
    else:
        packed, state = bnbf.quantize_4bit(
            x, blocksize=cfg.blocksize, compress_statistics=False, quant_type=cfg.type
        )
        b = packed.reshape(-1)
        if b.dtype != torch.uint8:
            b = b.view(torch.uint8)
        codes = torch.stack((b >> 4, b & 0x0F), dim=1).view(-1)[:n]  # [:n] drops an odd pad nibble
        dq_blocksize = _DQ_BLOCKSIZE_4BIT
    absmax = state.absmax.float()
    scale = _double_quantize(absmax, dq_blocksize) if cfg.double_quant else absmax
    return _Codes(codes, absmax, scale)


def _dequantize(c: _Codes, cfg: QuantConfig, dtype: torch.dtype) -> Tensor:
    vals = _lookup(_tables(cfg.type).values, c.codes)
    n, bs = vals.numel(), cfg.blocksize
    full = (n // bs) * bs
    # multiply in float32 and round once to the target dtype, as bnb's kernels do
    vals[:full].view(-1, bs).mul_(c.scale[: full // bs, None])
    if full < n:
        vals[full:].mul_(c.scale[full // bs])
    return vals.to(dtype)


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class QuantizedWeight:
    """One weight as bnb quantizes it.

    Attributes:
        codes: uint8 ``(numel,)``, bnb's code index per weight in quantization order
            (row-major flattening of the weight, or of its transpose if ``transposed``).
        absmax: float32 ``(n_blocks,)``, the effective per-block absmax multiplied at
            dequantization (after the double-quantization round trip if enabled).
        absmax_exact: float32 ``(n_blocks,)``, the block absmax bnb scaled by to choose the
            codes (equal to ``absmax`` without double quantization).
        code_table: float32 ``(16,)`` or ``(256,)``, normalized value of each code.
        shape: the weight's own shape.
        dtype: the weight's dtype.
        transposed: blocks were cut from ``w.T`` (Conv1D weights).
        config: the quantizer.
    """

    codes: Tensor
    absmax: Tensor
    absmax_exact: Tensor
    code_table: Tensor
    shape: torch.Size
    dtype: torch.dtype
    transposed: bool
    config: QuantConfig

    @property
    def blocksize(self) -> int:
        return self.config.blocksize

    @property
    def n_blocks(self) -> int:
        return self.absmax.numel()

    def dequantize(self) -> Tensor:
        """Fake-quantized weight, in the weight's own shape and dtype."""
        codes = _Codes(self.codes, self.absmax_exact, self.absmax)
        flat = _dequantize(codes, self.config, self.dtype)
        return _unlayout(flat, self.shape, self.transposed)

    def codes_like_weight(self) -> Tensor:
        """Codes rearranged to the weight's own shape (uint8)."""
        return _unlayout(self.codes, self.shape, self.transposed)


def quantize_codes(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> QuantizedWeight:
    """Quantize one weight with bnb and return its codes and block scales.

    Args:
        w: floating-point weight of any shape.
        cfg: the quantizer.
        transposed: quantize ``w.T`` (Conv1D weights; see module docstring).
    """
    cfg = _check_config(cfg)
    w = _check_weight(w, "weight")
    c = _bnb_codes(_layout(w, transposed, "weight"), cfg)
    return QuantizedWeight(
        codes=c.codes,
        absmax=c.scale,
        absmax_exact=c.absmax,
        code_table=_tables(cfg.type).values.clone(),
        shape=w.shape,
        dtype=w.dtype,
        transposed=transposed,
        config=cfg,
    )


def quantize_dequantize(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> Tensor:
    """Fake-quantize one weight: bnb quantization then dequantization.

    Returns a new tensor of ``w``'s shape and dtype; ``w`` is not modified.
    """
    cfg = _check_config(cfg)
    return _qdq(_check_weight(w, "weight"), cfg, transposed)


def _qdq(w: Tensor, cfg: QuantConfig, transposed: bool) -> Tensor:
    c = _bnb_codes(_layout(w, transposed, "weight"), cfg)
    return _unlayout(_dequantize(c, cfg, w.dtype), w.shape, transposed)


quantize_weight = quantize_dequantize
"""Alias of :func:`quantize_dequantize` (the name used in docs/ARCHITECTURE.md)."""


# --------------------------------------------------------------------------- bin geometry


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


def bin_geometry(w: Tensor, cfg: QuantConfig, *, transposed: bool = False) -> BinGeometry:
    """Per-weight code, block absmax, bin width and signed distances to the decision boundaries.

    One bnb quantize call, then table look-ups; see :class:`BinGeometry` for definitions.
    Distances are in weight units (float32).
    """
    cfg = _check_config(cfg)
    w = _check_weight(w, "weight")
    x = _layout(w, transposed, "weight")
    c = _bnb_codes(x, cfg)
    t = _tables(cfg.type)
    n = x.numel()
    xf = x.float()
    rank = _lookup(t.rank, c.codes)
    am = _per_weight(c.absmax, n, cfg.blocksize)
    width = _lookup(t.width_by_code, c.codes) * am
    # inf * 0 (top code in an all-zero block) must stay inf, not nan
    top = t.values.numel() - 1
    upper = torch.where(rank == top, math.inf, _lookup(t.upper_by_code, c.codes) * am - xf)
    lower = torch.where(rank == 0, -math.inf, _lookup(t.lower_by_code, c.codes) * am - xf)
    is_max = xf.abs() == am
    shape = w.shape
    return BinGeometry(
        code=_unlayout(c.codes, shape, transposed),
        rank=_unlayout(rank, shape, transposed),
        absmax=_unlayout(am, shape, transposed),
        bin_width=_unlayout(width, shape, transposed),
        to_upper=_unlayout(upper, shape, transposed),
        to_lower=_unlayout(lower, shape, transposed),
        is_block_max=_unlayout(is_max, shape, transposed),
    )


# --------------------------------------------------------------------------- model / state level


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the rest works without it
        return None
    return Conv1D


def _output_embedding_module(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            out = get()
        except (AttributeError, NotImplementedError):
            out = None
        if isinstance(out, nn.Module):
            return out
    # plain nn.Modules: recognise the usual head names
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
            return m
    return None


def quantizable_parameters(model: nn.Module, cfg: QuantConfig) -> list[str]:
    """HF parameter names of the weights ``cfg`` quantizes, in ``named_parameters()`` order.

    Rule (that of transformers' bnb loader): the ``weight`` of every ``nn.Linear`` and
    transformers ``Conv1D`` (in practice the decoder blocks: ``transformer.h.*``,
    ``gpt_neox.layers.*``, ``model.layers.*``) except the output embedding; plus every
    ``nn.Embedding`` weight if ``cfg.include_embeddings``, plus the output embedding
    (``get_output_embeddings()``, else a module named ``lm_head``/``embed_out``) if
    ``cfg.include_lm_head``. Biases and norms are never quantized.

    Tied tensors are listed once, under the name ``named_parameters()`` gives them (for
    tied GPT-2/SmolLM2 heads that is the token embedding's name), and are selected if
    either of their roles is.
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(cfg)
    conv1d = _conv1d_class()
    head = _output_embedding_module(model)
    selected: set[int] = set()
    for _, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        if m is head:
            take = cfg.include_lm_head
        elif isinstance(m, nn.Embedding):
            take = cfg.include_embeddings
        else:
            take = isinstance(m, nn.Linear) or (conv1d is not None and isinstance(m, conv1d))
        if take:
            selected.add(id(w))
    return [name for name, p in model.named_parameters() if id(p) in selected]


def transposed_parameters(model: nn.Module) -> frozenset[str]:
    """Names of the transformers ``Conv1D`` weights, which bnb's loader quantizes transposed."""
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    conv1d = _conv1d_class()
    if conv1d is None:
        return frozenset()
    ids = {id(m.weight) for m in model.modules() if isinstance(m, conv1d)}
    return frozenset(name for name, p in model.named_parameters() if id(p) in ids)


def _check_names(state: object, names: Iterable[str], what: str = "state") -> list[str]:
    if not isinstance(state, Mapping):
        raise WorkbenchError(
            f"{what}: expected a dict of parameter name -> tensor, got {type(state).__name__}"
        )
    if isinstance(names, str):
        raise WorkbenchError(f"names: expected a list of parameter names, got the string {names!r}")
    out = list(names)
    seen: set[str] = set()
    for name in out:
        if not isinstance(name, str):
            raise WorkbenchError(f"names: expected parameter names (str), got {name!r}")
        if name in seen:
            raise WorkbenchError(f"names: {name!r} is listed twice")
        seen.add(name)
        if name not in state:
            raise WorkbenchError(f"names: parameter {name!r} is not in the {what}")
    return out


def _check_transposed(transposed: Collection[str]) -> frozenset[str]:
    if (
        isinstance(transposed, str)
        or not isinstance(transposed, Iterable)
        or not all(isinstance(t, str) for t in transposed)
    ):
        raise WorkbenchError("transposed: expected a collection of parameter names")
    return frozenset(transposed)


def _steps(names: list[str], desc: str, progress: Progress | None) -> Iterator[str]:
    if progress is None:
        from tqdm.auto import tqdm

        yield from tqdm(names, desc=desc, leave=False, unit="param")
        return
    for i, name in enumerate(names):
        progress(i / max(len(names), 1), f"{desc}: {name}")
        yield name
    progress(1.0, f"{desc}: done")


def fake_quantize_state(
    state: Mapping[str, Tensor],
    names: Iterable[str],
    cfg: QuantConfig,
    *,
    transposed: Collection[str] = (),
    progress: Progress | None = None,
) -> dict[str, Tensor]:
    """A new state dict whose ``names`` entries are fake-quantized.

    Other entries are the input's own tensor objects (not copies: do not modify them in
    place). The input dict and its tensors are never modified.

    Args:
        state: parameter name -> tensor.
        names: entries to quantize (e.g. :func:`quantizable_parameters`).
        cfg: the quantizer.
        transposed: names whose blocks run along ``w.T`` (:func:`transposed_parameters`);
            names not in ``names`` are ignored.
        progress: optional ``(fraction, message)`` callback; otherwise a tqdm bar.
    """
    cfg = _check_config(cfg)
    names = _check_names(state, names)
    tr = _check_transposed(transposed)
    out = dict(state)
    for name in _steps(names, f"{cfg.label} fake-quant", progress):
        w = _check_weight(state[name], f"parameter {name!r}")
        out[name] = _qdq(w, cfg, name in tr)
    return out


def fake_quantize_model(
    model: nn.Module, cfg: QuantConfig, *, progress: Progress | None = None
) -> nn.Module:
    """A deep copy of ``model`` whose :func:`quantizable_parameters` are fake-quantized.

    Conv1D weights are quantized transposed, like transformers' bnb loader. ``model`` is
    not modified. ``progress``: optional ``(fraction, message)`` callback, else a tqdm bar.
    """
    if not isinstance(model, nn.Module):
        raise WorkbenchError(f"expected a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(cfg)
    copy = deepcopy(model)
    names = quantizable_parameters(copy, cfg)
    tr = transposed_parameters(copy)
    with torch.no_grad():
        for name in _steps(names, f"{cfg.label} fake-quant", progress):
            p = copy.get_parameter(name)
            w = _check_weight(p.detach(), f"parameter {name!r}")
            p.copy_(_qdq(w, cfg, name in tr))
    return copy


# --------------------------------------------------------------------------- occupancy / error


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
    for name in _steps(names, f"{cfg.label} occupancy", progress):
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
    for name in _steps(names, f"{cfg.label} error", progress):
        w = _check_weight(state[name], f"parameter {name!r}")
        q = _qdq(w, cfg, name in tr)
        e = float((q.double() - w.double()).pow(2).sum())
        s = float(w.double().pow(2).sum())
        out[name] = math.sqrt(e / s) if s > 0 else 0.0
        err_sq += e
        norm_sq += s
    out["overall"] = math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0
    return out


# --------------------------------------------------------------------------- comparison

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
    for name in _steps(names, f"{cfg.label} compare", progress):
        # one module at a time on the CPU (numpy): at most one extra copy of one module's weights
        d = delta.get(name)
        m, fine, exact = _compare_one(name, base[name].cpu(), d.cpu() if d is not None else None, cfg, name in tr)
        modules.append(m)
        fine_total += fine
        pool_size += m.n_changed
        if pooling and (exact is None or pool_size > _EXACT_MAX):
            pool, pooling = [], False
        elif pooling:
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
