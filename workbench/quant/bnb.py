"""The one interface to bitsandbytes' quantizers: a flat tensor in, codes and block scales out.

4-bit codes come out of bnb packed two per byte: the *earlier* weight is the **high**
nibble (``byte >> 4``), the later one the low nibble; an odd count is padded with one code
in the last byte's low nibble. Two absmax values per block: the *exact* absmax, which
decides codes, and the *effective* absmax multiplied at dequantization, which differs only
under double quantization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from workbench.core.errors import WorkbenchError
from workbench.quant.config import QuantConfig

_DQ_BLOCKSIZE_4BIT = 256  # compress_statistics quantizes the absmax vector in blocks of 256


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
