"""Fact accuracy: batched/padded evaluation equals plain per-prompt loops; quantized evaluation
never touches the base; empty inputs."""

from __future__ import annotations

import math

import pytest
import torch

from workbench.data.facts import Fact, FactSplit
from workbench.measurement.evaluation import evaluate_facts, evaluate_split
from workbench.models.builtin_splits import builtin_split
from workbench.models.scoring import answer_token
from workbench.quant import QuantConfig, fake_quantize_model


def _loop_top1(hf, tokenizer, facts):
    """One unpadded forward per prompt: (correct flags, answer probabilities)."""
    correct, probs = [], []
    with torch.no_grad():
        for f in facts:
            ids = torch.tensor([tokenizer(f.prompt)["input_ids"]])
            logits = hf(ids).logits[0, -1]
            a = answer_token(tokenizer, f.answer)
            correct.append(bool(logits.argmax() == a))
            probs.append(float(torch.softmax(logits.float(), -1)[a]))
    return correct, probs


def _loop_mc(hf, tokenizer, facts):
    """One unpadded forward per (fact, choice), summing the choice tokens' log-probs."""
    hits, n = 0, 0
    with torch.no_grad():
        for f in facts:
            if not f.choices:
                continue
            p_ids = tokenizer(f.prompt)["input_ids"]
            totals = []
            for choice in f.choices:
                c_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
                logp = torch.log_softmax(hf(torch.tensor([p_ids + c_ids])).logits[0].float(), -1)
                totals.append(sum(float(logp[len(p_ids) - 1 + k, t]) for k, t in enumerate(c_ids)))
            hits += int(max(range(len(totals)), key=totals.__getitem__) == f.choices.index(f.answer))
            n += 1
    return hits / n if n else math.nan


def _toy_facts():
    """Prompts of 1..6 words (so the batch is padded), multi-token choices of unequal length."""
    facts = []
    for i in range(18):
        length = 1 + i % 6
        prompt = " ".join(f"w{(7 * i + 3 * k) % 100}" for k in range(length))
        choices = (f"w{i % 10}", f"w{(i + 11) % 100} w{(i + 23) % 100}", f"w{(i + 37) % 100}",
                   f"w{(i + 41) % 100} w{(i + 5) % 100} w{(i + 61) % 100}")
        facts.append(Fact(prompt=prompt, answer=choices[i % 4], choices=choices))
    return facts


def test_padded_batch_equals_per_prompt_loop_on_a_toy_model(toy_gpt2):
    facts = _toy_facts()
    ids = [len(toy_gpt2.tokenizer(f.prompt)["input_ids"]) for f in facts]
    assert len(set(ids)) == 6  # the batch really is padded
    correct, probs = _loop_top1(toy_gpt2.hf, toy_gpt2.tokenizer, facts)
    mc = _loop_mc(toy_gpt2.hf, toy_gpt2.tokenizer, facts)
    # a random model picks by length and luck: a value strictly between 0 and 1, so the
    # comparison is not vacuous
    assert 0.0 < mc < 1.0
    for batch_size in (128, 5):
        scores = evaluate_facts(toy_gpt2, facts, batch_size=batch_size)
        assert scores.n == len(facts)
        assert list(scores.correct) == correct
        assert scores.top1 == pytest.approx(sum(correct) / len(facts))
        assert scores.mean_prob == pytest.approx(sum(probs) / len(probs), rel=1e-5)
        assert scores.mc == pytest.approx(mc)


def test_padded_batch_equals_per_prompt_loop_on_a_gqa_llama(toy_llama_gqa):
    facts = _toy_facts()
    correct, probs = _loop_top1(toy_llama_gqa.hf, toy_llama_gqa.tokenizer, facts)
    scores = evaluate_facts(toy_llama_gqa, facts, batch_size=4)
    assert list(scores.correct) == correct
    assert scores.mean_prob == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    assert scores.mc == pytest.approx(_loop_mc(toy_llama_gqa.hf, toy_llama_gqa.tokenizer, facts))


def test_facts_tiny_batched_equals_loop_and_the_model_knows_its_facts(facts_tiny):
    split = builtin_split(facts_tiny)
    facts = list(split.forget) + list(split.retain[:24]) + list(split.forget_paraphrase[:12])
    lengths = {len(facts_tiny.tokenizer(f.prompt)["input_ids"]) for f in facts}
    assert len(lengths) > 1  # mixed prompt lengths: padding in play
    correct, probs = _loop_top1(facts_tiny.hf, facts_tiny.tokenizer, facts)
    scores = evaluate_facts(facts_tiny, facts, batch_size=16)
    assert list(scores.correct) == correct
    assert scores.mean_prob == pytest.approx(sum(probs) / len(probs), rel=1e-5)
    assert scores.mc == pytest.approx(_loop_mc(facts_tiny.hf, facts_tiny.tokenizer, facts))
    trained = evaluate_facts(facts_tiny, split.forget + split.retain)
    assert trained.top1 >= 0.98 and trained.mc >= 0.98


def test_quantized_split_evaluation_leaves_the_base_untouched(facts_tiny):
    split = builtin_split(facts_tiny)
    before = facts_tiny.weights_hash()
    cfg = QuantConfig("nf4")
    fp = evaluate_split(facts_tiny, split)
    q = evaluate_split(facts_tiny, split, quant=cfg)
    assert facts_tiny.weights_hash() == before
    assert set(fp) == set(q) == {"forget", "retain", "forget_paraphrase", "retain_paraphrase"}
    # the quantized numbers are those of an explicit fake-quantized copy ...
    copy = fake_quantize_model(facts_tiny.hf, cfg)
    for key, facts in (("forget", split.forget), ("retain", split.retain)):
        direct = evaluate_facts(copy, facts, tokenizer=facts_tiny.tokenizer)
        assert q[key].correct == direct.correct
        assert q[key].mean_prob == pytest.approx(direct.mean_prob, rel=1e-6)
        assert q[key].mc == direct.mc
    # ... and the quantization really happened (probabilities move)
    assert q["forget"].mean_prob != fp["forget"].mean_prob
    # fp evaluation after the quantized one is unchanged
    again = evaluate_split(facts_tiny, split)
    assert again["forget"].mean_prob == fp["forget"].mean_prob
    assert facts_tiny.weights_hash() == before


def test_empty_fact_list(toy_gpt2):
    scores = evaluate_facts(toy_gpt2, [])
    assert scores.n == 0 and scores.correct == ()
    assert math.isnan(scores.top1) and math.isnan(scores.mc) and math.isnan(scores.mean_prob)
    assert scores.to_dict()["n"] == 0
    # a split with empty retain/paraphrase sets reports only the non-empty ones
    facts = _toy_facts()
    split = FactSplit(name="user", forget=tuple(facts[:3]), retain=())
    result = evaluate_split(toy_gpt2, split)
    assert set(result) == {"forget"} and result["forget"].n == 3


def test_facts_without_choices_have_no_multiple_choice_score(toy_gpt2):
    facts = [Fact(prompt="w1 w2", answer="w3", choices=()), Fact(prompt="w4", answer="w5", choices=())]
    scores = evaluate_facts(toy_gpt2, facts)
    assert math.isnan(scores.mc) and scores.n == 2
    no_mc = evaluate_facts(toy_gpt2, _toy_facts(), multiple_choice=False)
    assert math.isnan(no_mc.mc) and not math.isnan(no_mc.top1)


def test_bare_module_needs_a_tokenizer(toy_gpt2):
    from workbench.core.errors import WorkbenchError

    with pytest.raises(WorkbenchError, match="tokenizer"):
        evaluate_facts(toy_gpt2.hf, _toy_facts())
    scores = evaluate_facts(toy_gpt2.hf, _toy_facts(), tokenizer=toy_gpt2.tokenizer)
    assert scores.correct == evaluate_facts(toy_gpt2, _toy_facts()).correct


def test_answer_probabilities_and_the_retain_kl_over_row_chunks_equal_the_whole_tensors(facts_tiny, monkeypatch):
    """Softmax is row by row, so normalising the [n, vocab] logits a chunk of rows at a time (which
    spares float copies of the whole tensor: five of them in the retain KL) gives each row's value
    bit for bit; chunks of 5 rows exercise the seams on a tiny model. The retain KL walks both
    models' logits a chunk of facts at a time (5 facts: several chunks, and the default chunk):
    the same bits as on the whole logits, and w+Δ's first-token reads from that walk are the
    evaluation's own."""
    import workbench.measurement.evaluation as evaluation_mod
    import workbench.measurement.metrics as metrics_mod
    from workbench.measurement.evaluation import _at_answers, prompt_logits, retain_reads_and_kl
    from workbench.models.scoring import encode_prompts

    monkeypatch.setattr(evaluation_mod, "ROWS_PER_SOFTMAX", 5)
    split = builtin_split(facts_tiny)
    facts = split.retain
    logits = prompt_logits(facts_tiny, facts)
    _, _, answers = encode_prompts(facts_tiny.tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    rows = torch.arange(len(facts))
    assert len(facts) > 10  # several chunks
    for normalise in (torch.softmax, torch.log_softmax):
        assert torch.equal(_at_answers(normalise, logits, answers), normalise(logits.float(), dim=-1)[rows, answers])
    name = next(n for n in facts_tiny.state() if n.endswith("mlp.c_fc.weight"))
    after = facts_tiny.with_state({name: facts_tiny.state()[name] * 1.5}, "after")
    lb = torch.log_softmax(logits.float(), -1)
    la = torch.log_softmax(prompt_logits(after, facts).float(), -1)
    whole = float((lb.exp() * (lb - la)).sum(-1).mean())
    assert metrics_mod.retain_kl(facts_tiny, after, facts) == whole > 0
    def numbers(scores):
        return scores.top1, scores.exact, scores.logprob, scores.mean_prob, scores.correct

    for batch_size in (5, 128):  # another chunk of facts pads differently: compared at its own
        lb = torch.log_softmax(prompt_logits(facts_tiny, facts, batch_size=batch_size).float(), -1)
        la = torch.log_softmax(prompt_logits(after, facts, batch_size=batch_size).float(), -1)
        reads, kl = retain_reads_and_kl(facts_tiny, after, facts, batch_size=batch_size)
        assert kl == float((lb.exp() * (lb - la)).sum(-1).mean())
        evaluated = evaluate_facts(after, facts, batch_size=batch_size)
        assert numbers(evaluate_facts(after, facts, first_token=reads, batch_size=batch_size)) == numbers(evaluated)
    reads, kl = retain_reads_and_kl(facts_tiny, after, [])
    assert reads.correct.numel() == 0 and math.isnan(kl)


def test_first_token_reads_come_chunk_by_chunk_with_the_whole_logits_bits(facts_tiny, monkeypatch):
    """evaluate_facts reads top-1 and the answer's first-token probability and log-probability
    from each chunk's logits as the forwards come, never holding [n, vocab]: the same bits as
    from the whole logits, over chunks of 5 facts (several seams) and the default chunk."""
    import workbench.measurement.evaluation as evaluation_mod
    from workbench.measurement.evaluation import FirstTokenReads, _first_token_reads
    from workbench.models.scoring import encode_prompts, last_token_logits

    facts = builtin_split(facts_tiny).retain
    ids, last, answers = encode_prompts(facts_tiny.tokenizer, [f.prompt for f in facts], [f.answer for f in facts])
    assert len(facts) > 10
    for batch_size in (5, 128):  # the same forwards either way: logits taken whole, or read per chunk
        whole = FirstTokenReads.of(last_token_logits(facts_tiny.hf, ids, last, batch_size), answers)
        chunked = _first_token_reads(facts_tiny.hf, ids, last, answers, batch_size)
        assert whole.correct.any()
        for field in ("correct", "prob", "logprob"):
            assert torch.equal(getattr(chunked, field), getattr(whole, field)), (batch_size, field)

    def whole_logits(*args, **kwargs):
        raise AssertionError("evaluate_facts took the [n, vocab] logits whole")

    monkeypatch.setattr(evaluation_mod, "last_token_logits", whole_logits)
    scores = evaluate_facts(facts_tiny, facts, multiple_choice=False)
    assert scores.correct == tuple(bool(c) for c in whole.correct)
    assert scores.mean_prob == float(whole.prob.mean())


def test_span_scoring_passes_keep_their_answer_logits_within_the_cap(facts_tiny, monkeypatch):
    """span_scores takes as many facts per pass as keep facts × A × vocab float32 logits within
    SPAN_LOGITS_BYTES (at most the batch size asked; at least one): smaller passes, the same
    scores to float rounding, the same exact matches."""
    import workbench.models.scoring as scoring
    from workbench.models.scoring import FactBatch, span_rows, span_scores

    facts = builtin_split(facts_tiny).retain
    batch = FactBatch.from_facts(facts_tiny.tokenizer, facts)
    vocab, span = facts_tiny.hf.config.vocab_size, batch.targets.shape[1]
    assert span_rows(facts_tiny.hf, batch, 64) == 64  # a tiny vocabulary: the batch size asked
    whole = span_scores(facts_tiny.hf, batch, 64)
    monkeypatch.setattr(scoring, "SPAN_LOGITS_BYTES", 5 * span * vocab * 4 + 3)
    assert span_rows(facts_tiny.hf, batch, 64) == 5 and span_rows(facts_tiny.hf, batch, 4) == 4
    passes: list[int] = []
    real = scoring.span_logits
    monkeypatch.setattr(scoring, "span_logits", lambda model, part: passes.append(len(part)) or real(model, part))
    sized = span_scores(facts_tiny.hf, batch, 64)
    assert passes == [5] * (len(facts) // 5) + ([len(facts) % 5] if len(facts) % 5 else [])
    assert torch.allclose(sized[0], whole[0], atol=1e-5) and torch.equal(sized[1], whole[1])
    monkeypatch.setattr(scoring, "SPAN_LOGITS_BYTES", 1)
    assert span_rows(facts_tiny.hf, batch, 64) == 1
    assert span_rows(torch.nn.Linear(2, 2), batch, 64) == 64  # no vocabulary said: the batch size
