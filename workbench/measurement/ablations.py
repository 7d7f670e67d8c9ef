"""Which MANSU ablation would have passed where the full method failed.

After a MANSU run fails a property, the useful next question is whether one of its four
components is what broke it: MANSU is re-run with each component switched off alone (the
same split, quantizer and circuit), and each ablated run's report card is read against the
full run's. This module does the reading; running the ablations is the faces' job
(:meth:`workbench.faces.session.Session.try_ablations`, ``workbench ablate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workbench.measurement.results import Property, ReportCard

PROPERTY_NAMES = {
    "forgetting": "forgetting",
    "retain": "retain",
    "ptq": "PTQ gap",
    "structural": "structural erasure",
}


@dataclass(frozen=True)
class AblationOutcome:
    """One ablated run read against the full run.

    Attributes:
        ablation: the component switched off (``"floor"``, ``"circuit"`` …).
        card: the ablated run's report card.
        fixes: properties the full run failed and this run passes.
        still_failing: properties the full run failed and this run fails too.
        loses: properties the full run passed and this run fails.
    """

    ablation: str
    card: ReportCard
    fixes: tuple[str, ...]
    still_failing: tuple[str, ...]
    loses: tuple[str, ...]

    @property
    def would_pass(self) -> bool:
        """It passes everything the full run failed and loses nothing the full run passed."""
        return bool(self.fixes) and not self.still_failing and not self.loses


def read_ablations(full: ReportCard, ablated: Sequence[tuple[str, ReportCard]]) -> list[AblationOutcome]:
    """Each ablated card against the full run's (properties not measured on either side are skipped)."""
    outcomes = []
    for name, card in ablated:
        fixes, still, loses = [], [], []
        for prop, before in full.items():
            after = getattr(card, prop)
            if before.passed is None or after.passed is None:
                continue
            if before.passed is False:
                (fixes if after.passed else still).append(prop)
            elif after.passed is False:
                loses.append(prop)
        outcomes.append(AblationOutcome(name, card, tuple(fixes), tuple(still), tuple(loses)))
    return outcomes


def _margins(card: ReportCard, props: Sequence[str]) -> str:
    parts = []
    for prop in props:
        p: Property = getattr(card, prop)
        parts.append(f"{PROPERTY_NAMES[prop]} {p.margin:+.3f}" if p.margin is not None else PROPERTY_NAMES[prop])
    return ", ".join(parts)


def _names(props: Sequence[str]) -> str:
    return ", ".join(PROPERTY_NAMES[p] for p in props)


def ablation_lines(full: ReportCard, outcomes: Sequence[AblationOutcome]) -> list[str]:
    """In words: the ablations that would have passed (first), then what each one changed.

    Margins are printed as on the report card (positive: passes by that much).
    """
    failed = [name for name, p in full.items() if p.passed is False]
    if not failed:
        return ["the full method passes every measured property; no ablation is needed"]
    winners = [o for o in outcomes if o.would_pass]
    if winners:
        head = [f"MANSU without its {o.ablation} would have passed: it passes {_names(o.fixes)} "
                f"({_margins(o.card, o.fixes)}) and keeps every property the full run passed" for o in winners]
    else:
        head = [f"no ablation passes everything the full run failed ({_names(failed)})"]
    detail = []
    for o in outcomes:
        parts = [f"fixes {_names(o.fixes)} ({_margins(o.card, o.fixes)})" if o.fixes else "fixes nothing"]
        if o.still_failing:
            parts.append(f"still fails {_names(o.still_failing)} ({_margins(o.card, o.still_failing)})")
        if o.loses:
            parts.append(f"loses {_names(o.loses)} ({_margins(o.card, o.loses)})")
        detail.append(f"without the {o.ablation}: " + "; ".join(parts))
    return head + detail
