"""Robustness probes for any update (docs/SCIENCE.md §9), each in full precision and quantized.

- :func:`paraphrase_probe` — forget/retain top-1 on the *held-out template* (prompts never
  trained on, same facts): did the method erase the fact or one phrasing of it?
- :func:`relearning_attack` — fine-tune the unlearned model for a few steps on one half
  of the forget set and measure the *other* half: knowledge that was only suppressed comes
  back for facts the attacker never showed it. The relearning runs in full precision on
  w+Δ; "quantized" numbers quantize the model before and after relearning.
- :func:`membership_inference` — loss-based MIA: the score of a fact is ``−NLL`` of its
  answer (summed over its tokens); AUC = P(score(member) > score(non-member)) (ties count ½, the Mann–Whitney
  statistic). Members = the forget facts. Non-members = **counterfactual twins**: each
  forget prompt paired with a wrong answer (its first distractor choice, else another
  forget fact's answer) — a (prompt, answer) pair no model was ever trained on, in exactly
  the members' format and prompt distribution. (Retain paraphrases, the obvious
  alternative, are facts every model *knows*: the retrain oracle then separates them from
  the unknown forget facts perfectly, AUC 0, and PrivLeak is undefined.) PrivLeak (MUSE) =
  ``(AUC_unlearned − AUC_oracle) / AUC_oracle × 100`` against the retrain oracle (trained
  without the forget domain, so near AUC ½): 0 is ideal, positive = under-unlearning (the
  forget facts still look like members), negative = over-unlearning (the true answers are
  pushed below wrong ones, itself a tell).

Every probe builds new models; the base and the update are never modified.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress, Steps, silent
from workbench.data.facts import Fact, FactSplit
from workbench.measurement.evaluation import fact_top1
from workbench.models.loaded import LoadedModel, hf_module
from workbench.models.scoring import FactBatch, fact_logprobs, span_logits
from workbench.models.update import Update
from workbench.quant import QuantConfig, quantizable_parameters, quantized_copy
from workbench.unlearning.losses import nll
from workbench.unlearning.registry import default_lr


def _quantized(model: LoadedModel | torch.nn.Module, quant: QuantConfig) -> torch.nn.Module:

    return quantized_copy(hf_module(model), quant, progress=silent)


def paraphrase_probe(model: LoadedModel, split: FactSplit, update: Update,
                     quant: QuantConfig) -> dict[str, dict[str, float]]:
    """Top-1 on the held-out-template facts: ``{set: {base_fp, base_q, after_fp, after_q}}``."""
    if not split.forget_paraphrase:
        raise WorkbenchError(f"split {split.name!r} has no paraphrased (held-out template) forget facts")
    after = update.apply(model)
    variants = {"base_fp": model.hf, "base_q": _quantized(model, quant), "after_fp": after.hf,
                "after_q": _quantized(after, quant)}
    out: dict[str, dict[str, float]] = {}
    for key, facts in (("forget_paraphrase", split.forget_paraphrase), ("retain_paraphrase", split.retain_paraphrase)):
        if facts:
            out[key] = {v: fact_top1(m, facts, model.tokenizer) for v, m in variants.items()}
    return out


def forget_halves(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded split of ``range(n)`` into the attacker's half (first) and the held-out half."""
    if n < 2:
        raise WorkbenchError(f"the relearning attack needs at least 2 forget facts, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[: n // 2].sort().values, perm[n // 2 :].sort().values


def relearning_attack(
    model: LoadedModel,
    split: FactSplit,
    update: Update,
    *,
    quant: QuantConfig,
    steps: int = 10,
    lr: float | None = None,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fine-tune w+Δ on half the forget set (NLL, Adam, every quantized weight) and measure the other half.

    Returns top-1 on the held-out half for the base, the unlearned model and the relearned
    model, in full precision and quantized, plus ``recovery`` = relearned − unlearned.
    """
    if steps < 1:
        raise WorkbenchError(f"relearning steps must be >= 1, got {steps}")
    lr = lr or default_lr(model)
    if not lr > 0:
        raise WorkbenchError(f"relearning lr must be > 0, got {lr}")
    train_idx, eval_idx = forget_halves(len(split.forget), seed)
    train = [split.forget[i] for i in train_idx.tolist()]
    held = [split.forget[i] for i in eval_idx.tolist()]
    after = update.apply(model, f"{model.name}+Δ")
    # trained in float32 whatever the storage dtype, as the gradient baselines are (Adam on 16-bit
    # weights loses its small steps, and in float16 its second moments, to NaN), then stored
    work = copy.deepcopy(after.hf).float().train()
    names = set(quantizable_parameters(work, QuantConfig("nf4")))
    params = [p for n, p in work.named_parameters() if n in names]
    for n, p in work.named_parameters():
        p.requires_grad_(n in names)
    opt = torch.optim.Adam(params, lr=lr)
    batch = FactBatch.from_facts(model.tokenizer, train)
    with Steps(steps, "relearning attack", progress) as bar:
        for step in range(steps):
            loss = nll(span_logits(work, batch), batch.targets, batch.mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.step(f"relearning step {step + 1}: loss {float(loss.detach()):.3f}")
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    relearned = after.with_state({n: p.detach() for n, p in work.named_parameters()}, f"{model.name}+Δ+relearn")
    tok = model.tokenizer
    fp = {"base": fact_top1(model, held, tok), "unlearned": fact_top1(after, held, tok),
          "relearned": fact_top1(relearned, held, tok)}
    q = {"base": fact_top1(_quantized(model, quant), held, tok),
         "unlearned": fact_top1(_quantized(after, quant), held, tok),
         "relearned": fact_top1(_quantized(relearned, quant), held, tok)}
    return {
        "steps": steps, "lr": lr, "seed": seed, "n_train": len(train), "n_eval": len(held),
        "train_top1_after_relearn": fact_top1(relearned, train, tok),
        "fp": {**fp, "recovery": fp["relearned"] - fp["unlearned"]},
        "quantized": {**q, "recovery": q["relearned"] - q["unlearned"]},
    }


def answer_losses(model: LoadedModel | torch.nn.Module, facts: Sequence[Fact], tokenizer: Any) -> torch.Tensor:
    """``[n]`` −log p(answer | prompt) per fact (summed over a multi-token answer's tokens)."""

    return -fact_logprobs(hf_module(model), tokenizer, facts)


def auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor) -> float:
    """P(member score > non-member score), ties ½ (Mann–Whitney U / (n_m · n_n))."""
    if member_scores.numel() == 0 or nonmember_scores.numel() == 0:
        raise WorkbenchError("AUC needs at least one member and one non-member")
    m = member_scores.double()[:, None]
    n = nonmember_scores.double()[None, :]
    return float(((m > n).double() + 0.5 * (m == n).double()).mean())


def privleak(auc_unlearned: float, auc_oracle: float) -> float | None:
    """MUSE's PrivLeak in percent: (AUC − AUC_oracle) / AUC_oracle × 100 (None if AUC_oracle = 0)."""
    if auc_oracle <= 0:
        return None
    return (auc_unlearned - auc_oracle) / auc_oracle * 100.0


def counterfactual_twins(facts: Sequence[Fact]) -> list[Fact]:
    """Each fact's prompt with a wrong answer: its first choice that is not the answer, else the
    next fact's (cyclically) answer that differs. Never trained on by any model."""
    from dataclasses import replace

    answers = [f.answer for f in facts]
    twins = []
    for i, f in enumerate(facts):
        wrong = next((c for c in f.choices if c != f.answer), None)
        if wrong is None:
            wrong = next((answers[(i + k) % len(facts)] for k in range(1, len(facts))
                          if answers[(i + k) % len(facts)] != f.answer), None)
        if wrong is None:
            raise WorkbenchError("membership inference needs at least two different answers among the forget facts")
        twins.append(replace(f, answer=wrong, choices=()))
    return twins


def membership_inference(
    model: LoadedModel, update: Update, split: FactSplit, oracle: LoadedModel, *, quant: QuantConfig
) -> dict[str, Any]:
    """Loss-based MIA AUC (forget facts vs their counterfactual twins) and PrivLeak against the
    oracle, full precision and quantized (each model against the oracle in the same precision)."""
    if oracle.tokenizer.get_vocab() != model.tokenizer.get_vocab():
        raise WorkbenchError(f"oracle {oracle.name!r} does not share the model's tokenizer")
    tok = model.tokenizer
    members = list(split.forget)
    non_members = counterfactual_twins(members)
    after = update.apply(model)

    def score(m: LoadedModel | torch.nn.Module) -> float:
        return auc(-answer_losses(m, members, tok), -answer_losses(m, non_members, tok))

    out: dict[str, Any] = {"members": "forget", "non_members": "counterfactual twins of the forget facts",
                           "n_members": len(members), "n_non_members": len(non_members)}
    for label, wrap in (("fp", lambda m: m), ("quantized", lambda m: _quantized(m, quant))):
        a_base, a_after, a_oracle = score(wrap(model)), score(wrap(after)), score(wrap(oracle))
        out[label] = {"auc_base": a_base, "auc": a_after, "auc_oracle": a_oracle,
                      "privleak": privleak(a_after, a_oracle), "privleak_base": privleak(a_base, a_oracle)}
    return out
