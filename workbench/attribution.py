"""Circuit attribution on a ``TransformerBridge``: which heads and MLPs carry the forget facts.

(Contract stub written by the lead; the attribution helper owns this file from here on.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from workbench.nodes import Component, EdgeInput

AttributionMethod = Literal["atp", "ig", "exact"]
"""``atp``: attribution patching (gradient x activation difference, one batched forward/backward);
``ig``: integrated gradients along the corrupt->clean path (EAP-IG style, ``ig_steps`` points);
``exact``: activation patching, one forward per component (the reference)."""

MetricName = Literal["logit_diff", "logprob"]
"""``logit_diff``: logit of the true answer minus logit of the corrupt prompt's answer (default);
``logprob``: log-probability of the true answer."""

EdgeKey = tuple[Component, Component, EdgeInput]
"""(writer, reader, which input of the reader)."""


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
