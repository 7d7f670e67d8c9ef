"""The sparsity–permanence tradeoff (docs/SCIENCE.md §1.3), measured on a model's real weights.

One unlearning direction ``g`` (the gradient of the forget-set NLL, i.e. the direction of
steepest *ascent* of the forget loss, restricted to the weights the quantizer quantizes)
gets a fixed total budget ``B`` (an L2 norm). Spread over the ``k`` entries of largest
``|g|``, each moved weight moves by about ``B / √k``. Quantization keeps a move only where
it crosses a decision boundary, so the fraction of moved weights whose code changes falls
from 1 (few, large moves) towards 0 (many, tiny moves) as ``k`` grows. This module
measures that curve with bitsandbytes' own quantizer and puts the theory beside it.

Theory (:func:`theoretical_survival`), with its assumptions:

1. *Equal spread.* Each of the ``k`` moved weights moves by ``δ = B / √k`` (what
   :func:`spread_budget` does with ``profile="equal"``).
2. *Uniform position inside the bin.* A weight's position inside its decision interval
   (width ``w`` = :attr:`workbench.quant.BinGeometry.bin_width`) is uniform, so the
   distance to the boundary in the direction of the move is uniform on ``[0, w]`` and the
   move changes the code with probability ``min(1, δ / w)``.
3. *Fixed block scales.* Moving a weight does not change its block's absmax (it can, when
   the weight is the block's largest: then its own code stays at ±1 and the other codes
   of the block are rescaled; about 1 weight in ``blocksize`` is a block maximum).
4. The moved weights' bin widths are distributed like the model's (``bin_widths`` is
   every quantized weight's width); the top-|g| selection could be biased, which
   :func:`survival_curve` checks by also predicting from the moved weights' own widths.

So the expected fraction of moved weights whose code changes is
``E_w[min(1, B / (√k · w))]`` — 1 for ``k ≲ (B / w_max)²`` and ``≈ B / (√k) · E[1/w]``
for large ``k``. docs/SCIENCE.md §1.3 states the same as a threshold with the bin half-width,
``k ≲ (2B / w)²``; the expectation above is the smooth version of it (at ``δ = w/2`` half
the codes change).

Under assumption 2 rounding is *unbiased*: a code flip moves the weight by about one
gap ``≈ w`` with probability ``δ / w``, so ``E[Q(w+Δ) − Q(w)] = Δ``. The projection
``⟨Q(w+Δ) − Q(w), Δ⟩ / ‖Δ‖²`` (:attr:`workbench.quant.ModuleComparison.update_projection`)
therefore stays near 1 even where few codes change (docs/SCIENCE.md §6.3: rounding carried the
update through like dithering); the curve records it beside the code-flip fraction, with
the forget accuracy of ``w+Δ``, ``Q(w)+Δ`` and ``Q(w+Δ)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, silent
from workbench.data.facts import FactSplit
from workbench.measurement.evaluation import fact_top1
from workbench.measurement.results import VARIANTS, RunMetrics, UpdateMetrics
from workbench.models.loaded import LoadedModel
from workbench.models.scoring import FactBatch, span_logits
from workbench.models.update import Update
from workbench.quant import (
    QuantConfig,
    bin_geometry,
    compare_quantization,
    quantize_dequantize,
)
from workbench.unlearning.losses import nll

if TYPE_CHECKING:
    import plotly.graph_objects as go


Profile = Literal["equal", "proportional"]
PROFILES: tuple[str, ...] = ("equal", "proportional")



def _quant(quant: QuantConfig | None) -> QuantConfig:

    return quant or QuantConfig("nf4")


# --------------------------------------------------------------------------- the direction


def unlearning_direction(
    model: LoadedModel, split: FactSplit, quant: QuantConfig | None = None
) -> dict[str, torch.Tensor]:
    """One gradient-ascent direction on the forget set: ``∇_θ NLL_forget`` at the base.

    ``NLL_forget`` is the mean negative log-likelihood of the forget answers (first answer
    token, at the prompt's last position; :func:`workbench.unlearning.losses.nll`). Moving
    along ``+∇`` raises it fastest, i.e. it is the first step of gradient ascent (GA).
    Only the weights ``quant`` quantizes are included (the others would keep any update
    exactly, which is not the question here).

    Returns:
        HF parameter name -> gradient, float32, the parameter's shape; the base is not modified
        (the gradient is taken on a deep copy).
    """

    if not split.forget:
        raise WorkbenchError("the forget set is empty: there is no unlearning direction")
    names = set(model.adapter.quantizable(_quant(quant)))
    if not names:
        raise WorkbenchError(f"model {model.name!r} has no weight the quantizer quantizes")
    hf = copy.deepcopy(model.hf)  # requires_grad is a flag on shared tensors: never flip it on the base
    for name, p in hf.named_parameters():
        p.requires_grad_(name in names)
        p.grad = None
    batch = FactBatch.from_facts(model.tokenizer, split.forget)
    loss = nll(span_logits(hf, batch), batch.targets, batch.mask)
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in hf.named_parameters() if n in names and p.grad is not None}
    if not grads or all(float(g.abs().max()) == 0 for g in grads.values()):
        raise WorkbenchError("the forget-set gradient is zero: nothing to spread")
    return grads


# --------------------------------------------------------------------------- spreading a budget


def _flat_abs(direction: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([d.detach().reshape(-1).abs().float() for d in direction.values()])


def direction_size(direction: Mapping[str, torch.Tensor]) -> int:
    """Number of entries of a direction (the largest meaningful ``k``)."""
    return int(sum(d.numel() for d in direction.values()))


def spread_budget(
    direction: Mapping[str, torch.Tensor], k: int, budget: float, *, profile: Profile = "equal"
) -> Update:
    """The update that spends an L2 budget on the ``k`` largest-|g| entries of a direction.

    Convention: the ``k`` entries of largest ``|g|`` over *all* tensors of ``direction``
    are kept (ties at the threshold broken by flat order, names in ``direction``'s order),
    every other entry is 0, and the kept entries are scaled so that ``‖Δ‖₂ = budget``:

    - ``profile="equal"``: ``Δ_i = sign(g_i) · budget / √k`` — every moved weight moves by
      the same amount, the setting of the theory (:func:`theoretical_survival`).
    - ``profile="proportional"``: ``Δ_i = budget · g_i / ‖g_top-k‖`` — the truncated
      gradient step itself; magnitudes follow ``|g|``.

    ``Δ`` points along ``+g`` (up the forget loss when ``g`` is :func:`unlearning_direction`).

    Args:
        direction: name -> tensor (e.g. :func:`unlearning_direction`).
        k: number of entries to move, ``1 <= k <=`` :func:`direction_size`.
        budget: the L2 norm of the result, > 0.
        profile: ``"equal"`` or ``"proportional"``.
    """
    n = direction_size(direction)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise WorkbenchError(f"k must be a whole number in [1, {n}] (the direction's size), got {k!r}")
    if not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise WorkbenchError(f"the budget must be a positive number, got {budget!r}")
    if profile not in PROFILES:
        raise WorkbenchError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    flat = _flat_abs(direction)
    if int(torch.count_nonzero(flat)) < k:
        raise WorkbenchError(
            f"the direction has only {int(torch.count_nonzero(flat))} non-zero entries, fewer than k={k}")
    # topk over the flat vector picks exactly k entries (a threshold on |g| could pick more on ties)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(flat, k, sorted=False).indices] = True
    deltas: dict[str, torch.Tensor] = {}
    offset = 0
    norm_sq = 0.0
    for name, g in direction.items():
        m = keep[offset : offset + g.numel()].reshape(g.shape)
        offset += g.numel()
        if not bool(m.any()):
            continue
        g = g.detach().float()
        d = torch.where(m, g.sign() if profile == "equal" else g, torch.zeros_like(g))
        deltas[name] = d
        norm_sq += float((d.double() ** 2).sum())
    scale = budget / math.sqrt(norm_sq)
    return Update({name: d * scale for name, d in deltas.items()},
                  {"kind": "tradeoff", "k": str(k), "budget": repr(float(budget)), "profile": profile})


# --------------------------------------------------------------------------- theory


def model_bin_widths(model: LoadedModel, quant: QuantConfig | None = None) -> torch.Tensor:
    """Every quantized weight's bin width (:attr:`BinGeometry.bin_width`), flat float32."""

    quant = _quant(quant)
    state, tr = model.state(), model.adapter.transposed
    names = model.adapter.quantizable(quant)
    if not names:
        raise WorkbenchError(f"model {model.name!r} has no weight the quantizer quantizes")
    return torch.cat([bin_geometry(state[n], quant, transposed=n in tr).bin_width.reshape(-1) for n in names])


def _widths(bin_widths: torch.Tensor | Sequence[float]) -> torch.Tensor:
    w = torch.as_tensor(bin_widths, dtype=torch.float64).reshape(-1)
    w = w[torch.isfinite(w) & (w > 0)]  # an all-zero block has width 0: no move stays in it
    if w.numel() == 0:
        raise WorkbenchError("no positive, finite bin width to compare moves with")
    return w


def theoretical_survival(
    ks: Sequence[int], budget: float, bin_widths: torch.Tensor | Sequence[float]
) -> list[float]:
    """Expected fraction of moved weights whose code changes, ``E_w[min(1, B / (√k · w))]``.

    The assumptions (equal spread, uniform position inside the bin, fixed block scales,
    widths distributed like ``bin_widths``) are in the module docstring.

    Args:
        ks: numbers of moved weights.
        budget: total L2 norm ``B`` of the update.
        bin_widths: bin widths of the weights (e.g. :func:`model_bin_widths`); zero or
            non-finite widths are ignored.

    Returns:
        One fraction in ``[0, 1]`` per ``k``.
    """
    if not math.isfinite(budget) or budget <= 0:
        raise WorkbenchError(f"the budget must be a positive number, got {budget!r}")
    w = _widths(bin_widths)
    out = []
    for k in ks:
        if k < 1:
            raise WorkbenchError(f"k must be >= 1, got {k}")
        out.append(float(torch.clamp(budget / math.sqrt(k) / w, max=1.0).mean()))
    return out


def crossover_budget(bin_widths: torch.Tensor | Sequence[float], k: int) -> float:
    """The budget at which a move of ``B/√k`` is exactly one median bin width: ``median(w)·√k``.

    A handy unit: with this budget the theory changes nearly every code for ``k`` well
    below ``k`` and few codes for ``k`` far above it.
    """
    if k < 1:
        raise WorkbenchError(f"k must be >= 1, got {k}")
    return float(_widths(bin_widths).median()) * math.sqrt(k)


def default_ks(n: int, *, smallest: int = 10, points: int = 9) -> list[int]:
    """``points`` values of k, log-spaced from ``n`` (every weight) down to ``smallest``, descending."""
    if n < 1 or smallest < 1 or points < 2:
        raise WorkbenchError(f"need n >= 1, smallest >= 1 and points >= 2 (got {n}, {smallest}, {points})")
    smallest = min(smallest, n)
    ks = {round(math.exp(math.log(n) + (math.log(smallest) - math.log(n)) * i / (points - 1))) for i in range(points)}
    return sorted({max(1, min(n, k)) for k in ks}, reverse=True)


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class SurvivalPoint:
    """One point of the measured curve (see :func:`survival_curve` for the fields)."""

    k: int
    budget: float
    profile: str
    move_rms: float
    moved: int
    code_changed_fraction: float
    predicted_fraction: float
    codes_changed: int
    absmax_changes: int
    update_projection: float | None
    update_norm_ratio: float | None
    ratio_median: float | None
    forget: dict[str, float] | None = None
    retain: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.k < 1 or self.moved < 0:
            raise WorkbenchError(f"k must be >= 1 and moved >= 0, got k={self.k}, moved={self.moved}")
        for name in ("code_changed_fraction", "predicted_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise WorkbenchError(f"{name} must be a fraction in [0, 1], got {v}")
        if self.profile not in PROFILES:
            raise WorkbenchError(f"unknown profile {self.profile!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.forget is not None:
            f = self.forget
            # the two halves of the PTQ gap (metrics.py): the base's own shift and the rounding of Δ
            d["ptq_gap"] = f["after_q"] - f["after_fp"]
            d["rounding"] = f["after_q"] - f["after_qbase_delta"]
            fp_drop = f["base_fp"] - f["after_fp"]
            # forgetting kept by Q(w+Δ), relative to what w+Δ forgot (None when w+Δ forgot nothing)
            d["forgetting_kept"] = (f["base_q"] - f["after_q"]) / fp_drop if fp_drop > 0 else None
        return d


def _predicted_fraction(update: Update, geometry: Mapping[str, Any]) -> float:
    """Theory per moved weight: ``min(1, |Δ_i| / w_i)`` with its own bin width, and 0 where no
    boundary lies in the direction of the move (the top code moving up, the bottom code
    moving down: the block's absmax grows instead, assumption 3's exception)."""
    probs = []
    for name, delta in update.deltas.items():
        g = geometry[name]
        d = delta.to(g.bin_width.device)  # an Update keeps its deltas on the CPU
        moved = d != 0
        p = torch.nan_to_num(d.abs().double() / g.bin_width.double(), posinf=1.0).clamp(max=1.0)
        no_boundary = ((d > 0) & torch.isinf(g.to_upper)) | ((d < 0) & torch.isinf(g.to_lower))
        probs.append(torch.where(no_boundary, torch.zeros_like(p), p)[moved])
    return float(torch.cat(probs).mean()) if probs else 0.0


def survival_curve(
    model: LoadedModel,
    split: FactSplit,
    ks: Sequence[int],
    budget: float | Sequence[float],
    quant: QuantConfig | None = None,
    *,
    profile: Profile = "equal",
    direction: Mapping[str, torch.Tensor] | None = None,
    evaluate: bool = True,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Measure how much of a budget-``B`` update survives quantization, for each ``k``.

    ``budget`` may be one number or several (then every budget × every ``k``, budget-major;
    the gradient, Q(w) and the base's accuracies are computed once for all of them).

    For each ``k``: ``Δ = spread_budget(direction, k, budget, profile=profile)``, then bnb
    quantizes ``w`` and ``w + Δ`` (:func:`workbench.quant.compare_quantization`) and,
    with ``evaluate``, the forget/retain top-1 of the five models of
    :mod:`workbench.measurement.metrics` is measured (``base_fp`` w, ``base_q`` Q(w), ``after_fp``
    w+Δ, ``after_qbase_delta`` Q(w)+Δ, ``after_q`` Q(w+Δ); Q(w) is computed once).

    Returns:
        One dict per ``k`` (in the order given), the fields of :class:`SurvivalPoint`:
        ``k``; ``budget``; ``profile``; ``move_rms`` (``B/√k``); ``moved`` (weights with
        Δ ≠ 0, = k); ``code_changed_fraction`` (moved weights whose NF4 code changed — the
        survival the theory predicts); ``predicted_fraction`` (the theory applied per
        moved weight, with its own bin width: ``mean min(1, |Δ_i| / w_i)``, and 0 for a
        top/bottom code moved outwards);
        ``codes_changed`` (all code flips, incl. block rescales); ``absmax_changes``
        (blocks rescaled); ``update_projection`` (``⟨Q(w+Δ)−Q(w), Δ⟩/‖Δ‖²``);
        ``update_norm_ratio`` (``‖Q(w+Δ)−Q(w)‖/‖Δ‖``); ``ratio_median`` (median
        ``|Δw|``/bin width); ``forget``/``retain`` (variant -> top-1, or None); and, with
        accuracies, ``ptq_gap``, ``rounding`` and ``forgetting_kept`` (see
        :meth:`SurvivalPoint.to_dict`).
    """

    quant = _quant(quant)
    report = progress or silent
    if not ks:
        raise WorkbenchError("no k given")
    report(0.0, "forget-set gradient")
    direction = dict(direction) if direction is not None else unlearning_direction(model, split, quant)
    base = model.state()
    names = model.adapter.quantizable(quant)
    unknown = sorted(set(direction) - set(names))
    if unknown:
        raise WorkbenchError(f"the direction moves weights the quantizer leaves alone: {unknown[:3]}")
    tr = model.adapter.transposed
    geometry = {n: bin_geometry(base[n], quant, transposed=n in tr) for n in direction}
    qbase: dict[str, torch.Tensor] = {}
    acc_base: dict[str, dict[str, float]] = {}
    sets = {"forget": split.forget, "retain": split.retain}
    if evaluate:
        report(0.02, "quantizing the base")
        qbase = {n: quantize_dequantize(base[n], quant, transposed=n in tr) for n in names}
        base_q = model.with_state(qbase, f"{model.name}|{quant.label}")
        acc_base = {key: {"base_fp": fact_top1(model, facts), "base_q": fact_top1(base_q, facts)}
                    for key, facts in sets.items() if facts}
        del base_q
    budgets = [float(budget)] if isinstance(budget, (int, float)) else [float(b) for b in budget]
    if not budgets:
        raise WorkbenchError("no budget given")
    grid = [(b, k) for b in budgets for k in ks]
    rows = []
    for i, (budget, k) in enumerate(grid):
        report(0.05 + 0.95 * i / len(grid), f"B = {budget:.3g}, k = {k:,}")
        upd = spread_budget(direction, int(k), budget, profile=profile)
        cmp = compare_quantization(base, upd.deltas, list(upd.deltas), quant, transposed=tr,
                                   progress=silent).overall
        predicted = _predicted_fraction(upd, geometry)
        forget = retain = None
        if evaluate:
            after_fp = upd.apply(model, f"{model.name}+Δ")
            # the update's deltas are on the CPU, the base on the model's device
            on_device = {n: d.to(base[n].device) for n, d in upd.deltas.items()}
            after_qbd = model.with_state({**qbase, **{n: qbase[n] + d for n, d in on_device.items()}},
                                         f"{model.name}|{quant.label}+Δ")
            after_q = model.with_state(
                {**qbase, **{n: quantize_dequantize(base[n] + d, quant, transposed=n in tr)
                             for n, d in on_device.items()}},
                f"{model.name}+Δ|{quant.label}")
            variants = {"after_fp": after_fp, "after_qbase_delta": after_qbd, "after_q": after_q}
            acc = {key: {**acc_base[key], **{v: fact_top1(m, sets[key]) for v, m in variants.items()}}
                   for key in acc_base}
            forget = {v: acc["forget"][v] for v in VARIANTS}
            retain = {v: acc["retain"][v] for v in VARIANTS} if "retain" in acc else None
            del after_fp, after_qbd, after_q, variants
        point = SurvivalPoint(
            k=int(k), budget=float(budget), profile=profile, move_rms=budget / math.sqrt(k), moved=cmp.n_changed,
            code_changed_fraction=cmp.changed_flips / cmp.n_changed if cmp.n_changed else 0.0,
            predicted_fraction=predicted, codes_changed=cmp.code_flips, absmax_changes=cmp.absmax_changes,
            update_projection=cmp.update_projection, update_norm_ratio=cmp.update_norm_ratio,
            ratio_median=cmp.ratio_median, forget=forget, retain=retain,
        )
        rows.append(point.to_dict())
    report(1.0, "done")
    return rows


# --------------------------------------------------------------------------- saved runs


def run_point(metrics: UpdateMetrics, label: str | None = None) -> dict[str, Any]:
    """Where a measured update (a saved run's metrics) lands on the tradeoff plot.

    Returns ``label`` (default: the run's method, or ``"run"`` for an update measured
    outside a run), ``k`` (quantized weights the run moved: the comparison's
    ``n_changed``; equals ``params_changed − params_changed_unquantized``),
    ``params_changed`` (every parameter, as in the metrics), ``code_changed_fraction``
    (``moved_code_changed_fraction``), ``budget`` (``‖Δ‖`` over the quantized weights,
    the budget this run spent where quantization can touch it), ``update_projection``,
    ``ptq_gap`` and ``forget`` (the run's five forget accuracies).
    """
    overall = metrics.quantization.get("overall")
    if not isinstance(overall, dict) or not {"n_changed", "delta_sq"} <= set(overall):
        raise WorkbenchError("these metrics have no quantization analysis of the update (n_changed, delta_sq)")
    fraction = metrics.moved_code_changed_fraction
    return {
        "label": label or (metrics.method if isinstance(metrics, RunMetrics) else "run"),
        "k": int(overall["n_changed"]),
        "params_changed": metrics.params_changed,
        "code_changed_fraction": None if fraction is None else float(fraction),
        "budget": math.sqrt(float(overall["delta_sq"])),
        "update_projection": overall.get("update_projection"),
        "ptq_gap": metrics.ptq_gap,
        "forget": metrics.forget.by_variant(),
    }


# --------------------------------------------------------------------------- figure


def tradeoff_figure(
    curve: Sequence[Mapping[str, Any]],
    *,
    bin_widths: torch.Tensor | Sequence[float] | None = None,
    runs: Sequence[Mapping[str, Any]] = (),
    title: str | None = None,
) -> go.Figure:
    """The teaching plot: survival against k (log x), measured and theoretical.

    Top panel: fraction of moved weights whose code changed (measured, markers), the
    theory ``E_w[min(1, B/(√k·w))]`` from ``bin_widths`` (line; all of the curve's
    budgets), the per-weight prediction from the moved weights' own widths (dotted), and
    the projection of the quantized update on Δ (how much of Δ the quantized model
    carries). ``runs`` (from :func:`run_point`) are placed as labelled stars at their
    own ``k``, with the theory at their own budget as an open marker. Bottom panel (when
    the curve has accuracies): forget top-1 of w+Δ, Q(w)+Δ and Q(w+Δ) against k, with
    the base's w and Q(w) as horizontal lines.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not curve:
        raise WorkbenchError("the curve is empty")
    has_acc = curve[0].get("forget") is not None
    fig = make_subplots(rows=2 if has_acc else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("what survives quantization", "forget top-1 after the update")
                        if has_acc else None)
    budgets = sorted({float(p["budget"]) for p in curve})
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd"]
    for bi, b in enumerate(budgets):
        pts = sorted((p for p in curve if float(p["budget"]) == b), key=lambda p: p["k"])
        ks = [p["k"] for p in pts]
        colour = palette[bi % len(palette)]
        tag = f"B={b:.3g}"
        fig.add_trace(go.Scatter(x=ks, y=[p["code_changed_fraction"] for p in pts], mode="markers+lines",
                                 name=f"codes changed, measured ({tag})", marker=dict(color=colour, size=9),
                                 line=dict(color=colour, width=1),
                                 hovertemplate="k=%{x:,}<br>%{y:.3f} of moved weights changed code<extra></extra>"),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=ks, y=[p["predicted_fraction"] for p in pts], mode="lines",
                                 name=f"predicted from the moved weights' bins ({tag})",
                                 line=dict(color=colour, dash="dot", width=1.5)), row=1, col=1)
        if bin_widths is not None:
            dense = sorted({round(10 ** (math.log10(min(ks)) + i * (math.log10(max(ks)) - math.log10(min(ks))) / 60))
                            for i in range(61)})
            fig.add_trace(go.Scatter(x=dense, y=theoretical_survival(dense, b, bin_widths), mode="lines",
                                     name=f"theory E[min(1, B/(√k·w))] ({tag})",
                                     line=dict(color=colour, width=3), opacity=0.45), row=1, col=1)
        proj = [p.get("update_projection") for p in pts]
        fig.add_trace(go.Scatter(x=ks, y=proj, mode="markers", name=f"projection of Q(w+Δ)−Q(w) on Δ ({tag})",
                                 marker=dict(color=colour, symbol="x", size=8),
                                 hovertemplate="k=%{x:,}<br>projection %{y:.3f}<extra></extra>"), row=1, col=1)
        if has_acc:
            for v, dash, lab in (("after_fp", "solid", "w+Δ"), ("after_qbase_delta", "dot", "Q(w)+Δ"),
                                 ("after_q", "dash", "Q(w+Δ)")):
                fig.add_trace(go.Scatter(x=ks, y=[p["forget"][v] for p in pts], mode="lines+markers",
                                         name=f"forget top-1 {lab} ({tag})", line=dict(color=colour, dash=dash),
                                         marker=dict(size=6), showlegend=bi == 0 or len(budgets) > 1),
                              row=2, col=1)
    if has_acc:
        f0 = curve[0]["forget"]
        for v, lab, colour in (("base_fp", "base w", "#555555"), ("base_q", "base Q(w)", "#999999")):
            fig.add_hline(y=f0[v], line_dash="dot", line_color=colour, annotation_text=lab,
                          row=2, col=1)  # type: ignore[arg-type] -- plotly's stubs type row/col as str
    for r in runs:
        if r.get("code_changed_fraction") is None:
            continue
        fig.add_trace(go.Scatter(x=[r["k"]], y=[r["code_changed_fraction"]], mode="markers+text",
                                 name=f"run: {r['label']}", text=[r["label"]], textposition="top center",
                                 marker=dict(symbol="star", size=15, color="#111111"),
                                 hovertemplate=(f"{r['label']}<br>k=%{{x:,}}<br>codes changed %{{y:.3f}}"
                                                f"<br>budget {r['budget']:.3g}<extra></extra>")), row=1, col=1)
        if bin_widths is not None and r["budget"] > 0 and r["k"] > 0:
            fig.add_trace(go.Scatter(x=[r["k"]], y=theoretical_survival([r["k"]], r["budget"], bin_widths),
                                     mode="markers", name=f"theory at {r['label']}'s budget",
                                     marker=dict(symbol="star-open", size=15, color="#111111"), showlegend=False),
                          row=1, col=1)
    fig.update_xaxes(type="log", title="k = number of weights the budget is spread over", row=2 if has_acc else 1)
    fig.update_xaxes(type="log")
    fig.update_yaxes(range=[-0.03, 1.1], title="fraction", row=1, col=1)
    if has_acc:
        fig.update_yaxes(range=[-0.03, 1.05], title="forget top-1", row=2, col=1)
    fig.update_layout(title=title or "Sparsity–permanence: one direction, one budget, spread over k weights",
                      plot_bgcolor="white", height=720 if has_acc else 420, legend=dict(font=dict(size=10)),
                      margin=dict(l=60, r=20, t=70, b=50))
    return fig


__all__ = [
    "PROFILES",
    "SurvivalPoint",
    "crossover_budget",
    "default_ks",
    "direction_size",
    "model_bin_widths",
    "run_point",
    "spread_budget",
    "survival_curve",
    "theoretical_survival",
    "tradeoff_figure",
    "unlearning_direction",
]
