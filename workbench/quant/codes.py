"""Quantizing one weight: its codes (:func:`quantize_codes`) or its fake-quantized values
(:func:`quantize_dequantize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.quant.bnb import _bnb_codes, _check_weight, _Codes, _layout, _unlayout
from workbench.quant.config import QuantConfig, _check_config
from workbench.quant.tables import _lookup, _tables


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
