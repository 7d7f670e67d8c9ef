"""Circuit attribution on a ``TransformerBridge``: which heads and MLPs carry the forget facts.

Everything here runs through TransformerLens hooks on ``LoadedModel.bridge()``; the
model is only ever read (see *Never modifying the model* below).

Prompt pairs and baselines (:func:`make_prompt_pairs`, docs/SCIENCE.md §8.1)
    Each clean prompt (a fact) gets a baseline. ``paired`` (default): its corrupt twin
    (``corrupt_prompt``, same template, another subject) when it has the clean prompt's
    token length, else a *partner* (another fact of the set with a different answer and a
    prompt of the same token length), else the *mean* baseline. ``resample``: a randomly
    drawn partner, else the mean. ``mean``: every component's dataset-mean activation
    (:class:`ActivationMeans`). No fact is dropped; :class:`Pairing` counts who got what.
    Pairs of equal length and baseline kind form a :class:`PairGroup`, so every forward
    runs unpadded on a ``[n, seq]`` batch. A prompt baseline is *denoised* (gradients on
    the corrupt run); the mean baseline is *noised* (gradients on the clean run, deltas
    ``a_clean - a_mean``); both give "the clean value, against the baseline, raises the
    metric by this much".

Metric (per pair)
    The sequence is the prompt plus the answer's tokens but the last (teacher forcing);
    the answer's ``span`` tokens are read at positions ``seq - span .. seq - 1``.
    ``logit_diff``: ``logit[answer] - logit[corrupt_answer]`` at the first answer position,
    where ``corrupt_answer`` is the first token of ``" " + answer`` of the corrupt prompt's
    fact (default); ``logprob``: the answer's log-probability summed over the span. For
    single-token answers both read the last position, as before.

Nodes (writers into the residual stream, :mod:`workbench.nodes`)
    ``embed`` at ``hook_embed`` (+ ``hook_pos_embed`` on models with learned positions;
    its clean-corrupt difference is zero for a prompt pair of equal length, not against
    the mean), each head ``L.H`` at ``blocks.L.attn.hook_z[:, :, H]``
    (``[batch, seq, n_heads, d_head]``, per *query* head also under GQA), each MLP at
    ``blocks.L.hook_mlp_out``.

Scores (denoising convention, as TransformerLens' ``attribution_patching``)
    ``atp``: ``score(c) = mean_pairs sum_{pos, dim} (a_clean - a_corrupt) * dm/da``, the
    gradient taken on the corrupt run; positive = moving ``c`` toward its clean value
    restores the clean behaviour. One forward on the clean batch (no grad) and one
    forward/backward on the corrupt batch per pass of pairs (sized to memory, or ``batch_size``) — never a
    loop over examples. The pairs of a batch are independent, so the gradient of the
    *summed* metric gives every pair its own gradient.

    ``ig`` (EAP-IG, *input-embedding path*): the token embedding is interpolated,
    ``e(alpha) = e_corrupt + alpha (e_clean - e_corrupt)`` at ``hook_embed``, for
    ``alpha_k = k / N, k = 0..N-1`` (left Riemann sum, so ``N = 1`` *is* ``atp``); the
    gradients at every node are averaged over the ``N`` runs and dotted with the
    endpoint difference ``a_clean - a_corrupt``. For the embed node this is ordinary
    integrated gradients, so its score tends to the exact effect ``m_clean - m_corrupt``
    as ``N`` grows (completeness).

    ``exact``: activation patching — one forward per node (batched over pairs): the
    corrupt run with that node's clean activation patched in; ``score = m_patched -
    m_corrupt``. The reference the estimates are checked against.

Edges (EAP, ``AttributionConfig(edges=True)``)
    Writer -> reader, reader = a head's ``q``/``k``/``v`` input, an MLP's input or the
    logits; ``score = mean_pairs sum_pos (w_clean - w_corrupt) . dm/d(reader input)``,
    the writer's residual write measured in ``d_model`` (a head's write is
    ``z_h @ W_O[h]``), the gradient read at the bridge's split-input hooks
    (``blocks.L.attn.hook_{q,k,v}_input``, ``blocks.L.hook_mlp_in``) and at the final
    ``hook_resid_post`` for the logits. Readers see only writers upstream of them (on
    parallel-attention models such as GPT-NeoX an MLP does not read its own layer's
    heads). Because the residual is a sum, a writer's outgoing edges (logits included)
    add up to its node score.

    *Post-norm families* (Gemma 2/3, OLMo-2; ``model.adapter`` names the norm): the
    attention output is normalised before it joins the residual, so a head's write is
    the norm's Jacobian at the pass's point (``blocks.L.ln1_post.hook_in``) applied to
    ``z_h @ W_O[h]`` (a ``jvp`` on the pristine HF norm); the sum identity then holds
    exactly as before. MLP writes are read after their post-norm (``hook_mlp_out``).

    *Grouped-query attention.* The bridge forks one K and one V input per *kv* head
    (``[batch, seq, n_kv_heads, d_model]``), read by the ``n_heads / n_kv_heads`` query
    heads of its group. The edge into query head ``h``'s ``k`` (``v``) input is scored
    with the part of the kv head's input gradient that flows through query head ``h``
    (an exact split, computed by a vector-Jacobian product from ``dm/d(attn_scores)``
    for K and ``dm/d(z)`` for V restricted to head ``h``); the split parts of a group add
    up to the kv head's input gradient, so the sum identity above holds under GQA too.
    (TransformerLens' own edge attribution refuses GQA.)

Never modifying the model
    Parameters keep ``requires_grad=False``: gradients are taken with
    ``torch.autograd.grad`` with respect to activations only (the embedding output is
    made a leaf that requires grad), never touching any ``.grad``. Edge sweeps turn the
    bridge's ``use_split_qkv_input`` / ``use_hook_mlp_in`` flags on and restore them in a
    ``finally``; all hooks live in ``bridge.hooks(...)`` contexts. Hooked runs on one
    bridge are serialised by a lock, because hooks are module-global and the bridge is
    shared between app sessions.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import random
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from workbench.core.components import EMBED, LOGITS, Component, ComponentKind, EdgeInput, all_components, head, mlp
from workbench.core.device import module_device
from workbench.core.errors import WorkbenchError
from workbench.core.memo import base_memo
from workbench.core.progress import Progress, Steps
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import last_token_logits

AttributionMethod = Literal["atp", "ig", "exact"]
"""``atp``: attribution patching (gradient x activation difference, one batched forward/backward);
``ig``: integrated gradients along the corrupt->clean path (EAP-IG style, ``ig_steps`` points);
``exact``: activation patching, one forward per component (the reference)."""

MetricName = Literal["logit_diff", "logprob"]
"""``logit_diff``: logit of the true answer minus logit of the corrupt prompt's answer (default);
``logprob``: log-probability of the true answer."""

AblationName = Literal["corrupt", "mean"]
"""``corrupt``: each pair's own baseline (its corrupt run, or the dataset mean for a pair on
the mean baseline); ``mean``: the dataset-mean activations for every pair (:func:`dataset_means`)."""

AblationMetric = Literal["logit_diff", "logprob", "kl"]
"""Metrics of an ablated run: the two attribution metrics, or ``kl`` = minus the KL
divergence ``KL(p_clean || p_ablated)`` of the next-token distributions, summed over the
answer positions (0 for the clean run; higher = closer to the clean model)."""

BaselineName = Literal["paired", "mean", "resample"]
"""What a clean prompt is compared with (see :func:`make_prompt_pairs`): ``paired`` its
counterfactual twin (default; facts without a usable twin get another fact of equal length,
else the mean); ``mean`` the dataset-mean activation of every component; ``resample``
another prompt of the set with another answer."""

_BASELINES: tuple[str, ...] = get_args(BaselineName)

EdgeKey = tuple[Component, Component, EdgeInput]
"""(writer, reader, which input of the reader)."""

_METHODS: tuple[str, ...] = get_args(AttributionMethod)
_METRICS: tuple[str, ...] = get_args(MetricName)
_NO_TOKEN = -1
"""Corrupt-answer id meaning "none" (allowed only with the ``logprob`` metric)."""


# --- how facts got their baselines ---------------------------------------------------


@dataclass(frozen=True)
class Pairing:
    """How many facts got which baseline (see :data:`PairKind`); nothing is dropped silently.

    ``dropped`` counts pairs left out (always 0 from :func:`make_prompt_pairs`, which falls
    back to the mean baseline instead; kept for pairs built elsewhere)."""

    twin: int = 0
    partner: int = 0
    resample: int = 0
    mean: int = 0
    dropped: int = 0

    def describe(self) -> str:
        """One line for the app, the CLI and the widget, e.g. ``"62 facts: 45 with their
        corrupt twin, 17 with another fact of equal token length · 0 dropped"``."""
        parts = []
        for count, what in ((self.twin, "with their corrupt twin"),
                            (self.partner, "with another fact of equal token length (twin missing or of "
                                           "another length)"),
                            (self.resample, "with a resampled fact of equal token length"),
                            (self.mean, "against the dataset-mean baseline")):
            if count:
                parts.append(f"{count} {what}")
        total = self.twin + self.partner + self.resample + self.mean
        return f"{total} facts: {', '.join(parts) or 'none'} · {self.dropped} dropped"


# --- the result ------------------------------------------------------------------------


@dataclass
class Attribution:
    """Scores of one attribution sweep over a set of clean/corrupt prompt pairs.

    Attributes:
        scores: per writer component (embed, heads, MLPs), the mean over pairs of the
            estimated effect on the metric of patching it from corrupt to clean
            (denoising convention: positive = restores the clean behaviour).
        edge_scores: per edge, same convention; empty unless edges were requested.
        method, ig_steps, metric: how the scores were computed.
        n_pairs: number of clean/corrupt pairs averaged.
        prompts_hash: sha256 (16 hex) of the clean and corrupt prompts, in order.
        model_fingerprint: ``LoadedModel.fingerprint`` of the model attributed.
        clean_metric, corrupt_metric: mean metric of the clean and corrupt runs.
        n_layers, n_heads: the model's shape (so a circuit can be checked against a model).
        n_kv_heads: key/value heads per layer (``< n_heads`` under grouped-query attention).
        n_dropped: pairs left out (0 from :func:`make_prompt_pairs`; see :class:`Pairing`).
        baseline: the baseline asked for (``paired``, ``mean``, ``resample``).
        pairing: how many facts got which baseline.
        pair_scores: ``[n_pairs, n_writers]`` float64 per-pair scores (pairs in input order,
            writers in forward order; :meth:`for_fact`); ``None`` when loaded from a file.
        pair_prompts: the clean prompt of each pair (input order).
        pair_kinds: each pair's baseline (:data:`PairKind`).
    """

    scores: dict[Component, float]
    method: AttributionMethod
    metric: MetricName
    n_pairs: int
    prompts_hash: str
    model_fingerprint: str
    clean_metric: float
    corrupt_metric: float
    n_layers: int
    n_heads: int
    ig_steps: int = 1
    edge_scores: dict[EdgeKey, float] = field(default_factory=dict)
    n_kv_heads: int | None = None
    n_dropped: int = 0
    baseline: str = "paired"
    pairing: Pairing = field(default_factory=Pairing)
    pair_scores: torch.Tensor | None = field(default=None, repr=False)
    pair_prompts: tuple[str, ...] = ()
    pair_kinds: tuple[str, ...] = ()

    def for_fact(self, index: int) -> dict[Component, float]:
        """Scores of one fact alone (the ``index``-th pair, input order): which heads and MLPs
        carry this one fact. Same convention as :attr:`scores`, whose mean over facts it is."""
        if self.pair_scores is None:
            raise WorkbenchError("this attribution has no per-fact scores (loaded from a file?); attribute again")
        n = int(self.pair_scores.shape[0])
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
            raise WorkbenchError(f"fact index must be an integer in 0..{n - 1}, got {index!r}")
        writers = all_components(self.n_layers, self.n_heads)
        return {c: float(s) for c, s in zip(writers, self.pair_scores[index].tolist())}

    def top(self, k: int = 20) -> list[tuple[Component, float]]:
        """The ``k`` components with the largest ``|score|``, strongest first (ties: forward order)."""
        ranked = sorted(self.scores.items(), key=lambda item: (-abs(item[1]), _order(item[0])))
        return ranked[: max(0, int(k))]

    def top_edges(self, k: int = 20) -> list[tuple[EdgeKey, float]]:
        """The ``k`` edges with the largest ``|score|``, strongest first."""
        ranked = sorted(self.edge_scores.items(), key=lambda item: -abs(item[1]))
        return ranked[: max(0, int(k))]

    def head_matrix(self) -> list[list[float]]:
        """Head scores as ``[n_layers][n_heads]`` (``nan`` where a head has no score)."""
        return [
            [self.scores.get(head(layer, h), math.nan) for h in range(self.n_heads)]
            for layer in range(self.n_layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: components by name, edges as ``[writer, reader, input, score]``."""
        return {
            "version": 1,
            "method": self.method,
            "metric": self.metric,
            "ig_steps": self.ig_steps,
            "n_pairs": self.n_pairs,
            "n_dropped": self.n_dropped,
            "baseline": self.baseline,
            "pairing": dataclasses.asdict(self.pairing),
            "prompts_hash": self.prompts_hash,
            "model_fingerprint": self.model_fingerprint,
            "clean_metric": _json_float(self.clean_metric),
            "corrupt_metric": _json_float(self.corrupt_metric),
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "scores": {c.name: _json_float(s) for c, s in sorted(self.scores.items(), key=lambda i: _order(i[0]))},
            "edges": [[w.name, r.name, inp, _json_float(s)] for (w, r, inp), s in self.edge_scores.items()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Attribution:
        """Inverse of :meth:`to_dict`; raises ``WorkbenchError`` naming the bad field."""
        try:
            scores = {Component.parse(name): _from_json_float(v) for name, v in data["scores"].items()}
            edges: dict[EdgeKey, float] = {}
            for i, entry in enumerate(data.get("edges", [])):
                if len(entry) != 4 or entry[2] not in get_args(EdgeInput):
                    raise ValueError(f"edges[{i}] must be [writer, reader, q|k|v|mlp|logits, score], got {entry!r}")
                edges[(Component.parse(entry[0]), Component.parse(entry[1]), entry[2])] = _from_json_float(entry[3])
            method, metric = data["method"], data["metric"]
            if method not in _METHODS:
                raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
            if metric not in _METRICS:
                raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
            return cls(
                scores=scores,
                method=method,
                metric=metric,
                n_pairs=int(data["n_pairs"]),
                prompts_hash=str(data["prompts_hash"]),
                model_fingerprint=str(data["model_fingerprint"]),
                clean_metric=_from_json_float(data["clean_metric"]),
                corrupt_metric=_from_json_float(data["corrupt_metric"]),
                n_layers=int(data["n_layers"]),
                n_heads=int(data["n_heads"]),
                ig_steps=int(data.get("ig_steps", 1)),
                edge_scores=edges,
                n_kv_heads=None if data.get("n_kv_heads") is None else int(data["n_kv_heads"]),
                n_dropped=int(data.get("n_dropped", 0)),
                baseline=str(data.get("baseline", "paired")),
                pairing=Pairing(**{k: int(v) for k, v in data.get("pairing", {}).items()}),
            )
        except KeyError as exc:
            raise WorkbenchError(f"attribution data: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise WorkbenchError(f"attribution data: {exc}") from None


def _json_float(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def _from_json_float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _order(c: Component) -> tuple[int, int, int]:
    """Forward order: embed, then per layer its heads, then its MLP, then logits."""
    if c.kind is ComponentKind.EMBED:
        return (-1, 0, 0)
    if c.kind is ComponentKind.LOGITS:
        return (1 << 30, 0, 0)
    return (c.block, 0 if c.kind is ComponentKind.HEAD else 1, int(c.head or 0))


# --- prompt pairs ----------------------------------------------------------------------

PairKind = Literal["twin", "partner", "resample", "mean"]
"""How one fact got its baseline: ``twin`` its own corrupt prompt (same token length);
``partner`` another fact of the set (same token length, other answer) because its twin is
missing or of another length; ``resample`` a randomly drawn fact of the set (same token
length, other answer); ``mean`` the dataset-mean baseline (no such fact exists)."""

_KINDS: tuple[str, ...] = get_args(PairKind)


@dataclass(frozen=True, eq=False)
class PairGroup:
    """Clean/baseline pairs whose sequences all have the same token length ``seq``.

    A sequence is the prompt followed by all but the last answer token (teacher forcing),
    so the metric reads the answer's ``span`` tokens at positions ``seq - span .. seq - 1``.

    Attributes:
        clean: ``[n, seq]`` clean token ids (long).
        corrupt: ``[n, seq]`` corrupt token ids, row ``i`` paired with ``clean[i]``; for a
            ``mean`` group a copy of ``clean`` (the baseline is an activation, not a prompt).
        answers: ``[n]`` first token of ``" " + answer`` of each clean fact.
        corrupt_answers: ``[n]`` first token of the alternative answer, or ``-1``
            when unknown (allowed with the ``logprob`` metric only).
        index: ``[n]`` position of each pair in :attr:`PromptPairs.clean_prompts`.
        answer_ids: ``[n, span]`` all tokens of ``" " + answer`` (``None``: ``answers[:, None]``).
        baseline: ``pair`` (a corrupt prompt is run) or ``mean`` (dataset-mean activations).
    """

    clean: torch.Tensor
    corrupt: torch.Tensor
    answers: torch.Tensor
    corrupt_answers: torch.Tensor
    index: torch.Tensor
    answer_ids: torch.Tensor | None = None
    baseline: Literal["pair", "mean"] = "pair"

    def __post_init__(self) -> None:
        for name in ("clean", "corrupt", "answers", "corrupt_answers", "index"):
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor) or value.dtype != torch.long:
                raise WorkbenchError(f"PairGroup.{name} must be a long tensor")
        if self.clean.ndim != 2 or self.clean.shape[0] == 0 or self.clean.shape[1] == 0:
            raise WorkbenchError(f"PairGroup.clean must be a non-empty [n, seq] tensor, got {tuple(self.clean.shape)}")
        if self.corrupt.shape != self.clean.shape:
            raise WorkbenchError(
                f"clean {tuple(self.clean.shape)} and corrupt {tuple(self.corrupt.shape)} ids differ in shape: "
                "the prompts of a pair must have equal token length"
            )
        n = self.clean.shape[0]
        for name in ("answers", "corrupt_answers", "index"):
            if tuple(getattr(self, name).shape) != (n,):
                raise WorkbenchError(f"PairGroup.{name} must have shape [{n}], got {tuple(getattr(self, name).shape)}")
        if self.baseline not in ("pair", "mean"):
            raise WorkbenchError(f"PairGroup.baseline must be 'pair' or 'mean', got {self.baseline!r}")
        span = self.answer_ids
        if span is not None:
            if span.dtype != torch.long or span.ndim != 2 or span.shape[0] != n or not 1 <= span.shape[1] <= self.seq:
                raise WorkbenchError(f"PairGroup.answer_ids must be a long [{n}, span] tensor with 1 <= span <= seq")
            if not torch.equal(span[:, 0], self.answers):
                raise WorkbenchError("PairGroup.answer_ids[:, 0] must equal answers")

    @property
    def n(self) -> int:
        return int(self.clean.shape[0])

    @property
    def seq(self) -> int:
        return int(self.clean.shape[1])

    @property
    def span(self) -> int:
        """Answer tokens scored (1 for single-token answers)."""
        return 1 if self.answer_ids is None else int(self.answer_ids.shape[1])

    @property
    def targets(self) -> torch.Tensor:
        """``[n, span]`` answer tokens."""
        return self.answers[:, None] if self.answer_ids is None else self.answer_ids

    def n_chunks(self, batch_size: int) -> int:
        return (self.n + batch_size - 1) // batch_size

    def chunks(self, batch_size: int) -> Iterator[PairGroup]:
        """Consecutive sub-groups of at most ``batch_size`` pairs."""
        for start in range(0, self.n, batch_size):
            stop = start + batch_size
            yield PairGroup(
                self.clean[start:stop],
                self.corrupt[start:stop],
                self.answers[start:stop],
                self.corrupt_answers[start:stop],
                self.index[start:stop],
                None if self.answer_ids is None else self.answer_ids[start:stop],
                self.baseline,
            )


@dataclass(frozen=True, eq=False)
class PromptPairs:
    """The clean/baseline pairs an attribution averages over.

    Attributes:
        groups: the pairs, grouped by baseline kind and token length; within a group in input order.
        clean_prompts, corrupt_prompts: the kept pairs' texts, in input order (``""`` when
            built from raw ids; ``corrupt_prompts[i] == ""`` for a pair on the mean baseline).
        metric: the metric the pairs were built for; ``logit_diff`` needs every corrupt answer.
        n_dropped: pairs dropped (0 from :func:`make_prompt_pairs`; see :class:`Pairing`).
        dropped: the clean prompts of the dropped pairs.
        n_model_answers: alternative answers taken from the model's own prediction because
            the fact named none (see :func:`make_prompt_pairs`).
        baseline: the baseline asked for (``paired``, ``mean`` or ``resample``).
        kinds: per pair (input order), which baseline it got (:data:`PairKind`).
    """

    groups: tuple[PairGroup, ...]
    clean_prompts: tuple[str, ...]
    corrupt_prompts: tuple[str, ...]
    metric: MetricName = "logit_diff"
    n_dropped: int = 0
    dropped: tuple[str, ...] = ()
    n_model_answers: int = 0
    baseline: BaselineName = "paired"
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.metric not in _METRICS:
            raise WorkbenchError(f"metric must be one of {_METRICS}, got {self.metric!r}")
        if self.baseline not in _BASELINES:
            raise WorkbenchError(f"baseline must be one of {_BASELINES}, got {self.baseline!r}")
        if not self.groups:
            raise WorkbenchError("no prompt pairs")
        n = sum(g.n for g in self.groups)
        if len(self.clean_prompts) != n or len(self.corrupt_prompts) != n:
            raise WorkbenchError(f"{n} pairs but {len(self.clean_prompts)}/{len(self.corrupt_prompts)} prompt texts")
        if self.kinds and (len(self.kinds) != n or any(k not in _KINDS for k in self.kinds)):
            raise WorkbenchError(f"kinds must name one of {_KINDS} for each of the {n} pairs")
        if self.metric == "logit_diff":
            for g in self.groups:
                missing = (g.corrupt_answers < 0).nonzero().flatten().tolist()
                if missing:
                    raise WorkbenchError(
                        f"the logit_diff metric needs a corrupt answer for every pair; pair "
                        f"{int(g.index[missing[0]])} has none (use metric='logprob')"
                    )

    @property
    def n_pairs(self) -> int:
        return sum(g.n for g in self.groups)

    @property
    def pair_kinds(self) -> tuple[str, ...]:
        """Per pair, its :data:`PairKind` (``twin``/``mean`` by group when built from ids)."""
        if self.kinds:
            return self.kinds
        out = [""] * self.n_pairs
        for g in self.groups:
            for i in g.index.tolist():
                out[i] = "twin" if g.baseline == "pair" else "mean"
        return tuple(out)

    @property
    def pairing(self) -> Pairing:
        kinds = self.pair_kinds
        return Pairing(**{k: kinds.count(k) for k in _KINDS}, dropped=self.n_dropped)

    @property
    def has_mean(self) -> bool:
        return any(g.baseline == "mean" for g in self.groups)

    @property
    def prompts_hash(self) -> str:
        """sha256 (16 hex) of the clean and corrupt prompts (their ids when built from ids)."""
        h = hashlib.sha256()
        if any(self.clean_prompts):
            for c, k in zip(self.clean_prompts, self.corrupt_prompts):
                h.update(c.encode() + b"\x00" + k.encode() + b"\x01")
        else:
            for g in self.groups:
                h.update(g.clean.numpy().tobytes() + b"\x00" + g.corrupt.numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def ids_hash(self) -> str:
        """sha256 (16 hex) of every group's ids as grouped: prompts, baselines, answers, order."""
        h = hashlib.sha256()
        for g in self.groups:
            for t in (g.clean, g.corrupt, g.answers, g.corrupt_answers, g.index, g.targets):
                h.update(repr(tuple(t.shape)).encode() + t.cpu().numpy().tobytes())
            h.update(g.baseline.encode())
        return h.hexdigest()[:16]

    @property
    def clean_hash(self) -> str:
        """sha256 (16 hex) of the clean token ids as grouped: all that the dataset means read."""
        h = hashlib.sha256()
        for g in self.groups:
            h.update(repr(tuple(g.clean.shape)).encode() + g.clean.cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_ids(
        cls,
        clean: torch.Tensor,
        corrupt: torch.Tensor,
        answers: torch.Tensor,
        corrupt_answers: torch.Tensor | None = None,
        *,
        metric: MetricName = "logit_diff",
    ) -> PromptPairs:
        """One group of pairs from raw ``[n, seq]`` token ids (for tests and benchmarks)."""
        n = int(clean.shape[0]) if clean.ndim == 2 else 0
        if corrupt_answers is None:
            corrupt_answers = torch.full((n,), _NO_TOKEN, dtype=torch.long)
        group = PairGroup(
            clean.long(), corrupt.long(), answers.long(), corrupt_answers.long(), torch.arange(n, dtype=torch.long)
        )
        return cls((group,), ("",) * n, ("",) * n, metric=metric)

    def with_metric(self, metric: MetricName) -> PromptPairs:
        """The same pairs, checked for (and labelled with) another metric."""
        if metric == self.metric:
            return self
        return dataclasses.replace(self, metric=metric)


@dataclass
class _Plan:
    """One fact's baseline while pairs are being built."""

    kind: PairKind
    corrupt_ids: list[int] = field(default_factory=list)
    corrupt_prompt: str = ""
    corrupt_answer: int = _NO_TOKEN


def make_prompt_pairs(
    model: LoadedModel,
    facts: Sequence[Any],
    *,
    corrupt_prompts: Sequence[str] | None = None,
    metric: MetricName = "logit_diff",
    corrupt_answers: Sequence[str] | None = None,
    baseline: BaselineName = "paired",
    seed: int = 0,
) -> PromptPairs:
    """Give each fact's prompt (clean) a baseline; no fact is dropped.

    ``facts`` are :class:`workbench.facts.Fact` objects or anything with ``prompt`` and
    ``answer`` attributes (``corrupt_prompt``, ``corrupt_answer``, ``relation`` and
    ``template`` are read when present). Answers may span several tokens: the sequence is
    the prompt plus the answer's tokens but the last (teacher forcing).

    ``baseline="paired"`` (default): the corrupt prompt of fact ``i`` is
    ``corrupt_prompts[i]`` if given, else ``fact.corrupt_prompt`` — its *twin* — when it
    has the clean prompt's token length; otherwise (twin missing or of another length) a
    *partner*: another fact of the set whose first answer token differs and whose prompt
    has the same token length (same relation and template first, then the next in input
    order); if there is none, the fact falls back to the *mean* baseline (dataset-mean
    activations, see :func:`dataset_means`). ``"resample"``: every fact gets a partner
    drawn at random (``seed``) among the facts of equal token length and another answer,
    else the mean. ``"mean"``: every fact on the mean baseline. The counts are in
    :attr:`PromptPairs.pairing`.

    The alternative answer (for ``logit_diff``) is ``corrupt_answers[i]`` if given (a twin
    or a mean fallback), else the fact's ``corrupt_answer``, else the answer of the fact
    whose prompt is the corrupt prompt, else — counted in ``n_model_answers`` — the
    model's top prediction on the corrupt (mean baseline: the clean) prompt other than the
    true answer. A partner's answer is its own answer.
    """
    if metric not in _METRICS:
        raise WorkbenchError(f"unknown metric {metric!r}; use one of {', '.join(_METRICS)}")
    if baseline not in _BASELINES:
        raise WorkbenchError(f"unknown baseline {baseline!r}; use one of {', '.join(_BASELINES)}")
    facts = list(facts)
    if not facts:
        raise WorkbenchError("no facts to attribute: the fact list is empty")
    for name, given in (("corrupt_prompts", corrupt_prompts), ("corrupt_answers", corrupt_answers)):
        if given is not None and len(given) != len(facts):
            raise WorkbenchError(f"{len(facts)} facts but {len(given)} {name}")
    tok = model.tokenizer
    prompts: list[str] = []
    for i, fact in enumerate(facts):
        prompt, answer = getattr(fact, "prompt", None), getattr(fact, "answer", None)
        if not isinstance(prompt, str) or not prompt or not isinstance(answer, str) or not answer:
            raise WorkbenchError(f"fact {i}: needs a non-empty prompt and answer, got {fact!r}")
        prompts.append(prompt)
    clean_ids = [_encode(tok, p, f"fact {i} prompt") for i, p in enumerate(prompts)]
    spans = [_answer_ids(tok, f.answer, i) for i, f in enumerate(facts)]
    answers = [s[0] for s in spans]
    rng = random.Random(seed)
    plans: list[_Plan] = []
    for i, fact in enumerate(facts):
        plan = None
        if baseline == "paired":
            given = corrupt_prompts[i] if corrupt_prompts is not None else (getattr(fact, "corrupt_prompt", "") or "")
            plan = _twin(tok, i, given, clean_ids[i]) if given else None
        if plan is None and baseline != "mean":
            j = _partner(i, facts, clean_ids, answers, rng if baseline == "resample" else None)
            if j is not None:
                plan = _Plan("resample" if baseline == "resample" else "partner", clean_ids[j], prompts[j], answers[j])
        plans.append(plan or _Plan("mean"))
    need_model = _set_alternatives(tok, facts, plans, prompts, answers, corrupt_answers, metric)
    if need_model:
        _fill_model_answers(model, plans, need_model, clean_ids, answers)
    return _group(plans, prompts, clean_ids, spans, answers, metric, baseline, len(need_model))


def _twin(tok: Any, i: int, corrupt_prompt: str, clean: list[int]) -> _Plan | None:
    """The fact's own corrupt prompt, when it has the clean prompt's token length."""
    c_ids = _encode(tok, corrupt_prompt, f"fact {i} corrupt prompt")
    return _Plan("twin", c_ids, corrupt_prompt) if len(c_ids) == len(clean) else None


def _set_alternatives(tok: Any, facts: list[Any], plans: list[_Plan], prompts: list[str], answers: list[int],
                      corrupt_answers: Sequence[str] | None, metric: MetricName) -> list[int]:
    """Fill each twin's and mean fallback's alternative answer; return the facts that need
    the model's own prediction (see :func:`make_prompt_pairs`)."""
    first_with_prompt: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first_with_prompt.setdefault(p, i)
    need: list[int] = []
    for i, (fact, plan) in enumerate(zip(facts, plans)):
        if plan.kind in ("partner", "resample"):
            continue
        explicit = corrupt_answers[i] if corrupt_answers is not None else (getattr(fact, "corrupt_answer", "") or "")
        token = _answer_ids(tok, explicit, i)[0] if explicit else _NO_TOKEN
        if token == answers[i]:
            if plan.kind == "twin" and metric == "logit_diff":
                raise WorkbenchError(
                    f"fact {i} ({fact.prompt!r}): the corrupt answer {explicit!r} starts with the same token "
                    "as the answer, so the logit difference is identically 0"
                )
            token = _NO_TOKEN
        if token == _NO_TOKEN:
            source = plan.corrupt_prompt or getattr(fact, "corrupt_prompt", "") or ""
            j = first_with_prompt.get(source)
            if j is not None and answers[j] != answers[i]:
                token = answers[j]
        plan.corrupt_answer = token
        if token == _NO_TOKEN and metric == "logit_diff":
            need.append(i)
    return need


def _answer_ids(tok: Any, answer: str, i: int) -> list[int]:
    """All tokens of ``" " + answer`` (the answer as it follows a prompt)."""
    ids = list(tok(" " + answer, add_special_tokens=False)["input_ids"])
    if not ids:
        raise WorkbenchError(f"fact {i}: answer {answer!r} encodes to no tokens")
    return ids


def _encode(tok: Any, text: str, what: str) -> list[int]:
    ids = list(tok(text)["input_ids"])
    if not ids:
        raise WorkbenchError(f"{what} {text!r} encodes to no tokens")
    return ids


def _partner(i: int, facts: list[Any], clean_ids: list[list[int]], answers: list[int],
             rng: random.Random | None = None) -> int | None:
    """Another fact to corrupt fact ``i`` with: same token length, another first answer token;
    drawn with ``rng`` (resample), else by relation/template then input order."""
    n = len(facts)
    order = [(i + step) % n for step in range(1, n)]
    ok = [j for j in order if len(clean_ids[j]) == len(clean_ids[i]) and answers[j] != answers[i]]
    if not ok:
        return None
    if rng is not None:
        return rng.choice(ok)
    key = (getattr(facts[i], "relation", ""), getattr(facts[i], "template", 0))
    same = [j for j in ok if key[0] and (getattr(facts[j], "relation", ""), getattr(facts[j], "template", 0)) == key]
    return (same or ok)[0]


def _fill_model_answers(model: LoadedModel, plans: list[_Plan], need: list[int], clean_ids: list[list[int]],
                        answers: list[int]) -> None:
    """Alternative answer = the model's top prediction other than the answer, on the corrupt
    prompt (a twin) or the clean prompt (mean baseline)."""
    ids = [plans[i].corrupt_ids or clean_ids[i] for i in need]
    width = max(len(x) for x in ids)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    for r, x in enumerate(ids):
        batch[r, : len(x)] = torch.tensor(x)
    last = torch.tensor([len(x) - 1 for x in ids])
    logits = last_token_logits(model.hf, batch, last).float()
    for r, i in enumerate(need):
        logits[r, answers[i]] = -math.inf
        plans[i].corrupt_answer = int(logits[r].argmax())


def _group(plans: list[_Plan], prompts: list[str], clean_ids: list[list[int]], spans: list[list[int]],
           answers: list[int], metric: MetricName, baseline: BaselineName, n_model: int) -> PromptPairs:
    """Pairs grouped by (baseline kind, sequence length, answer span): every forward is unpadded."""
    by_key: dict[tuple[bool, int, int], list[int]] = {}
    for i, plan in enumerate(plans):
        by_key.setdefault((plan.kind == "mean", len(clean_ids[i]) + len(spans[i]) - 1, len(spans[i])), []).append(i)
    groups = []
    for key in sorted(by_key):
        rows = by_key[key]
        tails = [spans[i][:-1] for i in rows]
        clean = torch.tensor([clean_ids[i] + t for i, t in zip(rows, tails)], dtype=torch.long)
        corrupt = clean.clone() if key[0] else torch.tensor(
            [plans[i].corrupt_ids + t for i, t in zip(rows, tails)], dtype=torch.long)
        groups.append(PairGroup(
            clean=clean, corrupt=corrupt,
            answers=torch.tensor([answers[i] for i in rows], dtype=torch.long),
            corrupt_answers=torch.tensor([plans[i].corrupt_answer for i in rows], dtype=torch.long),
            index=torch.tensor(rows, dtype=torch.long),
            answer_ids=None if key[2] == 1 else torch.tensor([spans[i] for i in rows], dtype=torch.long),
            baseline="mean" if key[0] else "pair",
        ))
    return PromptPairs(
        groups=tuple(groups), clean_prompts=tuple(prompts), corrupt_prompts=tuple(p.corrupt_prompt for p in plans),
        metric=metric, n_model_answers=n_model, baseline=baseline, kinds=tuple(p.kind for p in plans),
    )


# --- configuration ---------------------------------------------------------------------


MAX_PAIRS_PER_PASS = 32
"""The most pairs one pass takes when its batch is sized to memory (every attribution's batch before
the sizing existed: models under :data:`~workbench.models.loaded.MIN_WORKING_BYTES` keep it)."""
MEANS_BATCH_SIZE = 32
"""Pairs per pass of the mean baseline when the sweep's passes are sized: the batch it always ran at,
so its memoised means keep their key and bits (it holds node activations only, without gradients)."""


@dataclass(frozen=True)
class AttributionConfig:
    """How to attribute.

    Attributes:
        method: ``atp`` (default), ``ig`` or ``exact`` (see :data:`AttributionMethod`).
        ig_steps: points on the integration path for ``ig`` (>= 1; ``ig_steps=1`` equals ``atp``).
        metric: ``logit_diff`` (default) or ``logprob``.
        edges: also score writer->reader edges (``atp``/``ig`` only). A pass then holds every
            head's own copy of the residual stream (its q/k/v inputs) and its gradient.
        batch_size: pairs per forward/backward; ``None`` (default): per length group, the most
            pairs (at most :data:`MAX_PAIRS_PER_PASS`) whose pass is estimated to fit in
            ``pass_bytes`` (see :meth:`_Layout.pass_bytes_per_token`). The scores do not depend
            on it beyond float rounding (tested to 1e-5).
        pass_bytes: the working memory one pass may take when ``batch_size`` is ``None``;
            ``None``: :meth:`LoadedModel.working_budget_bytes` (a quarter of the model's own
            bytes, at least 128 MiB, less on a GPU the model nearly fills). So the attribution of a
            big model, or with edges, takes memory in proportion to the model, not to 32 pairs.
        baseline: ``paired`` (default), ``mean`` or ``resample`` (see :data:`BaselineName`);
            used when facts are given (ready :class:`PromptPairs` carry their own).
        seed: the draw of ``resample`` partners.
    """

    method: AttributionMethod = "atp"
    ig_steps: int = 8
    metric: MetricName = "logit_diff"
    edges: bool = False
    batch_size: int | None = None
    baseline: BaselineName = "paired"
    seed: int = 0
    pass_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise WorkbenchError(f"unknown attribution method {self.method!r}; use one of {', '.join(_METHODS)}")
        if self.metric not in _METRICS:
            raise WorkbenchError(f"unknown metric {self.metric!r}; use one of {', '.join(_METRICS)}")
        if isinstance(self.ig_steps, bool) or not isinstance(self.ig_steps, int) or self.ig_steps < 1:
            raise WorkbenchError(f"ig_steps must be an integer >= 1, got {self.ig_steps!r}")
        for name in ("batch_size", "pass_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise WorkbenchError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if not isinstance(self.edges, bool):
            raise WorkbenchError(f"edges must be True or False, got {self.edges!r}")
        if self.edges and self.method == "exact":
            raise WorkbenchError("edge scores need method 'atp' or 'ig' (exact patching scores nodes only)")
        if self.baseline not in _BASELINES:
            raise WorkbenchError(f"unknown baseline {self.baseline!r}; use one of {', '.join(_BASELINES)}")

    @property
    def steps(self) -> int:
        """Forward/backward runs per chunk on the corrupt side."""
        return self.ig_steps if self.method == "ig" else 1

    @property
    def means_batch(self) -> int:
        """Pairs per pass of the mean baseline's no-grad pass."""
        return self.batch_size or MEANS_BATCH_SIZE


# --- the model's graph on the bridge ---------------------------------------------------

EMBED_HOOK = "hook_embed"
POS_EMBED_HOOK = "hook_pos_embed"


@dataclass(frozen=True)
class _Layout:
    """Hook names and shapes of one bridge (see the module docstring)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    parallel: bool
    pos_embed: bool
    d_head: int = 0  # 0: d_model // n_heads
    d_mlp: int = 0  # 0: 4 * d_model
    d_vocab: int = 0
    soft_cap: bool = False  # the logits soft-capped (Gemma-2): two more vocabulary-sized values per token

    @classmethod
    def of(cls, bridge: Any) -> _Layout:
        cfg = bridge.cfg
        n_heads = int(cfg.n_heads)
        return cls(
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            n_kv_heads=int(getattr(cfg, "n_key_value_heads", None) or n_heads),
            d_model=int(cfg.d_model),
            parallel=bool(getattr(cfg, "parallel_attn_mlp", False)),
            pos_embed=getattr(cfg, "positional_embedding_type", "standard") == "standard"
            and POS_EMBED_HOOK in bridge.hook_dict,
            d_head=int(getattr(cfg, "d_head", None) or 0),
            d_mlp=int(getattr(cfg, "d_mlp", None) or 0),
            d_vocab=int(getattr(cfg, "d_vocab", None) or 0),
            soft_cap=float(getattr(cfg, "output_logits_soft_cap", -1.0) or -1.0) > 0,
        )

    def pass_bytes_per_token(self, seq: int, edges: bool, post_norms: bool = False, gradients: bool = True) -> int:
        """What one token of a differentiated pass holds at its peak, estimated from above, in bytes.

        Every value counted in float32 (a 16-bit model's activations take less): the node hooks'
        activations, their gradients, and the three node-sized copies a chunk keeps (the clean
        and baseline activations and their difference); an allowance for what autograd saves per
        layer (norm inputs, q/k/v before and after rotation, the attention pattern and its
        softmax, the MLP's hidden values); the logits (and a soft cap's two intermediates), their
        log-softmax and its gradient. With edges, the reader hooks (each head's own q/k/v input,
        each MLP's input, the attention scores under GQA) and their gradients, the chunk's
        residual writes (three copies at the stacking), under GQA the K/V gradients split per
        query head, and with ``post_norms`` (a norm on the attention output, OLMo-2 and Gemma-2)
        each head's write taken through it. Without ``gradients`` (exact patching's no-grad
        passes) no gradients, and only one layer's intermediate values at a time. Checked against
        what a pass really allocates for several families, shapes and methods
        (tests/test_attribution_memory.py).
        """
        d, heads, layers = self.d_model, self.n_heads, self.n_layers
        d_head = self.d_head or d // heads
        qkv = (heads + 2 * self.n_kv_heads) * d_head
        nodes = d * len(self.embed_hooks) + layers * (heads * d_head + d)  # hook_z, hook_mlp_out
        saved = (layers if gradients else 1) * (6 * d + 3 * qkv + 3 * (self.d_mlp or 4 * d) + 4 * heads * seq)
        readers = extra = 0
        if edges:
            readers = layers * (d * (heads + 2 * self.n_kv_heads + 2) + heads * seq) + d
            extra = 3 * len(self.writers()) * d  # the writes per layer, their stack and its permuted copy
            if self.group > 1:
                extra += 2 * layers * heads * d
            if post_norms:
                extra += 2 * layers * (heads + 1) * d
        logits = (5 if self.soft_cap else 3) * self.d_vocab
        return 4 * ((2 if gradients else 1) * (nodes + readers) + 3 * nodes + saved + extra + logits)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def embed_hooks(self) -> list[str]:
        return [EMBED_HOOK] + ([POS_EMBED_HOOK] if self.pos_embed else [])

    def z(self, layer: int) -> str:
        return f"blocks.{layer}.attn.hook_z"

    def mlp_out(self, layer: int) -> str:
        return f"blocks.{layer}.hook_mlp_out"

    @property
    def node_hooks(self) -> list[str]:
        names = list(self.embed_hooks)
        for layer in range(self.n_layers):
            names += [self.z(layer), self.mlp_out(layer)]
        return names

    def reader_hooks(self) -> list[str]:
        names = []
        for layer in range(self.n_layers):
            names += [f"blocks.{layer}.attn.hook_{x}_input" for x in "qkv"]
            names.append(f"blocks.{layer}.hook_mlp_in")
            if self.group > 1:
                names.append(f"blocks.{layer}.attn.hook_attn_scores")
        names.append(f"blocks.{self.n_layers - 1}.hook_resid_post")
        return names

    def writers(self) -> list[Component]:
        return all_components(self.n_layers, self.n_heads)

    def hook_of(self, c: Component) -> str:
        if c.kind is ComponentKind.HEAD:
            return self.z(c.block)
        if c.kind is ComponentKind.MLP:
            return self.mlp_out(c.block)
        return EMBED_HOOK


_BRIDGE_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _bridge_lock(bridge: Any) -> threading.RLock:
    """One lock per bridge: hooked runs must not interleave (hooks are module-global)."""
    with _LOCKS_LOCK:
        lock = _BRIDGE_LOCKS.get(bridge)
        if lock is None:
            lock = _BRIDGE_LOCKS[bridge] = threading.RLock()
        return lock


def _check_model(model: Any) -> Any:
    """The model's bridge, after refusing a model in training mode."""
    hf = getattr(model, "hf", None)
    if hf is None or not hasattr(model, "bridge"):
        raise WorkbenchError(f"expected a workbench LoadedModel, got {type(model).__name__}")
    training = [name or "<root>" for name, m in hf.named_modules() if m.training]
    if training:
        raise WorkbenchError(
            f"model {model.name!r} is in training mode ({', '.join(training[:3])}"
            f"{' …' if len(training) > 3 else ''}); call model.hf.eval() first — attribution needs "
            "deterministic forwards (no dropout)"
        )
    bridge = model.bridge()
    from transformer_lens.tools.analysis._model_state import require_eval_mode

    try:
        require_eval_mode(bridge, operation="attribution")
    except ValueError as exc:
        raise WorkbenchError(f"model {model.name!r}: {exc}") from None
    return bridge


@contextmanager
def _edge_flags(bridge: Any) -> Iterator[None]:
    """Turn on the split q/k/v input and ``hook_mlp_in`` hooks; restore the caller's flags.

    Mirrors TransformerLens' ``attribution_patching._edge_hook_flags`` (``use_attn_in`` is
    exclusive with ``use_split_qkv_input`` and is switched off meanwhile).
    """
    cfg = bridge.cfg
    saved = (bool(cfg.use_split_qkv_input), bool(cfg.use_hook_mlp_in), bool(getattr(cfg, "use_attn_in", False)))
    try:
        if saved[2]:
            bridge.set_use_attn_in(False)
        if not saved[0]:
            bridge.set_use_split_qkv_input(True)
        if not saved[1]:
            bridge.set_use_hook_mlp_in(True)
        yield
    finally:
        bridge.set_use_split_qkv_input(saved[0])
        bridge.set_use_hook_mlp_in(saved[1])
        if saved[2]:
            bridge.set_use_attn_in(True)


PatchFn = Callable[[str, torch.Tensor], "torch.Tensor | None"]


def _forward(
    bridge: Any,
    tokens: torch.Tensor,
    names: Sequence[str],
    *,
    patch: PatchFn | None = None,
    leaf_embed: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One hooked forward; returns the logits and the live activation at each hook in ``names``.

    Each hook returns a fresh view of its activation (or ``patch``'s replacement), which
    puts that canonical-shape tensor on the forward path: ``torch.autograd.grad`` with
    respect to it gives the metric's gradient at the hook, counting only the consumers of
    the hook point (e.g. at ``hook_mlp_in`` the MLP branch alone, not the skip connection).
    With ``leaf_embed`` the embedding outputs become leaves requiring grad, so gradients
    exist although no parameter requires grad.
    """
    live: dict[str, torch.Tensor] = {}
    embeds = (EMBED_HOOK, POS_EMBED_HOOK)

    def make(name: str) -> Callable[..., torch.Tensor]:
        def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
            del hook
            out = patch(name, tensor) if patch is not None else None
            out = tensor.view_as(tensor) if out is None else out
            if leaf_embed and name in embeds and not out.requires_grad:
                out = out.detach().requires_grad_(True)
            live[name] = out
            return out

        return hook

    with bridge.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        # where the model is; no key/value cache (transformers fills one by default, none reads it)
        logits = bridge(tokens.to(module_device(bridge)), use_cache=False)
    return logits, live


class _AllHooksFired(Exception):
    """Raised by :func:`_activations` once its last hook has fired: the rest of the forward
    (the final norm and the unembedding, ~20% of a SmolLM2 forward) is not needed."""


def _activations(bridge: Any, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The activations at ``names`` of a forward stopped as soon as each has fired (no logits).

    The values are those of the whole forward: everything up to the last hook is computed as
    there, and nothing after it is."""
    live: dict[str, torch.Tensor] = {}
    wanted = set(names)

    def make(name: str) -> Callable[..., torch.Tensor]:
        def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
            del hook
            live[name] = tensor
            if wanted.issubset(live):
                raise _AllHooksFired
            return tensor

        return hook

    with bridge.hooks(fwd_hooks=[(n, make(n)) for n in names]), suppress(_AllHooksFired):
        bridge(tokens.to(module_device(bridge)), use_cache=False)
    missing = wanted - set(live)
    if missing:
        raise WorkbenchError(f"internal: hooks {sorted(missing)} did not fire in this bridge's forward")
    return live


def _metric_values(logits: torch.Tensor, group: PairGroup, metric: MetricName) -> torch.Tensor:
    """``[n]`` metric per pair (see the module docstring): ``logit_diff`` at the first answer
    position, ``logprob`` summed over the answer span (teacher forced)."""
    first = logits.shape[1] - group.span
    if metric == "logit_diff":
        at = logits[:, first, :].float()
        rows = torch.arange(at.shape[0])
        return at[rows, group.answers] - at[rows, group.corrupt_answers]
    logp = torch.log_softmax(logits[:, first:, :].float(), dim=-1)
    return logp.gather(-1, group.targets.unsqueeze(-1)).squeeze(-1).sum(1)


def _kl_values(logits: torch.Tensor, clean_logits: torch.Tensor, group: PairGroup) -> torch.Tensor:
    """``[n]`` minus ``KL(p_clean || p)`` summed over the answer positions."""
    first = logits.shape[1] - group.span
    p = torch.log_softmax(clean_logits[:, first:, :].float(), dim=-1)
    q = torch.log_softmax(logits[:, first:, :].float(), dim=-1)
    return -(p.exp() * (p - q)).sum(dim=(1, 2))


def passes(model: LoadedModel, pairs: PromptPairs, config: AttributionConfig = AttributionConfig()) -> list[int]:
    """The pairs of each pass :func:`attribute` runs on ``pairs`` with ``config``, in order."""
    bridge = _check_model(model)
    sizes = _PassSizes.of(model, _Layout.of(bridge), config)
    return [chunk.n for group in pairs.with_metric(config.metric).groups for chunk in sizes.chunks(group)]


def _n_chunks(pairs: PromptPairs, batch_size: int) -> int:
    return sum(group.n_chunks(batch_size) for group in pairs.groups)


@dataclass(frozen=True)
class _PassSizes:
    """Pairs per pass of a sweep, per length group: ``fixed``, or the most that fit ``budget`` bytes
    by :meth:`_Layout.pass_bytes_per_token` (at least one, at most :data:`MAX_PAIRS_PER_PASS`)."""

    lay: _Layout
    fixed: int | None
    budget: int
    edges: bool
    gradients: bool
    post_norms: bool

    @classmethod
    def of(cls, model: LoadedModel, lay: _Layout, config: AttributionConfig) -> _PassSizes:
        return cls(lay, config.batch_size, config.pass_bytes or model.working_budget_bytes(),
                   config.edges, config.method != "exact", any(n is not None for n in _post_norms(model)))

    def bytes_per_token(self, seq: int) -> int:
        return self.lay.pass_bytes_per_token(seq, self.edges, self.post_norms, gradients=self.gradients)

    def size(self, group: PairGroup) -> int:
        if self.fixed is not None:
            return self.fixed
        return max(1, min(MAX_PAIRS_PER_PASS, self.budget // (group.seq * self.bytes_per_token(group.seq))))

    def chunks(self, group: PairGroup) -> Iterator[PairGroup]:
        return group.chunks(self.size(group))

    def count(self, pairs: PromptPairs) -> int:
        return sum(group.n_chunks(self.size(group)) for group in pairs.groups)


# --- the mean baseline -----------------------------------------------------------------

ABLATION_BATCH_SIZE = 64
"""Pairs per forward of the no-grad passes (dataset means, baselines, ablated runs): the batch
the faithfulness readout measures at, so means taken ahead for it must be taken at this size."""



@dataclass(frozen=True, eq=False)
class ActivationMeans:
    """The dataset-mean activation at every writer hook, over the clean sequences of a set.

    Position 0 has its own mean (over the set's first tokens); every later position shares
    one mean over all positions >= 1 of all sequences. Why: prompts differ in length, so a
    per-position mean would average unrelated tokens (a subject's third token with a
    template word) and leave long prompts' tail positions with few samples; the first
    position, in contrast, is the same kind of token in every prompt (it attends only to
    itself and carries the outsized "attention sink" activations of many models), so mixing
    it into the shared mean would distort both.

    Attributes:
        first: hook name -> mean at position 0 (the activation's shape without batch and position).
        rest: hook name -> mean over positions >= 1 (``first`` when every sequence has length 1).
        n_sequences: sequences averaged.
    """

    first: dict[str, torch.Tensor]
    rest: dict[str, torch.Tensor]
    n_sequences: int

    def expand(self, name: str, n: int, seq: int) -> torch.Tensor:
        """``[n, seq, ...]`` baseline activation of hook ``name``."""
        out = self.rest[name].expand(n, seq, *self.rest[name].shape).clone()
        out[:, 0] = self.first[name]
        return out

    def for_chunk(self, names: Iterable[str], chunk: PairGroup) -> dict[str, torch.Tensor]:
        return {name: self.expand(name, chunk.n, chunk.seq) for name in names if name in self.rest}


def _means(bridge: Any, lay: _Layout, pairs: PromptPairs, batch_size: int) -> ActivationMeans:
    """One no-grad pass over the clean sequences (batched per length group)."""
    first: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    n_rest = 0
    with torch.no_grad():
        for group in pairs.groups:
            for chunk in group.chunks(batch_size):
                live = _activations(bridge, chunk.clean, lay.node_hooks)
                for name, act in live.items():
                    dtypes[name] = act.dtype  # the means are stored in the activations' own dtype
                    act = act.float().expand(chunk.n, *act.shape[1:])
                    first[name] = first.get(name, 0) + act[:, 0].sum(0)
                    if chunk.seq > 1:
                        rest[name] = rest.get(name, 0) + act[:, 1:].sum((0, 1))
                n_rest += chunk.n * (chunk.seq - 1)
    n = pairs.n_pairs
    means_first = {k: (v / n).to(dtypes[k]) for k, v in first.items()}
    means_rest = {k: (rest[k] / n_rest).to(dtypes[k]) if n_rest else means_first[k] for k in first}
    return ActivationMeans(means_first, means_rest, n)


def dataset_means(model: LoadedModel, pairs: PromptPairs, *, batch_size: int = ABLATION_BATCH_SIZE) -> ActivationMeans:
    """The mean baseline of ``pairs`` (see :class:`ActivationMeans`), taken in chunks of ``batch_size``.

    Memoised per weights, clean ids and batch size (:func:`~workbench.core.memo.base_memo`): an
    app session attributes its forget set and measures faithfulness on it again and again, and
    the means (a pass over every pair) are the same each time. Shared: read, never written."""
    bridge = _check_model(model)
    key = ("dataset-means", model.fingerprint, pairs.clean_hash, batch_size)

    def compute() -> ActivationMeans:
        with _bridge_lock(bridge):
            return _means(bridge, _Layout.of(bridge), pairs, batch_size)

    return base_memo(key, compute)


def _check_means(means: ActivationMeans, lay: _Layout, pairs: PromptPairs) -> None:
    if not isinstance(means, ActivationMeans):
        raise WorkbenchError(f"means must be ActivationMeans (dataset_means), got {type(means).__name__}")
    if means.n_sequences != pairs.n_pairs or set(means.rest) != set(lay.node_hooks):
        raise WorkbenchError(f"these means ({means.n_sequences} sequences, {len(means.rest)} hooks) are not the "
                             f"dataset means of these pairs on this model ({pairs.n_pairs} pairs, "
                             f"{len(lay.node_hooks)} hooks): take them with dataset_means(model, pairs)")


def _replace_all(base: dict[str, torch.Tensor]) -> PatchFn:
    """Every writer hook takes its baseline value: the run with all writers mean-ablated."""

    def patch(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        del tensor
        return base.get(name)

    return patch


# --- gradient sweeps (atp, ig, edges) --------------------------------------------------


@dataclass
class _Sums:
    """What a sweep adds up: per pair (input order) and writer (forward order) the score,
    the summed clean and baseline metrics, and the summed edge scores."""

    per_pair: torch.Tensor
    clean: float = 0.0
    corrupt: float = 0.0
    edges: dict[EdgeKey, float] = field(default_factory=dict)


def _gradient_sweep(
    bridge: Any, lay: _Layout, pairs: PromptPairs, config: AttributionConfig, sizes: _PassSizes, tracker: Steps,
    post_norms: Sequence[torch.nn.Module | None] = (), means: ActivationMeans | None = None,
    ahead: CleanRuns | None = None,
) -> _Sums:
    """Node (and edge) scores per pair, and the summed clean/baseline metrics.

    A pair group with a corrupt prompt is *denoised* (gradients on the corrupt run); a
    group on the mean baseline is *noised* (gradients on the clean run, deltas against the
    dataset mean): both estimate "the component's clean value, against its baseline,
    raises the metric by this much" (see docs/SCIENCE.md).
    """
    sums = _Sums(torch.zeros(pairs.n_pairs, len(lay.writers()), dtype=torch.float64))
    edges = _EdgeAccumulator(bridge, lay, post_norms) if config.edges else None
    names = lay.node_hooks + (lay.reader_hooks() + edges.post_norm_hooks() if edges is not None else [])
    for group in pairs.groups:
        for chunk in sizes.chunks(group):
            _sweep_chunk(bridge, lay, chunk, config, names, sums, edges, means, tracker, ahead)
            if edges is not None:
                edges.end_chunk()
    if edges is not None:
        sums.edges = edges.result()
    return sums


def _sweep_chunk(
    bridge: Any, lay: _Layout, chunk: PairGroup, config: AttributionConfig, names: list[str], sums: _Sums,
    edges: _EdgeAccumulator | None, means: ActivationMeans | None, tracker: Steps, ahead: CleanRuns | None = None,
) -> None:
    """One chunk's ``config.steps`` differentiated passes, added into ``sums`` (and ``edges``).

    1. The endpoint no pass runs (:func:`_unrun_endpoint`).
    2. Each pass ``k`` (:func:`_differentiated_pass`); ``k = 0`` is the plain run (so N = 1 is
       atp) and gives the other endpoint; IG then walks the token embedding from the corrupt run
       toward clean (denoising), or from clean toward the mean (noising).
    3. The pass's node contributions and edge products, weighted ``1 / steps``.
    """
    noising, steps = chunk.baseline == "mean", config.steps
    clean_acts, base_acts = _unrun_endpoint(bridge, lay, chunk, config.metric, sums, means, ahead)
    deltas: dict[str, torch.Tensor] = {}
    for k in range(steps):
        alpha = 1 - k / steps if noising else k / steps
        patch = None if k == 0 else _interpolate_embed(clean_acts, base_acts, alpha)
        values, live, grad = _differentiated_pass(bridge, lay, chunk.clean if noising else chunk.corrupt, chunk,
                                                  names, patch, config.metric, edges)
        if k == 0:
            run_acts = {n: live[n].clone() for n in lay.node_hooks if n in live}
            if noising:
                clean_acts = run_acts
                sums.clean += float(values.sum())
            else:
                base_acts = run_acts
                sums.corrupt += float(values.sum())
            deltas = {n: clean_acts[n] - base_acts[n] for n in base_acts}
            if edges is not None:
                edges.set_deltas(deltas)
        sums.per_pair[chunk.index] += _node_contributions(lay, deltas, grad, chunk.n) / steps
        if edges is not None:
            edges.add(grad, 1.0 / steps, live)
        del live, grad  # not alive through the next pass's forward
        tracker.step(f"{config.method}: {tracker.done + 1}/{tracker.total} passes")


def _unrun_endpoint(
    bridge: Any, lay: _Layout, chunk: PairGroup, metric: MetricName, sums: _Sums, means: ActivationMeans | None,
    ahead: CleanRuns | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(clean, baseline)`` activations, the one the chunk's passes do not run filled in.

    Noising: the baseline is the dataset mean (its metric: the clean run with every writer at
    its mean). Denoising: the clean run, without gradients (``ahead``'s when taken ahead). The
    summed metric goes to ``sums``.
    """
    if chunk.baseline == "mean":
        assert means is not None
        base = means.for_chunk(lay.node_hooks, chunk)
        sums.corrupt += _ablated_all(bridge, lay, chunk, base, metric)
        return {}, base
    run = ahead.take(chunk) if ahead is not None else None
    if run is None:
        run = _clean_run(bridge, lay, chunk, metric)
    sums.clean += run.metric_sum
    return run.activations, {}


@dataclass(frozen=True)
class _CleanRun:
    """One chunk's clean run: its summed metric and its node activations (detached)."""

    metric_sum: float
    activations: dict[str, torch.Tensor]


def _clean_run(bridge: Any, lay: _Layout, chunk: PairGroup, metric: MetricName) -> _CleanRun:
    with torch.no_grad():
        logits, live = _forward(bridge, chunk.clean, lay.node_hooks)
        return _CleanRun(float(_metric_values(logits, chunk, metric).sum()),
                         {n: t.detach().clone() for n, t in live.items()})


@dataclass
class CleanRuns:
    """The clean runs of a gradient sweep's denoising chunks, taken ahead (:func:`clean_runs`).

    They depend only on the weights, the pairs (ids and answers), the batch sizing, the edge hooks
    and the metric (:meth:`key_of`), so the app takes them in the background before the first
    "Run attribution" (~2.5 s of that click on SmolLM2). A sweep takes each chunk's run once
    (:meth:`take`), letting it go.
    """

    key: tuple[object, ...]
    runs: dict[int, _CleanRun]  # first pair index of the chunk -> its run

    @staticmethod
    def key_of(model: LoadedModel, pairs: PromptPairs, config: AttributionConfig) -> tuple[object, ...]:
        return (model.fingerprint, pairs.ids_hash, config.batch_size, config.pass_bytes, config.edges, config.metric)

    def take(self, chunk: PairGroup) -> _CleanRun | None:
        return self.runs.pop(int(chunk.index[0]), None)


def clean_runs(model: LoadedModel, pairs: PromptPairs, config: AttributionConfig = AttributionConfig()) -> CleanRuns:
    """The no-grad clean runs a gradient sweep of ``pairs`` with ``config`` starts each denoising
    chunk with, made as the sweep makes them (the same chunks, hooks and edge flags: the same
    bits), for :func:`attribute`'s ``taken_ahead``."""
    bridge = _check_model(model)
    pairs = pairs.with_metric(config.metric)
    lay = _Layout.of(bridge)
    _check_tokens(lay, pairs, bridge)
    sizes = _PassSizes.of(model, lay, config)
    runs: dict[int, _CleanRun] = {}
    # under the sweep's edge flags: with them each head reads its q/k/v input from its own copy
    # of the residual stream, other matmul shapes whose last bits may differ on a real model
    with _bridge_lock(bridge), (_edge_flags(bridge) if config.edges else nullcontext()):
        for group in pairs.groups:
            if group.baseline == "mean":
                continue
            for chunk in sizes.chunks(group):
                runs[int(chunk.index[0])] = _clean_run(bridge, lay, chunk, config.metric)
    return CleanRuns(CleanRuns.key_of(model, pairs, config), runs)


def _differentiated_pass(
    bridge: Any, lay: _Layout, tokens: torch.Tensor, chunk: PairGroup, names: list[str], patch: PatchFn | None,
    metric: MetricName, edges: _EdgeAccumulator | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One forward of ``tokens`` and the gradient of the chunk's summed metric at every hook in ``names``.

    Returns the per-pair metric, the hooks' activations and their gradients, all detached. The
    pass's autograd graph is kept only for the GQA split of K/V gradients (done here), and goes
    when this returns: before the chunk's write differences and edge products take their memory.
    """
    split = edges is not None and lay.group > 1
    with torch.enable_grad():
        logits, live = _forward(bridge, tokens, names, patch=patch, leaf_embed=True)
        values = _metric_values(logits, chunk, metric)
        present = [n for n in names if n in live]
        grads = torch.autograd.grad(values.sum(), [live[n] for n in present], allow_unused=True, retain_graph=split)
        grad = {n: (torch.zeros_like(live[n]) if g is None else g) for n, g in zip(present, grads)}
        if split:
            assert edges is not None
            edges.split_kv(live, grad)
    return values.detach(), {n: t.detach() for n, t in live.items()}, grad


def _ablated_all(bridge: Any, lay: _Layout, chunk: PairGroup, base: dict[str, torch.Tensor],
                 metric: MetricName) -> float:
    """Summed metric of the clean run with every writer at its mean (the mean baseline's
    "corrupt" metric)."""
    with torch.no_grad():
        logits, _ = _forward(bridge, chunk.clean, [n for n in lay.node_hooks if n in base], patch=_replace_all(base))
        return float(_metric_values(logits, chunk, metric).sum())


def _interpolate_embed(clean: dict[str, torch.Tensor], corrupt: dict[str, torch.Tensor], alpha: float) -> PatchFn:
    """IG path: the token embedding moves from its corrupt toward its clean value."""

    def patch(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        if name != EMBED_HOOK:
            return None
        return corrupt[name] + alpha * (clean[name] - corrupt[name])

    return patch


def _node_contributions(lay: _Layout, deltas: dict[str, torch.Tensor], grad: dict[str, torch.Tensor],
                        n: int) -> torch.Tensor:
    """``[n, n_writers]``: per pair and writer (forward order), ``sum_{pos, dim} delta * grad`` (float64)."""

    def per_pair(x: torch.Tensor) -> torch.Tensor:
        return x.expand(n, *x.shape[1:]).reshape(n, -1).sum(1, keepdim=True).double().cpu()

    cols = [sum((per_pair(deltas[h] * grad[h]) for h in lay.embed_hooks if h in deltas and h in grad),
                torch.zeros(n, 1, dtype=torch.float64))]
    for layer in range(lay.n_layers):
        z = lay.z(layer)
        cols.append((deltas[z] * grad[z]).sum(dim=(1, 3)).double().cpu())
        m = lay.mlp_out(layer)
        cols.append(per_pair(deltas[m] * grad[m]))
    return torch.cat(cols, dim=1)


class _EdgeAccumulator:
    """Edge scores of one sweep (see *Edges* in the module docstring).

    Writers are rows in forward order (embed, then per layer its heads and its MLP), so
    the writers upstream of a reader are a prefix of the rows. Readers are columns: per
    layer ``q`` of every head, ``k``, ``v``, then the MLP; finally the logits.
    """

    def __init__(self, bridge: Any, lay: _Layout, post_norms: Sequence[torch.nn.Module | None] = ()):
        self.lay = lay
        h = lay.n_heads
        self.w_o = [bridge.blocks[layer].attn.W_O.detach().float() for layer in range(lay.n_layers)]  # [h, d_head, d]
        # Per layer, the norm between the attention output and the residual (Gemma 2/3,
        # OLMo-2), else None: a head's residual write is then that norm's Jacobian at the
        # gradient point times z_h W_O[h] (see _head_writes), so edges still sum to nodes.
        self.post_norms = list(post_norms) or [None] * lay.n_layers
        self.head_results: list[torch.Tensor] = []
        self.n_writers = 1 + lay.n_layers * (h + 1)
        self.n_readers = lay.n_layers * (3 * h + 1) + 1
        self.totals = torch.zeros(self.n_writers, self.n_readers, dtype=torch.float64, device=module_device(bridge))
        self.chunk = torch.zeros_like(self.totals)
        self.writer_rows: torch.Tensor | None = None
        self.kv_split: dict[str, torch.Tensor] = {}
        self.kv_checked = False  # the split is checked against the full gradient on the first chunk
        self.kv_masks: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def set_deltas(self, deltas: dict[str, torch.Tensor]) -> None:
        """Stack every writer's residual-write difference into ``[n_writers, batch*seq*d]``."""
        lay = self.lay
        embed = functools.reduce(torch.add, [deltas[n] for n in lay.embed_hooks if n in deltas])
        self.embed_delta = embed.unsqueeze(2)  # [b, s, 1, d]
        self.head_results = [torch.einsum("bshe,hed->bshd", deltas[lay.z(layer)].float(), self.w_o[layer])
                             for layer in range(lay.n_layers)]
        self.mlp_deltas = [deltas[lay.mlp_out(layer)].unsqueeze(2) for layer in range(lay.n_layers)]
        if not self.has_post_norms:  # else the rows are made per pass from the linearised writes (add)
            self.writer_rows = self._stack(self.head_results)
            self.head_results = []  # in the rows now; not read again

    @property
    def has_post_norms(self) -> bool:
        return any(n is not None for n in self.post_norms)

    def post_norm_hooks(self) -> list[str]:
        """The pre-norm attention output of each post-normed layer (the Jacobian's point)."""
        return [f"blocks.{layer}.ln1_post.hook_in" for layer, n in enumerate(self.post_norms) if n is not None]

    def _stack(self, head_writes: list[torch.Tensor]) -> torch.Tensor:
        """``[n_writers, b*s*d]``, written in place writer by writer (the values ``cat`` along the
        writers, then a permuted copy, would give, without holding both copies at once)."""
        rows = [self.embed_delta]
        for layer in range(self.lay.n_layers):
            rows += [head_writes[layer], self.mlp_deltas[layer]]
        b, s, _, d = rows[0].shape
        dtype = functools.reduce(torch.promote_types, (r.dtype for r in rows))  # cat's result type
        out = torch.empty(self.n_writers, b, s, d, dtype=dtype, device=rows[0].device)
        at = 0
        for row in rows:  # [b, s, n, d]
            out[at : at + row.shape[2]].copy_(row.permute(2, 0, 1, 3))
            at += row.shape[2]
        return out.reshape(self.n_writers, -1)

    def _head_writes(self, live: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Each head's residual write linearised at this pass: ``J_norm(a) (z_h W_O[h])``."""
        out = []
        for layer, norm in enumerate(self.post_norms):
            result = self.head_results[layer]
            if norm is None:
                out.append(result)
                continue
            point = live[f"blocks.{layer}.ln1_post.hook_in"].detach().float()

            def jvp(v: torch.Tensor, norm: torch.nn.Module = norm, point: torch.Tensor = point) -> torch.Tensor:
                return torch.func.jvp(norm, (point,), (v,))[1]

            out.append(torch.func.vmap(jvp, in_dims=2, out_dims=2)(result))
        return out

    def split_kv(self, live: dict[str, torch.Tensor], grad: dict[str, torch.Tensor]) -> None:
        """Per-query-head parts of each kv head's K/V input gradient (GQA only).

        For group member ``r`` (query heads ``g * group + r``, the ``repeat_kv`` layout),
        a vector-Jacobian product from ``dm/d(attn_scores)`` (for K) or ``dm/d(z)`` (for V)
        restricted to those heads back to the K/V input fork gives ``[b, s, n_kv, d]``; slot
        ``g`` is query head ``g * group + r``'s part. Checked to add up to the full gradient on
        the sweep's first chunk (the layout is the same on every chunk).
        """
        lay, group = self.lay, self.lay.group
        for layer in range(lay.n_layers):
            for kind, out_name, head_dim in (("k", "attn.hook_attn_scores", 1), ("v", "attn.hook_z", 2)):
                inp = f"blocks.{layer}.attn.hook_{kind}_input"
                out = f"blocks.{layer}.{out_name}"
                # every slot is written below (the r::group slices of the heads cover them all): no zeroing
                parts = torch.empty(*grad[inp].shape[:2], lay.n_heads, grad[inp].shape[-1], device=grad[inp].device)
                for r in range(group):
                    mask = self._member_mask(r, head_dim, grad[out])
                    (part,) = torch.autograd.grad(
                        live[out], live[inp], grad_outputs=grad[out] * mask, retain_graph=True, allow_unused=True
                    )
                    if part is None:
                        part = torch.zeros_like(grad[inp])
                    parts[:, :, r::group] = part
                if not self.kv_checked:
                    self._check_split(parts, grad[inp], layer, kind)
                self.kv_split[inp] = parts
        self.kv_checked = True

    def _member_mask(self, r: int, head_dim: int, like: torch.Tensor) -> torch.Tensor:
        """1.0 on the query heads of group member ``r`` along ``head_dim`` of ``like``, else 0.0."""
        key = (r, head_dim, like.device)
        mask = self.kv_masks.get(key)
        if mask is None:
            shape = [1] * like.ndim
            shape[head_dim] = self.lay.n_heads
            members = torch.arange(self.lay.n_heads, device=like.device) % self.lay.group == r
            mask = self.kv_masks[key] = members.float().reshape(shape)
        return mask

    def _check_split(self, parts: torch.Tensor, full: torch.Tensor, layer: int, kind: str) -> None:
        total = parts.reshape(*parts.shape[:2], self.lay.n_kv_heads, self.lay.group, -1).sum(3)
        scale = float(full.abs().max()) + 1e-30
        # a wrong layout misses by the size of the gradient itself; a 16-bit model's parts and
        # their sum are each rounded to its dtype (bf16: ~0.5% of the largest value), float32 ~1e-7
        tolerance = max(1e-4, 8 * torch.finfo(full.dtype).eps)
        if float((total - full).abs().max()) > tolerance * scale + 1e-7:
            raise WorkbenchError(
                f"internal: the per-query-head split of blocks.{layer} {kind.upper()} input gradients "
                "does not add up to the kv-head gradient; this bridge's GQA layout is not supported"
            )

    def add(self, grad: dict[str, torch.Tensor], weight: float, live: dict[str, torch.Tensor]) -> None:
        lay, h = self.lay, self.lay.n_heads
        if self.has_post_norms:
            with torch.no_grad():
                self.writer_rows = self._stack(self._head_writes(live))
        assert self.writer_rows is not None
        col = 0
        for layer in range(lay.n_layers):
            readers = []
            for kind in "qkv":
                name = f"blocks.{layer}.attn.hook_{kind}_input"
                g = self.kv_split.get(name, grad[name]) if kind != "q" else grad[name]
                readers.append(g.float())  # [b, s, h, d]; a 16-bit model's gradient widened (exact), as the rows are
            attn = torch.cat(readers, dim=2).permute(2, 0, 1, 3).reshape(3 * h, -1)
            upstream = 1 + layer * (h + 1)
            self.chunk[:upstream, col : col + 3 * h] += weight * (self.writer_rows[:upstream] @ attn.T).double()
            col += 3 * h
            mlp_in = grad[f"blocks.{layer}.hook_mlp_in"].reshape(1, -1).float()
            upstream_mlp = upstream if lay.parallel else upstream + h
            self.chunk[:upstream_mlp, col] += weight * (self.writer_rows[:upstream_mlp] @ mlp_in.T).double()[:, 0]
            col += 1
        final = grad[f"blocks.{lay.n_layers - 1}.hook_resid_post"].reshape(1, -1).float()
        self.chunk[:, col] += weight * (self.writer_rows @ final.T).double()[:, 0]
        self.kv_split = {}

    def end_chunk(self) -> None:
        self.totals += self.chunk
        self.chunk.zero_()
        # the chunk's residual-write differences, released before the next chunk's forward
        self.writer_rows = None
        self.head_results, self.mlp_deltas = [], []

    def result(self) -> dict[EdgeKey, float]:
        keys, rows, cols = _edge_cells(self.lay)
        return dict(zip(keys, self.totals[rows.to(self.totals.device), cols.to(self.totals.device)].tolist()))


@functools.lru_cache(maxsize=8)
def _edge_cells(lay: _Layout) -> tuple[tuple[EdgeKey, ...], torch.Tensor, torch.Tensor]:
    """Every edge of the layout (reader by reader, its upstream writers in forward order) with its
    row and column in :class:`_EdgeAccumulator`'s totals. The same keys on every attribution of one
    model (123k on SmolLM2), so they are built once per layout."""
    h, writers = lay.n_heads, lay.writers()
    readers: list[tuple[Component, EdgeInput, int]] = []  # (reader, input, number of upstream writers)
    for layer in range(lay.n_layers):
        upstream = 1 + layer * (h + 1)
        kinds: tuple[EdgeInput, ...] = ("q", "k", "v")
        for kind in kinds:
            readers.extend((head(layer, i), kind, upstream) for i in range(h))
        mlp_input: EdgeInput = "mlp"
        readers.append((mlp(layer), mlp_input, upstream if lay.parallel else upstream + h))
    logits_input: EdgeInput = "logits"
    readers.append((LOGITS, logits_input, len(writers)))
    keys: list[EdgeKey] = []
    rows: list[int] = []
    cols: list[int] = []
    for col, (reader, inp, upstream) in enumerate(readers):
        keys.extend((writers[row], reader, inp) for row in range(upstream))
        rows.extend(range(upstream))
        cols.extend([col] * upstream)
    return tuple(keys), torch.tensor(rows), torch.tensor(cols)


# --- exact patching and ablation -------------------------------------------------------


def _node_patch(lay: _Layout, source: dict[str, torch.Tensor], current: list[Component | None]) -> PatchFn:
    """Replace the output of ``current[0]`` by its value in ``source`` (same batch layout)."""

    def patch(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        c = current[0]
        if c is None:
            return None
        if c.kind is ComponentKind.EMBED:
            return source[name] if name in lay.embed_hooks else None
        if name != lay.hook_of(c):
            return None
        if c.kind is ComponentKind.MLP:
            return source[name]
        out = tensor.clone()
        out[:, :, c.head] = source[name][:, :, c.head]
        return out

    return patch


def _exact_sweep(
    bridge: Any, lay: _Layout, pairs: PromptPairs, config: AttributionConfig, sizes: _PassSizes, tracker: Steps,
    means: ActivationMeans | None = None,
) -> _Sums:
    """Per pair and node: ``m(corrupt, node clean) - m(corrupt)`` (denoising), or on the mean
    baseline ``m(clean) - m(clean, node at its mean)`` (noising)."""
    writers = lay.writers()
    sums = _Sums(torch.zeros(pairs.n_pairs, len(writers), dtype=torch.float64))
    with torch.no_grad():
        for group in pairs.groups:
            for chunk in sizes.chunks(group):
                logits, live = _forward(bridge, chunk.clean, lay.node_hooks)
                clean_acts = {n: t.clone() for n, t in live.items()}
                clean = _metric_values(logits, chunk, config.metric)
                sums.clean += float(clean.sum())
                noising = chunk.baseline == "mean"
                if noising:
                    assert means is not None
                    source, run = means.for_chunk(lay.node_hooks, chunk), chunk.clean
                    sums.corrupt += _ablated_all(bridge, lay, chunk, source, config.metric)
                else:
                    source, run = clean_acts, chunk.corrupt
                    base = _metric_values(bridge(chunk.corrupt, use_cache=False), chunk, config.metric)
                    sums.corrupt += float(base.sum())
                current: list[Component | None] = [None]
                patch = _node_patch(lay, source, current)
                with bridge.hooks(fwd_hooks=[(n, _patch_hook(n, patch)) for n in lay.node_hooks if n in source]):
                    for i, c in enumerate(writers):
                        current[0] = c
                        patched = _metric_values(bridge(run, use_cache=False), chunk, config.metric)
                        sums.per_pair[chunk.index, i] += (clean - patched if noising else patched - base).double()
                        tracker.step(f"exact: patched {c.name}")
    return sums


def _patch_hook(name: str, patch: PatchFn) -> Callable[..., torch.Tensor | None]:
    def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor | None:
        del hook
        return patch(name, tensor)

    return hook


# --- public API ------------------------------------------------------------------------


def attribute(
    model: LoadedModel,
    facts_or_pairs: Sequence[Any] | PromptPairs,
    config: AttributionConfig = AttributionConfig(),
    progress: Progress | None = None,
    *,
    means: ActivationMeans | None = None,
    taken_ahead: CleanRuns | None = None,
) -> Attribution:
    """Attribute the metric over clean/baseline pairs to the model's components.

    Args:
        model: the model (eval mode); never modified.
        facts_or_pairs: facts (see :func:`make_prompt_pairs`, built with ``config.metric``,
            ``config.baseline`` and ``config.seed``) or ready :class:`PromptPairs`.
        config: method, IG steps, metric, baseline, edges, batch size.
        progress: ``progress(fraction, message)``; a tqdm bar when ``None``.
        means: the pairs' :func:`dataset_means` at ``config.means_batch`` when already taken
            (read only by pairs on the mean baseline); else taken here.
        taken_ahead: the pairs' :func:`clean_runs` with this config when taken ahead (each
            chunk's is taken from it once); else each chunk's clean run is made here.

    Returns:
        An :class:`Attribution` with a score for the embed, every head and every MLP
        (and every edge when ``config.edges``), averaged over the pairs, and per pair
        (:meth:`Attribution.for_fact`).
    """
    if not isinstance(config, AttributionConfig):
        raise WorkbenchError(f"config must be an AttributionConfig, got {type(config).__name__}")
    bridge = _check_model(model)
    pairs = pairs_for(model, facts_or_pairs, config)
    lay = _Layout.of(bridge)
    _check_tokens(lay, pairs, bridge)
    if taken_ahead is not None and taken_ahead.key != CleanRuns.key_of(model, pairs, config):
        raise WorkbenchError("these clean runs were taken for other weights, pairs, batch size, edge hooks or "
                             "metric: take them with clean_runs(model, pairs, config)")
    sizes = _PassSizes.of(model, lay, config)
    total = sizes.count(pairs) * (len(lay.writers()) if config.method == "exact" else config.steps)
    tracker = Steps(total, f"attribution ({config.method})", progress)
    try:
        with _bridge_lock(bridge):
            if not pairs.has_mean:
                means = None
            elif means is None:
                means = _means(bridge, lay, pairs, config.means_batch)
            else:
                _check_means(means, lay, pairs)
            if config.method == "exact":
                sums = _exact_sweep(bridge, lay, pairs, config, sizes, tracker, means)
            elif config.edges:
                with _edge_flags(bridge):
                    sums = _gradient_sweep(bridge, lay, pairs, config, sizes, tracker, _post_norms(model), means,
                                           taken_ahead)
            else:
                sums = _gradient_sweep(bridge, lay, pairs, config, sizes, tracker, means=means, ahead=taken_ahead)
    finally:
        tracker.close()
    n = pairs.n_pairs
    return Attribution(
        scores={c: float(s) for c, s in zip(lay.writers(), (sums.per_pair.sum(0) / n).tolist())},
        method=config.method,
        metric=config.metric,
        n_pairs=n,
        prompts_hash=pairs.prompts_hash,
        model_fingerprint=model.fingerprint,
        clean_metric=sums.clean / n,
        corrupt_metric=sums.corrupt / n,
        n_layers=lay.n_layers,
        n_heads=lay.n_heads,
        ig_steps=config.ig_steps if config.method == "ig" else 1,
        edge_scores={k: v / n for k, v in sums.edges.items()},
        n_kv_heads=lay.n_kv_heads,
        n_dropped=pairs.n_dropped,
        baseline=pairs.baseline,
        pairing=pairs.pairing,
        pair_scores=sums.per_pair,
        pair_prompts=pairs.clean_prompts,
        pair_kinds=pairs.pair_kinds,
    )


def _post_norms(model: LoadedModel) -> list[torch.nn.Module | None]:
    """Per layer, the pristine model's norm on the attention output before the residual
    (``model.adapter``); only evaluated (``jvp``), never modified."""
    return [None if layer.attention_out_norm is None else model.hf.get_submodule(layer.attention_out_norm)
            for layer in model.adapter.layers]


def pairs_for(model: LoadedModel, facts_or_pairs: Any, config: AttributionConfig) -> PromptPairs:
    """The pairs :func:`attribute` runs on: ready pairs under ``config``'s metric, or facts made
    into pairs with ``config``'s metric, baseline and seed."""
    if isinstance(facts_or_pairs, PromptPairs):
        return facts_or_pairs.with_metric(config.metric)
    if facts_or_pairs is None or isinstance(facts_or_pairs, (str, bytes)):
        raise WorkbenchError(f"expected facts or PromptPairs, got {facts_or_pairs!r}")
    return make_prompt_pairs(model, list(facts_or_pairs), metric=config.metric, baseline=config.baseline,
                             seed=config.seed)


def _check_tokens(lay: _Layout, pairs: PromptPairs, bridge: Any) -> None:
    vocab = int(bridge.cfg.d_vocab)
    for g in pairs.groups:
        for name in ("clean", "corrupt", "answers"):
            t = getattr(g, name)
            if int(t.min()) < 0 or int(t.max()) >= vocab:
                raise WorkbenchError(
                    f"pair {name} token ids must lie in [0, {vocab}), got {int(t.min())}..{int(t.max())}"
                )
        if int(g.corrupt_answers.max()) >= vocab:
            raise WorkbenchError(f"corrupt answer ids must lie below the vocabulary size {vocab}")


def metric_baselines(
    model: LoadedModel, pairs: PromptPairs, *, metric: AblationMetric | None = None,
    batch_size: int = ABLATION_BATCH_SIZE, means: ActivationMeans | None = None,
) -> tuple[float, float]:
    """Mean metric of the clean runs and of the baseline runs, ``(clean, corrupt)``: a
    pair's baseline run is its corrupt prompt, or on the mean baseline the clean prompt
    with every writer at its dataset mean. With ``kl`` the clean value is 0."""
    if metric == "kl":
        return 0.0, ablated_metric(model, pairs, (), "corrupt", metric="kl", batch_size=batch_size, means=means)
    bridge = _check_model(model)
    lay = _Layout.of(bridge)
    metric = metric or pairs.metric
    pairs = pairs.with_metric(metric)
    clean = corrupt = 0.0
    with _bridge_lock(bridge), torch.no_grad():
        if pairs.has_mean and means is None:
            means = _means(bridge, lay, pairs, batch_size)
        for group in pairs.groups:
            for chunk in group.chunks(batch_size):
                clean += float(_metric_values(bridge(chunk.clean), chunk, metric).sum())
                if chunk.baseline == "mean":
                    assert means is not None
                    corrupt += _ablated_all(bridge, lay, chunk, means.for_chunk(lay.node_hooks, chunk), metric)
                else:
                    corrupt += float(_metric_values(bridge(chunk.corrupt), chunk, metric).sum())
    return clean / pairs.n_pairs, corrupt / pairs.n_pairs


@dataclass(frozen=True, eq=False)
class CorruptActivations:
    """The corrupt runs' activations at every writer hook, one dict per chunk of ``batch_size``
    pairs in :func:`ablated_metric`'s order (``None`` for a chunk on the mean baseline).

    They are the same whichever components a run ablates, so measuring many circuits on one set
    of pairs (a session's edits, a faithfulness curve) can run them once instead of per circuit.
    """

    batch_size: int
    chunks: tuple[dict[str, torch.Tensor] | None, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for acts in self.chunks if acts is not None for t in acts.values())


def corrupt_activations(model: LoadedModel, pairs: PromptPairs, *, batch_size: int = ABLATION_BATCH_SIZE,
                        max_bytes: int | None = None) -> CorruptActivations | None:
    """The corrupt runs of ``pairs`` at every writer hook (see :class:`CorruptActivations`), or
    ``None`` when they would take more than ``max_bytes`` (estimated from the first chunk run,
    so a set too large costs one chunk's forward)."""
    bridge = _check_model(model)
    lay = _Layout.of(bridge)
    paired_tokens = sum(g.n * g.seq for g in pairs.groups if g.baseline != "mean")
    chunks: list[dict[str, torch.Tensor] | None] = []
    estimated = max_bytes is None
    with _bridge_lock(bridge), torch.no_grad():
        for group in pairs.groups:
            for chunk in group.chunks(batch_size):
                if chunk.baseline == "mean":
                    chunks.append(None)
                    continue
                acts = {n: t.clone() for n, t in _activations(bridge, chunk.corrupt, lay.node_hooks).items()}
                if not estimated:
                    per_token = sum(t.nbytes for t in acts.values()) / (chunk.n * chunk.seq)
                    if max_bytes is not None and per_token * paired_tokens > max_bytes:
                        return None
                    estimated = True
                chunks.append(acts)
    return CorruptActivations(batch_size, tuple(chunks))


def ablated_metric(
    model: LoadedModel,
    pairs: PromptPairs,
    keep: Iterable[Component],
    ablation: AblationName = "corrupt",
    *,
    metric: AblationMetric | None = None,
    batch_size: int = ABLATION_BATCH_SIZE,
    means: ActivationMeans | None = None,
    corrupt: CorruptActivations | None = None,
) -> float:
    """Mean metric on the clean prompts with every writer *not* in ``keep`` ablated.

    Each writer component (embed, head, MLP) outside ``keep`` has its output (``hook_embed``
    (+ ``hook_pos_embed``), its slice of ``attn.hook_z``, ``hook_mlp_out``) replaced by its
    value on the pair's corrupt prompt (``"corrupt"``; a pair on the mean baseline takes
    the mean), or by its dataset mean (``"mean"``, :class:`ActivationMeans`; ``means``
    may be given to reuse one; ``corrupt``, :func:`corrupt_activations` of ``pairs`` at this
    ``batch_size``, spares the corrupt runs). ``LOGITS`` in ``keep`` is ignored. Keeping everything gives
    the clean metric; keeping nothing with ``"corrupt"`` gives the baseline metric (see
    :func:`metric_baselines`). ``metric="kl"``: minus ``KL(clean || ablated)`` (:data:`AblationMetric`).
    """
    if ablation not in ("corrupt", "mean"):
        raise WorkbenchError(f"ablation must be 'corrupt' or 'mean', got {ablation!r}")
    bridge = _check_model(model)
    lay = _Layout.of(bridge)
    metric = metric or pairs.metric
    if metric not in get_args(AblationMetric):
        raise WorkbenchError(f"unknown metric {metric!r}; use one of {', '.join(get_args(AblationMetric))}")
    if metric != "kl":
        pairs = pairs.with_metric(metric)
    if corrupt is not None and (corrupt.batch_size, len(corrupt.chunks)) != (batch_size, _n_chunks(pairs, batch_size)):
        raise WorkbenchError(f"corrupt activations of {len(corrupt.chunks)} chunks of {corrupt.batch_size} pairs do "
                             f"not match these pairs in chunks of {batch_size}")
    names, heads_by_layer = _ablated_hooks(lay, keep)
    total = 0.0
    index = -1
    with _bridge_lock(bridge), torch.no_grad():
        if names and means is None and (ablation == "mean" or pairs.has_mean):
            means = _means(bridge, lay, pairs, batch_size)
        for group in pairs.groups:
            for chunk in group.chunks(batch_size):
                index += 1
                kept = corrupt.chunks[index] if corrupt is not None else None
                if not names:
                    source: dict[str, torch.Tensor] = {}
                elif ablation == "mean" or chunk.baseline == "mean":
                    assert means is not None
                    source = means.for_chunk(names, chunk)
                elif kept is not None:  # the hooks copy what they write, so the kept tensors stay as run
                    source = {n: kept[n] for n in names}
                else:
                    source = {n: t.clone() for n, t in _activations(bridge, chunk.corrupt, names).items()}
                hooks = [(n, _replace_hook(n, source, heads_by_layer)) for n in names if n in source]
                with bridge.hooks(fwd_hooks=hooks):
                    logits = bridge(chunk.clean)
                if metric == "kl":
                    values = _kl_values(logits, bridge(chunk.clean) if names else logits, chunk)
                else:
                    values = _metric_values(logits, chunk, metric)  # type: ignore[arg-type] -- not kl here
                total += float(values.sum())
    return total / pairs.n_pairs


def _ablated_hooks(lay: _Layout, keep: Iterable[Component]) -> tuple[list[str], dict[int, list[int]]]:
    """The hooks (forward order) that ablate every writer outside ``keep``, and per layer
    the ablated heads."""
    keep = set(keep)
    for c in keep:
        if not isinstance(c, Component):
            raise WorkbenchError(f"keep must hold Components, got {c!r}")
        try:
            c.check_fits(lay.n_layers, lay.n_heads)
        except ValueError as exc:
            raise WorkbenchError(f"keep: {exc}") from None
    ablate = [c for c in lay.writers() if c not in keep]
    heads_by_layer: dict[int, list[int]] = {}
    for c in ablate:
        if c.kind is ComponentKind.HEAD:
            heads_by_layer.setdefault(c.block, []).append(c.head_index)
    names = set()
    if EMBED in ablate:
        names.update(lay.embed_hooks)
    names.update(lay.z(layer) for layer in heads_by_layer)
    names.update(lay.mlp_out(c.block) for c in ablate if c.kind is ComponentKind.MLP)
    return [n for n in lay.node_hooks if n in names], heads_by_layer


def _replace_hook(name: str, source: dict[str, torch.Tensor],
                  heads_by_layer: dict[int, list[int]]) -> Callable[..., torch.Tensor]:
    def hook(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
        del hook
        value = source[name].expand_as(tensor)
        if name.endswith("attn.hook_z"):
            out = tensor.clone()
            idx = heads_by_layer[int(name.split(".")[1])]
            out[:, :, idx] = value[:, :, idx]
            return out
        return value.clone()

    return hook


def agreement(
    a: Attribution | dict[Component, float], b: Attribution | dict[Component, float], top_k: int = 20
) -> dict[str, float]:
    """How well scores ``a`` agree with reference scores ``b`` over their common components.

    Returns a dict with ``spearman`` and ``kendall`` (rank correlations of the signed
    scores), ``pearson``, ``spearman_top_k`` (Spearman over ``b``'s ``top_k`` components by
    ``|score|``), ``top_k_overlap`` (fraction of ``b``'s top ``top_k`` by ``|score|`` that
    are also in ``a``'s), ``max_abs_diff`` and ``n`` (components compared). A correlation
    is ``nan`` when one side is constant.
    """
    from scipy import stats

    sa = a.scores if isinstance(a, Attribution) else dict(a)
    sb = b.scores if isinstance(b, Attribution) else dict(b)
    common = sorted(set(sa) & set(sb), key=_order)
    if len(common) < 2:
        raise WorkbenchError(f"agreement needs at least 2 common components, got {len(common)}")
    if not isinstance(top_k, int) or top_k < 1:
        raise WorkbenchError(f"top_k must be an integer >= 1, got {top_k!r}")
    xa = [sa[c] for c in common]
    xb = [sb[c] for c in common]

    def corr(fn: Callable, x: list[float], y: list[float]) -> float:
        if len(set(x)) < 2 or len(set(y)) < 2:
            return math.nan
        return float(fn(x, y)[0])

    k = min(top_k, len(common))
    top_b = sorted(common, key=lambda c: -abs(sb[c]))[:k]
    top_a = sorted(common, key=lambda c: -abs(sa[c]))[:k]
    return {
        "spearman": corr(stats.spearmanr, xa, xb),
        "kendall": corr(stats.kendalltau, xa, xb),
        "pearson": corr(stats.pearsonr, xa, xb),
        "spearman_top_k": corr(stats.spearmanr, [sa[c] for c in top_b], [sb[c] for c in top_b]),
        "top_k_overlap": len(set(top_a) & set(top_b)) / k,
        "max_abs_diff": max(abs(x - y) for x, y in zip(xa, xb)),
        "top_k": float(k),
        "n": float(len(common)),
    }
