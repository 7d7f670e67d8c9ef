"""The editable circuit: a graph of scored components, its selection, faithfulness, and parameters.

A :class:`Circuit` is built from an :class:`~workbench.attribution.Attribution` and holds
every scored component as a node of a ``networkx.MultiDiGraph`` (keyed by component name;
the logits readout is always present as the edge sink). Each node carries

==========  =================================================================
attribute   meaning
==========  =================================================================
kind        ``"embed"``, ``"head"``, ``"mlp"`` or ``"logits"``
layer       0-based layer, or ``None`` (embed, logits)
head        0-based query-head index, or ``None``
score       the attribution score (denoising convention, see ``Attribution``)
selected    whether the node is in the circuit (the logits sink always is)
==========  =================================================================

Edges run writer → reader with attributes ``score`` and ``input`` (``q``/``k``/``v``/
``mlp``/``logits``); the multigraph key is the input, so one writer may feed a head's
query, key and value separately. The *selected edges* are those whose both ends are
selected (the logits sink counts as selected).

The selection is edited by rules (:meth:`Circuit.select_top_k`,
:meth:`Circuit.select_threshold`, :meth:`Circuit.select_mass`) and by hand
(:meth:`Circuit.include`, :meth:`Circuit.exclude`); every change is one undoable step
(:meth:`Circuit.undo`, :meth:`Circuit.redo`). The undo history is session state and is
not saved.

Files: :meth:`Circuit.save` writes versioned JSON atomically (see :data:`SCHEMA_VERSION`),
:meth:`Circuit.load` validates it (optionally against a model), and
:meth:`Circuit.export_graphml` writes GraphML for other graph tools.

:func:`faithfulness` measures how much of the clean-vs-corrupt behaviour the circuit
carries alone, and how much is lost without it. :func:`circuit_parameters` maps
components to boolean masks over Hugging Face parameters (what MANSU may move), and
:func:`parameter_slices` describes the same slices in words for the UI.

Parameter ownership (all three architectures):

- **Head** ``Lℓ.Hh``: the rows/columns of the query, key and value projections (weights
  and biases) that produce head *h*'s q/k/v, and the rows (Conv1D) / columns (Linear) of
  the output projection that read head *h*'s ``z``. The output projection's *bias* is
  shared by all heads of the layer and belongs to none of them (``include_shared_bias``
  adds it when any head of the layer is selected).
- **Grouped-query attention** (Llama with ``n_kv_heads < n_heads``): key/value head *j*
  serves query heads ``j*g … (j+1)*g-1`` with ``g = n_heads // n_kv_heads`` (as
  transformers' ``repeat_kv``). A shared key/value slice is included when *any* query
  head of its group is in the circuit, because a head cannot be changed without its
  keys and values; it is then shared with the group's other heads, which an update to it
  also affects.
- **MLP** ``Lℓ.MLP``: its input weights and biases (GPT-2 ``c_fc``; NeoX
  ``dense_h_to_4h``; Llama ``gate_proj`` and ``up_proj``) and output weights and bias
  (``c_proj``; ``dense_4h_to_h``; ``down_proj``). With ``neurons``, only the given
  neurons' rows/columns; the output bias is then shared by all neurons and left out.
- **Embed**: the token (and position) embedding matrices, only with ``include_embed``.
- **Layer norms are never included**: each layer norm's gain/bias scales the input of
  *every* head (or the MLP) of its layer at once, so it belongs to no single component;
  moving it would change components outside the circuit.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self, get_args

import networkx as nx
import torch

from workbench.errors import WorkbenchError
from workbench.nodes import LOGITS, Component, ComponentKind, EdgeInput, all_components

if TYPE_CHECKING:
    from workbench.attribution import Attribution
    from workbench.models import LoadedModel

SCHEMA_VERSION = 1
"""Version of the circuit JSON format written by :meth:`Circuit.save`."""

FILE_KIND = "mansu-workbench-circuit"

_EDGE_INPUTS: tuple[str, ...] = get_args(EdgeInput)

_REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model_fingerprint": str,
    "method": str,
    "ig_steps": int,
    "metric": str,
    "prompts_hash": str,
    "n_layers": int,
    "n_heads": int,
    "nodes": list,
    "edges": list,
}
_OPTIONAL_FIELDS = ("n_pairs", "clean_metric", "corrupt_metric")


def component_order(component: Component, n_layers: int = 10**9) -> tuple[int, int, int]:
    """Sort key in forward order: embed, then per layer heads by index then the MLP, then logits."""
    kind = component.kind
    if kind is ComponentKind.EMBED:
        return (-1, 0, 0)
    if kind is ComponentKind.LOGITS:
        return (n_layers, 0, 0)
    if kind is ComponentKind.HEAD:
        return (int(component.layer), 0, int(component.head))  # type: ignore[arg-type]
    return (int(component.layer), 1, 0)  # type: ignore[arg-type]


def _as_component(item: Component | str, where: str = "") -> Component:
    if isinstance(item, Component):
        return item
    try:
        return Component.parse(str(item))
    except ValueError as exc:
        raise WorkbenchError(f"{where}{exc}") from None


@dataclass(frozen=True)
class CircuitDiff:
    """What changed from one circuit (``before``) to another (``after``).

    Attributes:
        added: selected in ``after`` only.
        removed: selected in ``before`` only.
        common: selected in both.
        score_changes: for components present in both graphs whose score differs,
            ``(before score, after score)``.
    """

    added: frozenset[Component]
    removed: frozenset[Component]
    common: frozenset[Component]
    score_changes: dict[Component, tuple[float, float]] = field(default_factory=dict)

    @property
    def unchanged(self) -> bool:
        """True when the selections are identical (scores may still differ)."""
        return not self.added and not self.removed

    def score_delta(self) -> dict[Component, float]:
        """``after - before`` for every component whose score changed."""
        return {c: after - before for c, (before, after) in self.score_changes.items()}


class Circuit:
    """A scored component graph with an editable selection; see the module docstring.

    Build one with :meth:`from_attribution` or :meth:`load`. ``graph`` is the live
    ``networkx.MultiDiGraph``; edit the selection through the methods here so undo/redo
    stays consistent.
    """

    def __init__(
        self,
        graph: nx.MultiDiGraph,
        *,
        model_fingerprint: str,
        method: str,
        metric: str,
        prompts_hash: str,
        n_layers: int,
        n_heads: int,
        ig_steps: int = 1,
        n_pairs: int | None = None,
        clean_metric: float | None = None,
        corrupt_metric: float | None = None,
    ) -> None:
        self.graph = graph
        self.model_fingerprint = model_fingerprint
        self.method = method
        self.metric = metric
        self.prompts_hash = prompts_hash
        self.n_layers = int(n_layers)
        self.n_heads = int(n_heads)
        self.ig_steps = int(ig_steps)
        self.n_pairs = n_pairs
        self.clean_metric = clean_metric
        self.corrupt_metric = corrupt_metric
        if LOGITS.name not in self.graph:
            self.graph.add_node(LOGITS.name, **_node_attrs(LOGITS, 0.0, True))
        self.graph.nodes[LOGITS.name]["selected"] = True
        self._history: list[frozenset[str]] = [self._current_names()]
        self._position = 0

    # --- construction -------------------------------------------------------------------
    @classmethod
    def from_attribution(cls, attribution: Attribution) -> Circuit:
        """Every scored component as an unselected node, every scored edge as an edge."""
        graph = nx.MultiDiGraph()
        n_layers, n_heads = attribution.n_layers, attribution.n_heads
        for comp, score in sorted(attribution.scores.items(), key=lambda kv: component_order(kv[0])):
            if comp.kind is ComponentKind.LOGITS:
                continue
            _check_fits(comp, n_layers, n_heads, "attribution: ")
            graph.add_node(comp.name, **_node_attrs(comp, float(score), False))
        graph.add_node(LOGITS.name, **_node_attrs(LOGITS, 0.0, True))
        for (writer, reader, inp), score in attribution.edge_scores.items():
            for comp in (writer, reader):
                _check_fits(comp, n_layers, n_heads, "attribution edge: ")
                if comp.name not in graph:
                    graph.add_node(comp.name, **_node_attrs(comp, 0.0, comp == LOGITS))
            graph.add_edge(writer.name, reader.name, key=inp, score=float(score), input=inp)
        return cls(
            graph,
            model_fingerprint=attribution.model_fingerprint,
            method=attribution.method,
            metric=attribution.metric,
            prompts_hash=attribution.prompts_hash,
            n_layers=n_layers,
            n_heads=n_heads,
            ig_steps=attribution.ig_steps,
            n_pairs=attribution.n_pairs,
            clean_metric=attribution.clean_metric,
            corrupt_metric=attribution.corrupt_metric,
        )

    def copy(self) -> Circuit:
        """An independent copy (graph, metadata and current selection; fresh undo history)."""
        return Circuit(self.graph.copy(), **self._meta_kwargs())

    # --- reading ------------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, Any]:
        """The provenance saved with the circuit."""
        return {"schema_version": SCHEMA_VERSION, **self._meta_kwargs()}

    def _meta_kwargs(self) -> dict[str, Any]:
        return {
            "model_fingerprint": self.model_fingerprint,
            "method": self.method,
            "ig_steps": self.ig_steps,
            "metric": self.metric,
            "prompts_hash": self.prompts_hash,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_pairs": self.n_pairs,
            "clean_metric": self.clean_metric,
            "corrupt_metric": self.corrupt_metric,
        }

    @property
    def components(self) -> list[Component]:
        """Every writer node (embed, heads, MLPs) in forward order; the logits sink excluded."""
        comps = [Component.parse(n) for n in self.graph.nodes if n != LOGITS.name]
        return sorted(comps, key=lambda c: component_order(c, self.n_layers))

    @property
    def scores(self) -> dict[Component, float]:
        """Score of every writer node, in forward order."""
        return {c: float(self.graph.nodes[c.name]["score"]) for c in self.components}

    @property
    def edge_scores(self) -> dict[tuple[Component, Component, str], float]:
        """Score of every edge, keyed ``(writer, reader, input)``."""
        return {
            (Component.parse(u), Component.parse(v), k): float(d["score"])
            for u, v, k, d in self.graph.edges(keys=True, data=True)
        }

    @property
    def selected(self) -> set[Component]:
        """The selected writer components (the logits sink is implicit)."""
        return {Component.parse(n) for n in self._current_names()}

    @property
    def selected_edges(self) -> dict[tuple[Component, Component, str], float]:
        """Edges whose writer is selected and whose reader is selected or the logits sink."""
        nodes = self.graph.nodes
        return {
            (Component.parse(u), Component.parse(v), k): float(d["score"])
            for u, v, k, d in self.graph.edges(keys=True, data=True)
            if nodes[u]["selected"] and (nodes[v]["selected"] or v == LOGITS.name)
        }

    def __len__(self) -> int:
        return len(self.graph) - 1

    def __contains__(self, item: object) -> bool:
        name = item.name if isinstance(item, Component) else str(item)
        return name != LOGITS.name and name in self.graph

    def __repr__(self) -> str:
        return (
            f"Circuit({len(self)} components, {self.graph.number_of_edges()} edges, "
            f"{len(self._current_names())} selected, method={self.method!r}, "
            f"model={self.model_fingerprint!r})"
        )

    def _current_names(self) -> frozenset[str]:
        return frozenset(
            n for n, d in self.graph.nodes(data=True) if d.get("selected") and n != LOGITS.name
        )

    def _candidates(self, include_embed: bool) -> list[tuple[str, float]]:
        out = []
        for c in self.components:
            if c.kind is ComponentKind.EMBED and not include_embed:
                continue
            out.append((c.name, float(self.graph.nodes[c.name]["score"])))
        # Largest |score| first; ties broken in forward order (sorted() is stable).
        return sorted(out, key=lambda kv: -abs(kv[1]))

    # --- selection ----------------------------------------------------------------------
    def set_selection(self, components: Iterable[Component | str]) -> Self:
        """Replace the selection by exactly ``components`` (one undoable step)."""
        names = frozenset(self._resolve(components))
        self._commit(names)
        return self

    def clear_selection(self) -> Self:
        """Select nothing (one undoable step)."""
        return self.set_selection(())

    def select_top_k(self, k: int, *, include_embed: bool = True) -> Self:
        """Select the ``k`` components of largest ``|score|`` (ties in forward order)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise WorkbenchError(f"top-k needs a whole number k >= 0, got {k!r}")
        self._commit(frozenset(n for n, _ in self._candidates(include_embed)[:k]))
        return self

    def select_threshold(self, threshold: float, *, include_embed: bool = True) -> Self:
        """Select every component with ``|score| >= threshold``."""
        t = _finite(threshold, "threshold")
        if t < 0:
            raise WorkbenchError(f"threshold must be >= 0 (it is compared with |score|), got {t}")
        self._commit(frozenset(n for n, s in self._candidates(include_embed) if abs(s) >= t))
        return self

    def select_mass(self, fraction: float, *, include_embed: bool = True) -> Self:
        """Select the fewest components whose ``|score|`` sum reaches ``fraction`` of the total.

        Components are taken in order of decreasing ``|score|``; ``fraction`` is in [0, 1]
        (0 selects nothing, 1 everything with a non-zero score).
        """
        f = _finite(fraction, "mass fraction")
        if not 0.0 <= f <= 1.0:
            raise WorkbenchError(f"mass fraction must be between 0 and 1, got {f}")
        cands = self._candidates(include_embed)
        total = sum(abs(s) for _, s in cands)
        chosen: list[str] = []
        if f > 0 and total > 0:
            target = f * total * (1 - 1e-12)
            acc = 0.0
            for name, s in cands:
                if acc >= target or s == 0:
                    break
                chosen.append(name)
                acc += abs(s)
        self._commit(frozenset(chosen))
        return self

    def include(self, *components: Component | str) -> Self:
        """Add components to the selection by hand (one undoable step)."""
        self._commit(self._current_names() | self._resolve(components))
        return self

    def exclude(self, *components: Component | str) -> Self:
        """Remove components from the selection by hand (one undoable step)."""
        self._commit(self._current_names() - self._resolve(components))
        return self

    def toggle(self, component: Component | str) -> Self:
        """Flip one component's membership (one undoable step); handy for click handlers."""
        (name,) = self._resolve([component])
        current = self._current_names()
        self._commit(current - {name} if name in current else current | {name})
        return self

    @property
    def can_undo(self) -> bool:
        return self._position > 0

    @property
    def can_redo(self) -> bool:
        return self._position < len(self._history) - 1

    def undo(self) -> bool:
        """Go back one selection step; ``False`` if there is nothing to undo."""
        if not self.can_undo:
            return False
        self._position -= 1
        self._apply(self._history[self._position])
        return True

    def redo(self) -> bool:
        """Re-apply the step last undone; ``False`` if there is nothing to redo."""
        if not self.can_redo:
            return False
        self._position += 1
        self._apply(self._history[self._position])
        return True

    def _resolve(self, components: Iterable[Component | str]) -> frozenset[str]:
        if isinstance(components, (str, Component)):
            components = [components]
        names = set()
        for item in components:
            comp = _as_component(item)
            if comp.kind is ComponentKind.LOGITS:
                raise WorkbenchError("'logits' is the circuit's sink and is always included; it cannot be selected")
            if comp.name not in self.graph:
                raise WorkbenchError(
                    f"{comp.name} is not in this circuit (model with {self.n_layers} layers x "
                    f"{self.n_heads} heads; scored components only)"
                )
            names.add(comp.name)
        return frozenset(names)

    def _commit(self, names: frozenset[str]) -> None:
        if names == self._current_names():
            return
        del self._history[self._position + 1 :]
        self._history.append(names)
        self._position += 1
        self._apply(names)

    def _apply(self, names: frozenset[str]) -> None:
        for n, d in self.graph.nodes(data=True):
            d["selected"] = n == LOGITS.name or n in names

    # --- comparison ---------------------------------------------------------------------
    def diff(self, other: Circuit) -> CircuitDiff:
        """How ``other`` differs from this circuit (this = before, other = after)."""
        mine, theirs = self.selected, other.selected
        changes: dict[Component, tuple[float, float]] = {}
        a, b = self.scores, other.scores
        for comp in a.keys() & b.keys():
            if a[comp] != b[comp]:
                changes[comp] = (a[comp], b[comp])
        return CircuitDiff(
            added=frozenset(theirs - mine),
            removed=frozenset(mine - theirs),
            common=frozenset(mine & theirs),
            score_changes=dict(sorted(changes.items(), key=lambda kv: component_order(kv[0]))),
        )

    # --- files --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document :meth:`save` writes."""
        nodes = []
        for comp in self.components:
            d = self.graph.nodes[comp.name]
            nodes.append({
                "name": comp.name,
                "kind": comp.kind.value,
                "layer": comp.layer,
                "head": comp.head,
                "score": float(d["score"]),
                "selected": bool(d["selected"]),
            })
        edges = [
            {"source": u, "target": v, "input": k, "score": float(d["score"])}
            for u, v, k, d in self.graph.edges(keys=True, data=True)
        ]
        return {"kind": FILE_KIND, **self.metadata, "nodes": nodes, "edges": edges}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the circuit as JSON, atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        try:
            text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        except ValueError as exc:
            raise WorkbenchError(f"cannot save circuit to {path}: a score is not a finite number ({exc})") from exc
        _atomic_write(path, text.encode("utf-8"))
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "circuit", model: LoadedModel | None = None) -> Circuit:
        """Validate a JSON document (as :meth:`to_dict` makes) and build the circuit.

        ``source`` names the file in error messages. With ``model``, the circuit must have
        been computed on it (same fingerprint) and name only components it has.
        """
        where = f"{source}: "
        if not isinstance(data, dict):
            raise WorkbenchError(f"{where}expected a JSON object at the top level, got {type(data).__name__}")
        if "schema_version" not in data:
            raise WorkbenchError(f"{where}missing field 'schema_version' (is this a circuit file?)")
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise WorkbenchError(
                f"{where}unknown schema_version {version!r}; this workbench reads version {SCHEMA_VERSION}"
            )
        if data.get("kind", FILE_KIND) != FILE_KIND:
            raise WorkbenchError(f"{where}kind is {data.get('kind')!r}, not a circuit ({FILE_KIND!r})")
        for key, typ in _REQUIRED_FIELDS.items():
            if key not in data:
                raise WorkbenchError(f"{where}missing field {key!r}")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, typ):
                raise WorkbenchError(f"{where}field {key!r} must be a {_type_name(typ)}, got {value!r:.60}")
        n_layers, n_heads = data["n_layers"], data["n_heads"]
        if n_layers < 1 or n_heads < 1:
            raise WorkbenchError(f"{where}n_layers and n_heads must be >= 1, got {n_layers} and {n_heads}")
        optional: dict[str, Any] = {}
        for key in _OPTIONAL_FIELDS:
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise WorkbenchError(f"{where}field {key!r} must be a number or null, got {value!r:.60}")
            optional[key] = value

        graph = nx.MultiDiGraph()
        selected: set[str] = set()
        for i, node in enumerate(data["nodes"]):
            at = f"{where}nodes[{i}]"
            if not isinstance(node, dict):
                raise WorkbenchError(f"{at}: expected an object, got {node!r:.60}")
            for key in ("name", "score", "selected"):
                if key not in node:
                    raise WorkbenchError(f"{at}: missing field {key!r}")
            comp = _as_component(node["name"], f"{at}.name: ")
            if comp.kind is ComponentKind.LOGITS:
                continue
            _check_fits(comp, n_layers, n_heads, f"{at}: ", "the circuit file says")
            for key, expect in (("kind", comp.kind.value), ("layer", comp.layer), ("head", comp.head)):
                if key in node and node[key] != expect:
                    raise WorkbenchError(f"{at}.{key}: {node[key]!r} contradicts the name {comp.name!r}")
            if comp.name in graph:
                raise WorkbenchError(f"{at}: duplicate node {comp.name!r}")
            score = _number(node["score"], f"{at}.score")
            if not isinstance(node["selected"], bool):
                raise WorkbenchError(f"{at}.selected: must be true or false, got {node['selected']!r:.60}")
            graph.add_node(comp.name, **_node_attrs(comp, score, False))
            if node["selected"]:
                selected.add(comp.name)
        graph.add_node(LOGITS.name, **_node_attrs(LOGITS, 0.0, True))
        for i, edge in enumerate(data["edges"]):
            at = f"{where}edges[{i}]"
            if not isinstance(edge, dict):
                raise WorkbenchError(f"{at}: expected an object, got {edge!r:.60}")
            for key in ("source", "target", "input", "score"):
                if key not in edge:
                    raise WorkbenchError(f"{at}: missing field {key!r}")
            for key in ("source", "target"):
                comp = _as_component(edge[key], f"{at}.{key}: ")
                if comp.name not in graph:
                    raise WorkbenchError(f"{at}.{key}: {comp.name!r} is not one of the file's nodes")
            if edge["input"] not in _EDGE_INPUTS:
                raise WorkbenchError(f"{at}.input: {edge['input']!r} is not one of {', '.join(_EDGE_INPUTS)}")
            src, dst = Component.parse(edge["source"]).name, Component.parse(edge["target"]).name
            score = _number(edge["score"], f"{at}.score")
            graph.add_edge(src, dst, key=edge["input"], score=score, input=edge["input"])

        if model is not None:
            for name in graph.nodes:
                _check_fits(Component.parse(name), model.n_layers, model.n_heads, where, f"model {model.name!r}")
            if data["model_fingerprint"] != model.fingerprint:
                raise WorkbenchError(
                    f"{where}this circuit was computed on a different model (fingerprint "
                    f"{data['model_fingerprint']}), not on {model.name!r} (fingerprint {model.fingerprint})"
                )

        circuit = cls(
            graph,
            model_fingerprint=data["model_fingerprint"],
            method=data["method"],
            metric=data["metric"],
            prompts_hash=data["prompts_hash"],
            n_layers=n_layers,
            n_heads=n_heads,
            ig_steps=data["ig_steps"],
            **optional,
        )
        circuit._apply(frozenset(selected))
        circuit._history = [circuit._current_names()]
        circuit._position = 0
        return circuit

    @classmethod
    def load(cls, path: str | os.PathLike[str], model: LoadedModel | None = None) -> Circuit:
        """Read a circuit saved by :meth:`save`; every problem is a ``WorkbenchError`` naming the file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise WorkbenchError(f"{path}: no such circuit file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise WorkbenchError(f"{path}: cannot read the circuit file ({exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise WorkbenchError(
                f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from None
        return cls.from_dict(data, source=str(path), model=model)

    def to_graphml_graph(self) -> nx.MultiDiGraph:
        """A copy with GraphML-safe attributes (no ``None``: absent layer/head are omitted)."""
        g = nx.MultiDiGraph()
        for key, value in self.metadata.items():
            if value is not None:
                g.graph[key] = value
        for n, d in self.graph.nodes(data=True):
            attrs = {"kind": str(d["kind"]), "score": float(d["score"]), "selected": bool(d["selected"])}
            for key in ("layer", "head"):
                if d.get(key) is not None:
                    attrs[key] = int(d[key])
            g.add_node(n, **attrs)
        for u, v, k, d in self.graph.edges(keys=True, data=True):
            g.add_edge(u, v, key=k, score=float(d["score"]), input=str(d["input"]))
        return g

    def export_graphml(self, path: str | os.PathLike[str]) -> Path:
        """Write the graph as GraphML (readable by ``networkx.read_graphml``, Gephi, yEd), atomically."""
        path = Path(path)
        g = self.to_graphml_graph()

        def write(tmp: Path) -> None:
            nx.write_graphml(g, tmp)

        _atomic_write(path, write)
        return path


# --- helpers for the graph/file code ----------------------------------------------------


def _node_attrs(comp: Component, score: float, selected: bool) -> dict[str, Any]:
    return {
        "kind": comp.kind.value,
        "layer": comp.layer,
        "head": comp.head,
        "score": float(score),
        "selected": selected,
    }


def _check_fits(comp: Component, n_layers: int, n_heads: int, where: str, owner: str = "the model has") -> None:
    try:
        comp.check_fits(n_layers, n_heads)
    except ValueError as exc:
        raise WorkbenchError(f"{where}{exc} ({owner} {n_layers} layers x {n_heads} heads)") from None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise WorkbenchError(f"{where}: must be a finite number, got {value!r:.60}")
    return float(value)


def _finite(value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise WorkbenchError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise WorkbenchError(f"{what} must be finite, got {value!r}")
    return number


def _type_name(typ: type | tuple[type, ...]) -> str:
    names = {str: "string", int: "whole number", float: "number", list: "list", dict: "object"}
    if isinstance(typ, tuple):
        return " or ".join(names.get(t, t.__name__) for t in typ)
    return names.get(typ, typ.__name__)


def _atomic_write(path: Path, content: bytes | Any) -> None:
    """Write bytes (or call ``content(tmp_path)``) to a temp file beside ``path``, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        if isinstance(content, bytes):
            with os.fdopen(fd, "wb") as fh:
                fh.write(content)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            content(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- faithfulness -----------------------------------------------------------------------


@dataclass(frozen=True)
class Faithfulness:
    """How well a circuit accounts for the clean-vs-corrupt behaviour.

    Attributes:
        recovered: ``(m_circuit_only - m_corrupt) / (m_clean - m_corrupt)``, with everything
            outside the circuit ablated: 1 = the circuit alone reproduces the clean metric,
            0 = no better than the corrupt run.
        drop: ``(m_clean - m_without_circuit) / (m_clean - m_corrupt)``, with the circuit
            itself ablated and everything else kept: 1 = removing the circuit loses the
            whole gap, 0 = nothing is lost.
        clean_metric, corrupt_metric: the two baselines.
        circuit_only_metric: metric with only the circuit kept.
        without_circuit_metric: metric with the circuit ablated.
        ablation: ``"corrupt"`` (patch in corrupt-run activations) or ``"mean"``.
        n_components: size of the circuit.
    """

    recovered: float
    drop: float
    clean_metric: float
    corrupt_metric: float
    circuit_only_metric: float
    without_circuit_metric: float
    ablation: str
    n_components: int


def faithfulness(
    circuit: Circuit,
    model: LoadedModel,
    pairs: Any,
    ablation: Literal["corrupt", "mean"] = "corrupt",
    *,
    metric: str | None = None,
    allow_other_model: bool = False,
) -> Faithfulness:
    """Ablate everything outside the circuit (→ ``recovered``) and the circuit itself (→ ``drop``).

    ``pairs`` are the clean/corrupt prompt pairs of :func:`workbench.attribution.make_prompt_pairs`,
    or facts (paired here with that function). Uses :func:`workbench.attribution.ablated_metric` with the kept set; the writer
    components are the model's embed, heads and MLPs. ``metric`` overrides the pairs'
    metric (default: the one the pairs were built for). The circuit must come from
    ``model`` (same fingerprint) unless ``allow_other_model`` (e.g. asking whether a
    base-model circuit still carries the behaviour in an unlearned model of the same shape).
    """
    from workbench.attribution import ablated_metric, make_prompt_pairs, metric_baselines
    from workbench.facts import Fact

    if isinstance(pairs, (list, tuple)) and pairs and isinstance(pairs[0], Fact):
        pairs = make_prompt_pairs(model, list(pairs))
    if ablation not in ("corrupt", "mean"):
        raise WorkbenchError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
    if not allow_other_model and circuit.model_fingerprint != model.fingerprint:
        raise WorkbenchError(
            f"the circuit was computed on a model with fingerprint {circuit.model_fingerprint}, "
            f"not on {model.name!r} ({model.fingerprint})"
        )
    keep = circuit.selected
    for comp in keep:
        _check_fits(comp, model.n_layers, model.n_heads, "circuit: ")
    everything = set(all_components(model.n_layers, model.n_heads, include_embed=True))
    extra: dict[str, Any] = {} if metric is None else {"metric": metric}
    clean, corrupt = (float(x) for x in metric_baselines(model, pairs, **extra))
    gap = clean - corrupt
    if not math.isfinite(gap) or abs(gap) <= 1e-6 * max(1.0, abs(clean), abs(corrupt)):
        raise WorkbenchError(
            f"faithfulness is undefined: the clean metric ({clean:.6g}) equals the corrupt metric "
            f"({corrupt:.6g}), so there is no behaviour for the circuit to recover; use prompt "
            "pairs whose corrupt answer differs"
        )
    circuit_only = float(ablated_metric(model, pairs, keep=set(keep), ablation=ablation, **extra))
    without = float(ablated_metric(model, pairs, keep=everything - set(keep), ablation=ablation, **extra))
    return Faithfulness(
        recovered=(circuit_only - corrupt) / gap,
        drop=(clean - without) / gap,
        clean_metric=clean,
        corrupt_metric=corrupt,
        circuit_only_metric=circuit_only,
        without_circuit_metric=without,
        ablation=ablation,
        n_components=len(keep),
    )


# --- circuit -> parameters --------------------------------------------------------------

Index = tuple[Any, ...]


@dataclass(frozen=True)
class ParamSlice:
    """One slice of one HF parameter owned by a component.

    Attributes:
        param: Hugging Face parameter name.
        index: the index into the parameter (slices / index lists per dimension).
        description: readable text, e.g. ``"[:, 32:48] query of head 2"``.
    """

    param: str
    index: Index
    description: str


def _span(start: int, length: int) -> slice:
    return slice(start, start + length)


def _fmt(index: Index) -> str:
    parts = []
    for ix in index:
        if isinstance(ix, slice):
            parts.append(":" if ix.start is None and ix.stop is None else f"{ix.start}:{ix.stop}")
        elif isinstance(ix, list):
            parts.append(_fmt_list(ix))
        else:
            parts.append(str(ix))
    return "[" + ", ".join(parts) + "]"


def _fmt_list(ix: list[int]) -> str:
    if len(ix) <= 6:
        return "{" + ", ".join(map(str, ix)) + "}"
    return "{" + ", ".join(map(str, ix[:3])) + f", … ({len(ix)} neurons)" + "}"


def _layer_params(model: LoadedModel) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.hf.named_parameters()}


def _mlp_size(params: dict[str, torch.Tensor], name: str, dim: int) -> int:
    return int(params[name].shape[dim])


def _component_slices(
    model: LoadedModel,
    comp: Component,
    *,
    neurons: list[int] | None = None,
    include_embed: bool = False,
    include_shared_bias: bool = False,
    params: dict[str, torch.Tensor] | None = None,
) -> list[ParamSlice]:
    params = params if params is not None else _layer_params(model)
    arch = model.architecture
    out: list[ParamSlice] = []

    def add(name: str, index: Index, text: str) -> None:
        if name in params:  # biases are optional in NeoX/Llama configs
            out.append(ParamSlice(name, index, f"{_fmt(index)} {text}"))

    ALL = slice(None)
    kind = comp.kind
    if kind is ComponentKind.LOGITS:
        return out
    if kind is ComponentKind.EMBED:
        if include_embed:
            for name in {"gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
                         "gpt_neox": ["gpt_neox.embed_in.weight"],
                         "llama": ["model.embed_tokens.weight"]}[arch]:
                add(name, (ALL, ALL), "whole embedding matrix")
        return out

    layer = int(comp.layer)  # type: ignore[arg-type]
    dh, nh, d = model.d_head, model.n_heads, model.d_model
    if kind is ComponentKind.HEAD:
        h = int(comp.head)  # type: ignore[arg-type]
        cols = _span(h * dh, dh)
        if arch == "gpt2":
            p = f"transformer.h.{layer}.attn."
            for j, part in enumerate(("query", "key", "value")):
                s = _span(j * d + h * dh, dh)
                add(p + "c_attn.weight", (ALL, s), f"{part} of head {h} (Conv1D [in, out]: columns)")
                add(p + "c_attn.bias", (s,), f"{part} bias of head {h}")
            add(p + "c_proj.weight", (cols, ALL), f"output rows reading head {h}'s z (Conv1D [in, out])")
            if include_shared_bias:
                add(p + "c_proj.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        elif arch == "gpt_neox":
            p = f"gpt_neox.layers.{layer}.attention."
            # HF GPTNeoXAttention: qkv(x).view(..., n_heads, 3 * d_head) then chunk(3) ->
            # per head, rows [h*3*dh, (h+1)*3*dh) hold q | k | v, each d_head long.
            for j, part in enumerate(("query", "key", "value")):
                s = _span(h * 3 * dh + j * dh, dh)
                add(p + "query_key_value.weight", (s, ALL), f"{part} of head {h} (interleaved per head)")
                add(p + "query_key_value.bias", (s,), f"{part} bias of head {h}")
            add(p + "dense.weight", (ALL, cols), f"output columns reading head {h}'s z")
            if include_shared_bias:
                add(p + "dense.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        else:  # llama
            p = f"model.layers.{layer}.self_attn."
            group = nh // model.n_kv_heads
            kv = h // group
            add(p + "q_proj.weight", (cols, ALL), f"query of head {h}")
            add(p + "q_proj.bias", (cols,), f"query bias of head {h}")
            kv_rows = _span(kv * dh, dh)
            shared = (
                f" (kv head {kv}, shared by query heads {kv * group}–{(kv + 1) * group - 1})"
                if group > 1 else ""
            )
            for part, proj in (("key", "k_proj"), ("value", "v_proj")):
                add(p + f"{proj}.weight", (kv_rows, ALL), f"{part} of head {h}{shared}")
                add(p + f"{proj}.bias", (kv_rows,), f"{part} bias of head {h}{shared}")
            add(p + "o_proj.weight", (ALL, cols), f"output columns reading head {h}'s z")
            if include_shared_bias:
                add(p + "o_proj.bias", (ALL,), f"output bias (shared by all heads of layer {layer})")
        return out

    # MLP
    if arch == "gpt2":
        p = f"transformer.h.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "c_fc.weight", 1)
        n_ix: Any = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        add(p + "c_fc.weight", (ALL, n_ix), f"input columns, {what} (Conv1D [in, out])")
        add(p + "c_fc.bias", (n_ix,), f"input bias, {what}")
        add(p + "c_proj.weight", (n_ix, ALL), f"output rows, {what} (Conv1D [in, out])")
        if neurons is None:
            add(p + "c_proj.bias", (ALL,), "output bias")
    elif arch == "gpt_neox":
        p = f"gpt_neox.layers.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "dense_h_to_4h.weight", 0)
        n_ix = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        add(p + "dense_h_to_4h.weight", (n_ix, ALL), f"input rows, {what}")
        add(p + "dense_h_to_4h.bias", (n_ix,), f"input bias, {what}")
        add(p + "dense_4h_to_h.weight", (ALL, n_ix), f"output columns, {what}")
        if neurons is None:
            add(p + "dense_4h_to_h.bias", (ALL,), "output bias")
    else:
        p = f"model.layers.{layer}.mlp."
        d_mlp = _mlp_size(params, p + "up_proj.weight", 0)
        n_ix = _neuron_index(neurons, d_mlp, comp)
        what = "all neurons" if neurons is None else "neurons"
        for proj in ("gate_proj", "up_proj"):
            add(p + f"{proj}.weight", (n_ix, ALL), f"{proj.split('_')[0]} rows, {what}")
            add(p + f"{proj}.bias", (n_ix,), f"{proj.split('_')[0]} bias, {what}")
        add(p + "down_proj.weight", (ALL, n_ix), f"down columns, {what}")
        if neurons is None:
            add(p + "down_proj.bias", (ALL,), "output bias")
    return out


def _neuron_index(neurons: list[int] | None, d_mlp: int, comp: Component) -> Any:
    if neurons is None:
        return slice(None)
    out = []
    for n in neurons:
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < d_mlp:
            raise WorkbenchError(f"{comp.name}: neuron {n!r} is out of range (the MLP has {d_mlp} neurons)")
        out.append(n)
    return sorted(set(out))


def _validate(model: LoadedModel, components: Iterable[Component | str]) -> list[Component]:
    comps = []
    for item in components:
        comp = _as_component(item)
        _check_fits(comp, model.n_layers, model.n_heads, f"model {model.name!r}: ")
        comps.append(comp)
    return sorted(set(comps), key=lambda c: component_order(c))


def circuit_parameters(
    model: LoadedModel,
    components: Iterable[Component | str],
    *,
    include_embed: bool = False,
    neurons: Mapping[int, Iterable[int]] | None = None,
    include_shared_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """Boolean masks over HF parameters: True where a parameter belongs to a given component.

    Args:
        model: the model whose parameters are masked (shapes and architecture).
        components: heads, MLPs, optionally ``EMBED`` (names or :class:`Component`);
            ``LOGITS`` owns no parameters and is ignored. E.g. ``circuit.selected``.
        include_embed: map ``EMBED`` to the whole embedding matrices (off: ignored).
        neurons: ``{layer: [neuron, ...]}`` restricts the MLP of that layer to those
            neurons' rows/columns (its output bias, shared by all neurons, is then left
            out). The MLP itself must be among ``components``.
        include_shared_bias: also mask each attention layer's output bias when any of
            its heads is given (shared by all the layer's heads; off by default).

    Returns:
        ``{HF parameter name: torch.bool tensor of the parameter's shape}``, only for
        parameters with at least one True entry. See the module docstring for which
        slices each component owns (GQA and fused-QKV layouts included).
    """
    comps = _validate(model, components)
    neuron_map: dict[int, list[int]] = {}
    if neurons:
        mlps = {c.layer for c in comps if c.kind is ComponentKind.MLP}
        for layer, idx in neurons.items():
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise WorkbenchError(f"neurons: layer keys must be integers, got {layer!r}")
            if layer not in mlps:
                raise WorkbenchError(
                    f"neurons given for layer {layer}, but L{layer}.MLP is not among the components"
                )
            neuron_map[layer] = list(idx)
    params = _layer_params(model)
    masks: dict[str, torch.Tensor] = {}
    for comp in comps:
        for sl in _component_slices(
            model,
            comp,
            neurons=neuron_map.get(comp.layer) if comp.kind is ComponentKind.MLP else None,  # type: ignore[arg-type]
            include_embed=include_embed,
            include_shared_bias=include_shared_bias,
            params=params,
        ):
            if sl.param not in masks:
                masks[sl.param] = torch.zeros(params[sl.param].shape, dtype=torch.bool, device=params[sl.param].device)
            masks[sl.param][_torch_index(sl.index)] = True
    return {k: v for k, v in masks.items() if bool(v.any())}


def _torch_index(index: Index) -> tuple[Any, ...]:
    """Turn per-dimension lists into an open mesh so list x slice indexes a block."""
    lists = [i for i, ix in enumerate(index) if isinstance(ix, list)]
    if not lists:
        return index
    (dim,) = lists  # at most one neuron list per index
    out = list(index)
    out[dim] = torch.tensor(index[dim], dtype=torch.long)
    return tuple(out)


def parameter_slices(
    model: LoadedModel,
    component: Component | str,
    *,
    neurons: Iterable[int] | None = None,
    include_embed: bool = True,
    include_shared_bias: bool = False,
) -> list[tuple[str, str]]:
    """Human-readable ``(HF parameter name, slice description)`` pairs owned by one component.

    Same mapping as :func:`circuit_parameters` (here ``EMBED`` is described by default).
    """
    (comp,) = _validate(model, [component])
    slices = _component_slices(
        model,
        comp,
        neurons=list(neurons) if neurons is not None and comp.kind is ComponentKind.MLP else None,
        include_embed=include_embed,
        include_shared_bias=include_shared_bias,
    )
    return [(s.param, s.description) for s in slices]


__all__ = [
    "SCHEMA_VERSION",
    "Circuit",
    "CircuitDiff",
    "Faithfulness",
    "ParamSlice",
    "circuit_parameters",
    "component_order",
    "faithfulness",
    "parameter_slices",
]
