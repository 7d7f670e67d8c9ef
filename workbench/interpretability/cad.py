"""CAD — Circuit Attribution Divergence: structural erasure vs behavioural suppression.

Definition used throughout the workbench. Let ``s_c`` be the forget-set attribution score
of component ``c`` (embed, every head, every MLP; :mod:`workbench.attribution`) before
unlearning and ``t_c`` after. Normalise magnitudes into distributions

    p_c = |s_c| / Σ|s|,    q_c = |t_c| / Σ|t|      (uniform if a sum is 0)

and take the Jensen–Shannon divergence in bits, which lies in [0, 1]:

    CAD = JSD(p ‖ q) = ½ KL(p ‖ m) + ½ KL(q ‖ m),   m = ½ (p + q),  log base 2.

A method that only *suppresses* the behaviour (e.g. lowers the answer logit late in the
network) scales the whole attribution pattern down and leaves its shape — low CAD. A
method that *erases* the mechanism changes which components carry the behaviour — high
CAD. CAD ignores the overall scale by design; the per-node differences and the circuit's
share of attribution mass (``Σ_{c∈circuit} |s_c| / Σ|s|``, before and after) are reported
beside it, so a reader sees both shape and scale.

For the quantized after-model, CAD compares the quantized base with the quantized
after-model (like with like), so the base's own quantization noise is not counted as
erasure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from workbench.core.components import Component
from workbench.core.errors import WorkbenchError


def _normalise(values: list[float]) -> list[float]:
    total = sum(values)
    if total <= 0:
        return [1.0 / len(values)] * len(values)
    return [v / total for v in values]


def jensen_shannon_bits(p: list[float], q: list[float]) -> float:
    """JSD(p ‖ q) in bits (in [0, 1]) of two distributions over the same support."""
    if len(p) != len(q) or not p:
        raise WorkbenchError("JSD needs two non-empty distributions of equal length")
    out = 0.0
    for a, b in zip(p, q):
        m = 0.5 * (a + b)
        if a > 0:
            out += 0.5 * a * math.log2(a / m)
        if b > 0:
            out += 0.5 * b * math.log2(b / m)
    return min(1.0, max(0.0, out))


@dataclass(frozen=True)
class CADResult:
    """Circuit Attribution Divergence of one before/after pair.

    Attributes:
        cad: JSD in bits between normalised |attribution| before and after (module docstring).
        per_node: component name -> (before, after, after − before), signed scores.
        circuit_share_before, circuit_share_after: the circuit's share of |attribution| mass
            (``nan`` without a circuit).
        metric_before, metric_after: mean clean metric of the forget prompts (e.g. logit diff).
    """

    cad: float
    per_node: dict[str, tuple[float, float, float]] = field(repr=False)
    circuit_share_before: float = float("nan")
    circuit_share_after: float = float("nan")
    metric_before: float = float("nan")
    metric_after: float = float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "cad": self.cad,
            "circuit_share_before": self.circuit_share_before,
            "circuit_share_after": self.circuit_share_after,
            "metric_before": self.metric_before,
            "metric_after": self.metric_after,
            "per_node": {k: list(v) for k, v in self.per_node.items()},
        }


def circuit_attribution_divergence(
    before: Mapping[Component, float],
    after: Mapping[Component, float],
    *,
    circuit: Iterable[Component] | None = None,
    metric_before: float = float("nan"),
    metric_after: float = float("nan"),
) -> CADResult:
    """CAD between two attribution score maps over the same components (see module docstring)."""
    if set(before) != set(after):
        missing = sorted(c.name for c in set(before) ^ set(after))
        raise WorkbenchError(f"before/after attributions cover different components: {missing[:5]}")
    if not before:
        raise WorkbenchError("CAD needs at least one component")
    comps = sorted(before)
    p = _normalise([abs(before[c]) for c in comps])
    q = _normalise([abs(after[c]) for c in comps])
    per_node = {c.name: (float(before[c]), float(after[c]), float(after[c] - before[c])) for c in comps}
    share_b = share_a = float("nan")
    if circuit is not None:
        # Summed in one fixed order: a set's order follows string hashing, which differs between
        # processes, and float sums in another order differ in the last digit.
        members = sorted(set(circuit))
        tb = sum(abs(before[c]) for c in comps)
        ta = sum(abs(after[c]) for c in comps)
        share_b = sum(abs(before[c]) for c in members if c in before) / tb if tb else 0.0
        share_a = sum(abs(after[c]) for c in members if c in after) / ta if ta else 0.0
    return CADResult(
        cad=jensen_shannon_bits(p, q), per_node=per_node,
        circuit_share_before=share_b, circuit_share_after=share_a,
        metric_before=metric_before, metric_after=metric_after,
    )
