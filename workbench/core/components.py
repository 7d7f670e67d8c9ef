"""The vocabulary of circuit components shared by attribution, circuits, CAD and MANSU.

A *component* is something that writes into (or, for ``LOGITS``, reads from) the
residual stream: the embeddings, one attention head, one layer's MLP, or the final
logits readout. Components have a stable text name used in JSON, tables and the UI:

==========  ===============  =========================================
kind        name             meaning
==========  ===============  =========================================
EMBED       ``embed``        token (+ positional) embedding write
HEAD        ``L3.H5``        attention head 5 of layer 3 (0-based)
MLP         ``L3.MLP``       the MLP of layer 3
LOGITS      ``logits``       the unembedding readout (edge sink only)
==========  ===============  =========================================

An *edge* runs from a writer to a reader component; when the reader is a head the
edge also says which of its inputs it feeds (``q``, ``k`` or ``v``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache
from typing import Literal


class ComponentKind(str, Enum):  # noqa: UP042 -- not StrEnum: f"{kind}" must keep printing ComponentKind.HEAD as before
    """What a circuit component is."""

    EMBED = "embed"
    """The embedding write (token and, where the model has them, position embeddings)."""
    HEAD = "head"
    """One attention head: its Q/K/V/O slices, scored at ``attn.hook_z``."""
    MLP = "mlp"
    """One layer's whole MLP, scored at ``hook_mlp_out``."""
    LOGITS = "logits"
    """The final readout; only ever the destination of an edge."""


_KIND_POSITION = {kind: i for i, kind in enumerate(ComponentKind)}

EdgeInput = Literal["q", "k", "v", "mlp", "logits"]
"""Which input of the destination an edge feeds: a head's query/key/value, an MLP, or the logits."""

_HEAD_RE = re.compile(r"^L(\d+)\.H(\d+)$")
_MLP_RE = re.compile(r"^L(\d+)\.MLP$")


@dataclass(frozen=True, order=True)
class Component:
    """One node of the residual-stream graph.

    Attributes:
        kind: see :class:`ComponentKind`.
        layer: 0-based layer for HEAD and MLP, ``None`` for EMBED and LOGITS.
        head: 0-based query-head index for HEAD, else ``None``.
    """

    kind: ComponentKind
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        kind = ComponentKind(self.kind)
        object.__setattr__(self, "kind", kind)
        # Hashed once: an attribution's edge dict and a circuit graph hash components ~750k
        # times per SmolLM2 click (0.5 s with the dataclass' hash of the field tuple). From
        # ints only (None -> -1; the kind by position): hash(None) and str hashes vary between
        # processes, and this value travels with a pickled component.
        object.__setattr__(self, "_hash", hash((_KIND_POSITION[kind], -1 if self.layer is None else self.layer,
                                                -1 if self.head is None else self.head)))
        if kind is ComponentKind.HEAD:
            if self.layer is None or self.head is None or self.layer < 0 or self.head < 0:
                raise ValueError(f"a head needs a layer and a head index >= 0, got {self!r}")
        elif kind is ComponentKind.MLP:
            if self.layer is None or self.layer < 0 or self.head is not None:
                raise ValueError(f"an MLP needs a layer >= 0 and no head, got {self!r}")
        elif self.layer is not None or self.head is not None:
            raise ValueError(f"{kind.value} takes neither layer nor head, got {self!r}")

    @property
    def name(self) -> str:
        """Stable text name (see the module docstring)."""
        if self.kind is ComponentKind.HEAD:
            return f"L{self.layer}.H{self.head}"
        if self.kind is ComponentKind.MLP:
            return f"L{self.layer}.MLP"
        return self.kind.value

    @classmethod
    def parse(cls, name: str) -> Component:
        """Inverse of :attr:`name`; raises ``ValueError`` naming the bad text."""
        # Memoised: a circuit graph keys its nodes and edges by name, and its views parse every
        # edge's two names (~226k parses, 1.3 s, per view of SmolLM2's 113k edges). Components
        # are frozen, so sharing one instance per name is safe.
        return _parse(name)

    @classmethod
    def _parse_uncached(cls, name: str) -> Component:
        text = name.strip()
        if text == "embed":
            return cls(ComponentKind.EMBED)
        if text == "logits":
            return cls(ComponentKind.LOGITS)
        if m := _HEAD_RE.match(text):
            return cls(ComponentKind.HEAD, int(m.group(1)), int(m.group(2)))
        if m := _MLP_RE.match(text):
            return cls(ComponentKind.MLP, int(m.group(1)))
        raise ValueError(
            f"not a component name: {name!r} (expected 'embed', 'logits', 'L<layer>.H<head>' "
            "or 'L<layer>.MLP')"
        )

    @property
    def block(self) -> int:
        """The layer of a head or MLP (``ValueError`` for embed and logits, which have none)."""
        if self.layer is None:
            raise ValueError(f"{self.name} belongs to no layer")
        return self.layer

    @property
    def head_index(self) -> int:
        """The head index of a head (``ValueError`` for any other component)."""
        if self.head is None:
            raise ValueError(f"{self.name} is not an attention head")
        return self.head

    def check_fits(self, n_layers: int, n_heads: int) -> None:
        """Raise ``ValueError`` if the model (``n_layers`` x ``n_heads``) has no such component."""
        if self.layer is not None and self.layer >= n_layers:
            raise ValueError(f"{self.name}: the model has only {n_layers} layers (0..{n_layers - 1})")
        if self.head is not None and self.head >= n_heads:
            raise ValueError(f"{self.name}: the model has only {n_heads} heads per layer")

    def __hash__(self) -> int:
        return self._hash  # type: ignore[attr-defined]  # set in __post_init__

    def __str__(self) -> str:
        return self.name


def head(layer: int, index: int) -> Component:
    """Shorthand for ``Component(ComponentKind.HEAD, layer, index)``."""
    return Component(ComponentKind.HEAD, layer, index)


def mlp(layer: int) -> Component:
    """Shorthand for ``Component(ComponentKind.MLP, layer)``."""
    return Component(ComponentKind.MLP, layer)


EMBED = Component(ComponentKind.EMBED)
LOGITS = Component(ComponentKind.LOGITS)


def all_components(n_layers: int, n_heads: int, *, include_embed: bool = True) -> list[Component]:
    """Every writer component in forward order: embed, then per layer its heads, then its MLP."""
    out = [EMBED] if include_embed else []
    for layer in range(n_layers):
        out.extend(head(layer, h) for h in range(n_heads))
        out.append(mlp(layer))
    return out


@lru_cache(maxsize=65536)
def _parse(name: str) -> Component:
    """:meth:`Component.parse`, once per name (bounded: one model's names are a few thousand)."""
    return Component._parse_uncached(name)
