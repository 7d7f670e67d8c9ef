"""A run on facts the base model does not know takes no step: every step would move weights
(and cost retain) for a forgetting property that already holds. Checked for the shared loop
(GradDiff), for MANSU (which also asks the quantized base) and in the report's words."""

from __future__ import annotations

import torch

from workbench.core.components import head, mlp
from workbench.data.facts import Fact, FactSplit
from workbench.experiments.flow import run_unlearning
from workbench.measurement.metrics import summary_lines
from workbench.models.scoring import answer_logits
from workbench.quant import QuantConfig
from workbench.unlearning.batches import Batches
from workbench.unlearning.registry import unlearn
from workbench.unlearning.result import ALREADY_AT_TARGET, already_at_target
from workbench.unlearning.task import OptimConfig, StopRule


def _unknown_forget(model, split: FactSplit) -> FactSplit:
    """The split with its forget facts' answers swapped for tokens the model does not predict there."""
    batches = Batches.build(model, split)
    with torch.no_grad():
        logits = answer_logits(model.hf, batches.forget)
    wrong = logits.argmin(-1)  # the least likely token at each answer position
    facts = tuple(Fact(f.prompt, model.tokenizer.decode([int(t)]).strip() or f.answer, ())
                  for f, t in zip(split.forget, wrong.tolist()))
    return FactSplit(split.name + "-unknown", forget=facts, retain=split.retain)


def test_the_check_asks_both_precisions(facts_tiny, split):
    batches = Batches.build(facts_tiny, split)
    assert not already_at_target(batches, facts_tiny.hf, 0.1)  # facts-tiny knows its forget set
    assert not already_at_target(batches, facts_tiny.hf, None)  # no target: never "already"
    assert already_at_target(batches, facts_tiny.hf, 1.0)
    unknown = Batches.build(facts_tiny, _unknown_forget(facts_tiny, split))
    assert already_at_target(unknown, facts_tiny.hf, 0.1)
    # the quantized copy is asked too: a full-precision model that misses the known set (the
    # base with its logits negated) paired with a quantized one that still answers it (the base)
    assert already_at_target(batches, _Negated(facts_tiny.hf), 0.1)
    assert not already_at_target(batches, _Negated(facts_tiny.hf), 0.1, quantized=facts_tiny.hf)


class _Negated(torch.nn.Module):
    """``inner`` with its logits negated: its top-1 is the token ``inner`` finds least likely."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kw):
        out = self.inner(*args, **kw)
        out.logits = -out.logits
        return out


def test_graddiff_and_mansu_take_no_step_and_leave_the_base(facts_tiny, split):
    unknown = _unknown_forget(facts_tiny, split)
    before = {n: p.clone() for n, p in facts_tiny.hf.named_parameters()}
    for method in ("graddiff", "mansu"):
        result = unlearn(facts_tiny, unknown, method=method, optim=OptimConfig(lr=1e-3), circuit=[head(0, 1), mlp(1)],
                         stop=StopRule(max_steps=3, forget_target=0.1))
        assert result.stopped == ALREADY_AT_TARGET and result.steps == 0, method
        assert result.update.deltas == {} and result.update.nnz() == 0
    assert all(torch.equal(p, before[n]) for n, p in facts_tiny.hf.named_parameters())
    # without a target the loop runs its budget on the same facts
    free = unlearn(facts_tiny, unknown, method="graddiff", optim=OptimConfig(lr=1e-3),
                   stop=StopRule(max_steps=3, forget_target=None))
    assert free.steps == 3 and free.update.nnz() > 0


def test_the_report_says_nothing_was_unlearned(facts_tiny, split):
    _, metrics, _ = run_unlearning(facts_tiny, _unknown_forget(facts_tiny, split), method="graddiff",
                                   quant=QuantConfig("nf4"), save=False, measure_cad=False)
    assert metrics.stopped == ALREADY_AT_TARGET and metrics.params_changed == 0
    first = summary_lines(metrics)[0]
    assert first.startswith("nothing was unlearned: the base model already misses the forget set")
    assert f"{metrics.forget.base_fp:.3f} fp" in first
