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
"""

from __future__ import annotations

import heapq
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, get_args

import networkx as nx

from workbench.core.components import LOGITS, Component, ComponentKind, EdgeInput
from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_write, parse_json
from workbench.interpretability.attribution import Attribution, MetricName
from workbench.models.loaded import LoadedModel

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
        metric: MetricName,
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
        self.metric: MetricName = metric
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
        # Each component is checked, named and added once, not at each of its edges (SmolLM2 has
        # ~1,100 components and ~123k edges); nodes and edges go in in the same order as before.
        names: dict[Component, str] = {}

        def node(comp: Component) -> str:
            name = names.get(comp)
            if name is None:
                _check_fits(comp, n_layers, n_heads, "attribution edge: ")
                name = names[comp] = comp.name
                if name not in graph:
                    graph.add_node(name, **_node_attrs(comp, 0.0, comp == LOGITS))
            return name

        for (writer, reader, inp), score in attribution.edge_scores.items():
            graph.add_edge(node(writer), node(reader), key=inp, score=float(score), input=inp)
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
        return {
            (Component.parse(u), Component.parse(v), k): float(d["score"])
            for u, v, k, d in self.graph.edges(keys=True, data=True)
            if self._edge_selected(u, v)
        }

    def _edge_selected(self, writer: str, reader: str) -> bool:
        nodes = self.graph.nodes
        return bool(nodes[writer]["selected"] and (nodes[reader]["selected"] or reader == LOGITS.name))

    def strongest_edges(self, n: int) -> list[tuple[tuple[Component, Component, str], float, bool]]:
        """The ``n`` edges of largest ``|score|`` (ordered as ``sorted`` by it, strongest first),
        each with whether it is selected (as in :attr:`selected_edges`). Reads the graph once and
        parses only the ``n`` kept: a redraw of SmolLM2's 113k edges otherwise parsed them all."""
        edges = self.graph.edges(keys=True, data="score")
        top = heapq.nsmallest(n, edges, key=lambda e: -abs(e[3]))  # == sorted(edges, key=...)[:n]
        return [((Component.parse(u), Component.parse(v), k), float(score), self._edge_selected(u, v))
                for u, v, k, score in top]

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
        atomic_write(path, text.encode("utf-8"))
        return path

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "circuit", model: LoadedModel | None = None) -> Circuit:
        """Validate a JSON document (as :meth:`to_dict` makes) and build the circuit.

        ``source`` names the file in error messages. With ``model``, the circuit must have
        been computed on it (same fingerprint) and name only components it has.
        """
        where = f"{source}: "
        header = _checked_header(data, where)
        n_layers, n_heads = header["n_layers"], header["n_heads"]
        graph = nx.MultiDiGraph()
        selected = _read_nodes(graph, header["nodes"], n_layers, n_heads, where)
        graph.add_node(LOGITS.name, **_node_attrs(LOGITS, 0.0, True))
        _read_edges(graph, header["edges"], where)
        if model is not None:
            _check_model(graph, header["model_fingerprint"], model, where)
        circuit = cls(
            graph,
            model_fingerprint=header["model_fingerprint"],
            method=header["method"],
            metric=header["metric"],
            prompts_hash=header["prompts_hash"],
            n_layers=n_layers,
            n_heads=n_heads,
            ig_steps=header["ig_steps"],
            **{key: header.get(key) for key in _OPTIONAL_FIELDS},
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
        data = parse_json(text, source=str(path))
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

        atomic_write(path, write)
        return path


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


# --- reading a circuit file, one check per step (Circuit.from_dict) ------------------------

def _checked_header(data: Any, where: str) -> dict[str, Any]:
    """The document's top level: schema, kind, required and optional fields with their types."""
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
    if data["n_layers"] < 1 or data["n_heads"] < 1:
        raise WorkbenchError(f"{where}n_layers and n_heads must be >= 1, got {data['n_layers']} and {data['n_heads']}")
    for key in _OPTIONAL_FIELDS:
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise WorkbenchError(f"{where}field {key!r} must be a number or null, got {value!r:.60}")
    if data["metric"] not in get_args(MetricName):
        raise WorkbenchError(f"{where}metric {data['metric']!r} is not one of {', '.join(get_args(MetricName))}")
    return data


def _read_nodes(graph: nx.MultiDiGraph, nodes: list[Any], n_layers: int, n_heads: int, where: str) -> set[str]:
    """Add the file's nodes to ``graph``; return the names of the selected ones."""
    selected: set[str] = set()
    for i, node in enumerate(nodes):
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
    return selected


def _read_edges(graph: nx.MultiDiGraph, edges: list[Any], where: str) -> None:
    """Add the file's edges to ``graph``; each must join two of its nodes."""
    for i, edge in enumerate(edges):
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


def _check_model(graph: nx.MultiDiGraph, fingerprint: str, model: LoadedModel, where: str) -> None:
    """The circuit names only components ``model`` has and was computed on it."""
    for name in graph.nodes:
        _check_fits(Component.parse(name), model.n_layers, model.n_heads, where, f"model {model.name!r}")
    if fingerprint != model.fingerprint:
        raise WorkbenchError(
            f"{where}this circuit was computed on a different model (fingerprint "
            f"{fingerprint}), not on {model.name!r} (fingerprint {model.fingerprint})"
        )
