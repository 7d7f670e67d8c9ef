"""Splitting a fact set into forget and retain by domain.
"""

from __future__ import annotations

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit


def split_by_domain(facts: tuple[Fact, ...], forget_domain: str, *, name: str) -> FactSplit:
    """Forget = facts of ``forget_domain`` (a domain, or a relation matching every region)."""

    def in_forget(f: Fact) -> bool:
        return f.domain == forget_domain or f.relation == forget_domain

    domains = sorted({f.domain for f in facts})
    if not any(in_forget(f) for f in facts):
        raise WorkbenchError(f"no facts in domain {forget_domain!r}; domains are: {', '.join(domains)}")
    return FactSplit(
        name=f"{name}:{forget_domain}",
        forget=tuple(f for f in facts if in_forget(f) and not f.paraphrase),
        retain=tuple(f for f in facts if not in_forget(f) and not f.paraphrase),
        forget_paraphrase=tuple(f for f in facts if in_forget(f) and f.paraphrase),
        retain_paraphrase=tuple(f for f in facts if not in_forget(f) and f.paraphrase),
    )
