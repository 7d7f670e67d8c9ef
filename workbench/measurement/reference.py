"""Reference implementations: the slow, plainly written versions the fast paths are checked against.

Shared by the tests (which assert the fast paths equal these) and by ``workbench bench``
(which times the fast paths against them):

- :func:`tl_node_scores` — TransformerLens' own ``attribution_patch``, one pair at a time;
- :func:`plain_exact_patching` — activation patching as a plain hook loop, one forward per
  pair and node;
- :func:`diagonal_fisher_per_example` — the diagonal Fisher by its definition, one backward
  per example (MANSU's batched Fisher is tested against it; MANSU also falls back to it for
  weights the batched path does not cover).
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch

from workbench.core.components import EMBED, Component, ComponentKind, all_components, head, mlp
from workbench.interpretability.attribution import PromptPairs
from workbench.models.loaded import LoadedModel
from workbench.unlearning.mansu.fisher import diagonal_fisher_per_example

__all__ = ["diagonal_fisher_per_example", "plain_exact_patching", "tl_node_scores"]


def tl_node_scores(model: LoadedModel, pairs: PromptPairs) -> dict[Component, float]:
    """TransformerLens' ``attribution_patch`` per pair, summed over positions, averaged over pairs.

    TL scores ``Node(kind, position, layer, head)`` per position; the embed node is
    ``hook_embed`` only (ours adds ``hook_pos_embed``, whose clean-corrupt difference is
    zero for equal-length pairs). The bridge's parameters do not require grad, so a
    forward hook makes the embedding output a leaf that does — otherwise TL's backward
    has nothing to differentiate.
    """
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch

    bridge = model.bridge()
    totals: dict[Component, float] = {}

    def leaf(tensor: torch.Tensor, *, hook: Any) -> torch.Tensor:
        del hook
        return tensor.detach().requires_grad_(True)

    with bridge.hooks(fwd_hooks=[("hook_embed", leaf)]), warnings.catch_warnings():
        # TL's backward hooks warn that they fire on module outputs (inputs need no grad).
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for g in pairs.groups:
            for i in range(g.n):
                a, c = int(g.answers[i]), int(g.corrupt_answers[i])
                def metric(logits: torch.Tensor, a: int = a, c: int = c) -> torch.Tensor:
                    if pairs.metric == "logit_diff":
                        return logits[0, -1, a] - logits[0, -1, c]
                    return torch.log_softmax(logits[0, -1].float(), -1)[a]
                result = attribution_patch(bridge, g.clean[i : i + 1], g.corrupt[i : i + 1], metric)
                for node, score in result.node_scores.items():
                    if node.kind == "embed":
                        comp = EMBED
                    elif node.kind == "attn_head_out":  # TransformerLens sets layer and head on these
                        comp = head(cast(int, node.layer), cast(int, node.head))
                    else:
                        comp = mlp(cast(int, node.layer))
                    totals[comp] = totals.get(comp, 0.0) + score
    return {c: s / pairs.n_pairs for c, s in totals.items()}


def plain_exact_patching(model: LoadedModel, pairs: PromptPairs) -> dict[Component, float]:
    """Activation patching written as plainly as possible: per pair, per node, one forward.

    The score of a node is the logit difference of the corrupt run with that node's clean
    output patched in, minus the corrupt run's, averaged over pairs.
    """
    bridge = model.bridge()
    totals = dict.fromkeys(all_components(model.n_layers, model.n_heads), 0.0)

    def metric(logits: torch.Tensor, g: Any, i: int) -> float:
        return float(logits[0, -1, g.answers[i]] - logits[0, -1, g.corrupt_answers[i]])

    with torch.no_grad():
        for g in pairs.groups:
            for i in range(g.n):
                clean, corrupt = g.clean[i : i + 1], g.corrupt[i : i + 1]
                _, cache = bridge.run_with_cache(clean)
                base = metric(bridge(corrupt), g, i)
                for c in totals:
                    hooks = _clean_output_hooks(c, cache)
                    totals[c] += metric(bridge.run_with_hooks(corrupt, fwd_hooks=hooks), g, i) - base
    return {c: s / pairs.n_pairs for c, s in totals.items()}


def _clean_output_hooks(c: Component, cache: Any) -> list[tuple[str, Any]]:
    """Hooks that replace component ``c``'s output by its clean (cached) value."""
    if c.kind is ComponentKind.EMBED:
        return [("hook_embed", lambda t, hook: cache["hook_embed"])]
    if c.kind is ComponentKind.MLP:
        name = f"blocks.{c.layer}.hook_mlp_out"
        return [(name, lambda t, hook: cache[name])]
    name = f"blocks.{c.layer}.attn.hook_z"

    def patch(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[:, :, c.head] = cache[name][:, :, c.head]
        return t

    return [(name, patch)]
