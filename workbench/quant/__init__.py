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

from workbench.quant.codes import QuantizedWeight, quantize_codes, quantize_dequantize, quantize_weight
from workbench.quant.compare import RATIO_EDGES, ModuleComparison, QuantComparison, compare_quantization
from workbench.quant.config import FOUR_BIT_BLOCKSIZES, INT8_BLOCKSIZES, QUANT_TYPES, QuantConfig, QuantType
from workbench.quant.geometry import (
    BinGeometry,
    BinPlacement,
    PackedPlacement,
    bin_geometry,
    bin_histogram,
    bin_occupancy,
    bin_placement,
    packed_placement,
    unpack_placement,
    weight_relative_error,
)
from workbench.quant.model import fake_quantize_model, fake_quantize_state, quantized_copy
from workbench.quant.parameters import (
    conv1d_class,
    quantizable_parameters,
    single_use_linear_owners,
    transposed_parameters,
)
from workbench.quant.tables import code_order, code_table, decision_boundaries

__all__ = [
    "FOUR_BIT_BLOCKSIZES",
    "INT8_BLOCKSIZES",
    "QUANT_TYPES",
    "RATIO_EDGES",
    "BinGeometry",
    "BinPlacement",
    "ModuleComparison",
    "PackedPlacement",
    "QuantComparison",
    "QuantConfig",
    "QuantType",
    "QuantizedWeight",
    "bin_geometry",
    "bin_histogram",
    "bin_occupancy",
    "bin_placement",
    "code_order",
    "code_table",
    "compare_quantization",
    "conv1d_class",
    "decision_boundaries",
    "fake_quantize_model",
    "fake_quantize_state",
    "packed_placement",
    "quantizable_parameters",
    "quantize_codes",
    "quantize_dequantize",
    "quantize_weight",
    "quantized_copy",
    "single_use_linear_owners",
    "transposed_parameters",
    "unpack_placement",
    "weight_relative_error",
]
