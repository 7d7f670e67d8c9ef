"""Which quantizer, and which parameters it applies to: :class:`QuantConfig`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from workbench.core.errors import WorkbenchError

QuantType = Literal["nf4", "fp4", "int8"]
QUANT_TYPES: tuple[QuantType, ...] = get_args(QuantType)
"""Every quantizer the workbench simulates, in the order the faces list them."""


_QUANT_TYPES: tuple[str, ...] = get_args(QuantType)


FOUR_BIT_BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes ``quantize_4bit`` accepts (bnb rejects any other value)."""


INT8_BLOCKSIZES: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096)
"""Blocksizes bnb documents for ``quantize_blockwise``. The CPU kernel would take any
positive size, but the CUDA one only these, and a config must mean the same everywhere."""


_LABEL_RE = re.compile(r"^(nf4|fp4|int8)/b(\d+)(/dq)?(\+emb)?(\+head)?$")


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


def _check_config(cfg: object) -> QuantConfig:
    if not isinstance(cfg, QuantConfig):
        raise WorkbenchError(f"expected a QuantConfig, got {type(cfg).__name__}")
    return cfg
