"""Benchmark-shaped files (multiple choice, question answering, raw text; JSONL, CSV, Parquet)
and their metrics against direct computations (docs/SCIENCE.md §9)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from scipy.stats import ks_2samp

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.data.files import QA_PROMPT, load_fact_file, save_fact_file
from workbench.measurement import benchmarks as B

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


# --- files: shapes, detection, forcing, Parquet -------------------------------------------------


def test_shapes_are_told_from_the_fields(tmp_path):
    p = _write(tmp_path, "mixed.jsonl", "\n".join(json.dumps(r) for r in [
        {"prompt": "A is", "answer": "x y"},
        {"question": "Which?", "choices": ["a", "b c"], "answer": 1},
        {"question": "Who wrote it?", "answer": "Someone else entirely", "paraphrased_answer": "Another person",
         "perturbed_answer": ["Nobody", "Everyone at once"]},
        {"text": "one two three four five"},
    ]) + "\n")
    cloze, mc, qa, text = load_fact_file(p)
    assert (cloze.kind, cloze.answer) == ("cloze", "x y")
    assert (mc.kind, mc.prompt, mc.answer, mc.choices) == ("mc", "Which?", "b c", ("a", "b c"))
    assert qa.kind == "qa" and qa.prompt == "Question: Who wrote it?\nAnswer:"
    assert QA_PROMPT.format(question="Who wrote it?") == qa.prompt
    assert qa.answer == "Someone else entirely" and qa.paraphrased_answers == ("Another person",)
    assert qa.perturbed_answers == ("Nobody", "Everyone at once")
    assert (text.kind, text.prompt, text.answer) == ("text", "one two", "three four five")
    # the cloze rows save_fact_file writes read back to equal facts, whatever the shape
    assert load_fact_file(save_fact_file((cloze, mc, qa, text), tmp_path / "back.jsonl")) == (cloze, mc, qa, text)


def test_unknown_shape_and_forced_format_errors(tmp_path):
    p = _write(tmp_path, "odd.jsonl", '{"query": "Q?", "response": "R"}\n')
    with pytest.raises(WorkbenchError, match=r"odd\.jsonl, line 1: .*shapes.*fields query, response.*--format"):
        load_fact_file(p)
    qa = _write(tmp_path, "qa.jsonl", '{"question": "Q?", "answer": "yes it is"}\n')
    assert load_fact_file(qa)[0].kind == "qa"
    with pytest.raises(WorkbenchError, match=r"qa\.jsonl, line 1: missing field 'choices'"):
        load_fact_file(qa, format="mc")
    with pytest.raises(WorkbenchError, match=r"line 1: missing field 'text'"):
        load_fact_file(qa, format="text")
    with pytest.raises(WorkbenchError, match="unknown fact file format 'tofu'"):
        load_fact_file(qa, format="tofu")
    short = _write(tmp_path, "short.jsonl", '{"text": "alone"}\n')
    with pytest.raises(WorkbenchError, match="at least two words"):
        load_fact_file(short)
    bad_list = _write(tmp_path, "bad.jsonl", '{"question": "Q?", "answer": "a", "perturbed_answer": [1]}\n')
    with pytest.raises(WorkbenchError, match=r"line 1: perturbed_answer item 0 must be text"):
        load_fact_file(bad_list)


def test_csv_and_parquet_as_datasets_writes_it(tmp_path):
    rows = [{"question": "Who?", "answer": "the first one", "paraphrased_answer": "one who was first",
             "perturbed_answer": ["the last one", "a middle one"]},
            {"question": "Where?", "answer": "over there", "paraphrased_answer": None, "perturbed_answer": None}]
    from datasets import Dataset

    path = tmp_path / "qa.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    facts = load_fact_file(path)
    assert [f.answer for f in facts] == ["the first one", "over there"]
    assert facts[0].perturbed_answers == ("the last one", "a middle one") and facts[1].perturbed_answers == ()
    csv = _write(tmp_path, "qa.csv", "question,answer,perturbed_answer\nWho?,the first one,the last one|a middle one\n")
    assert load_fact_file(csv)[0] == Fact(QA_PROMPT.format(question="Who?"), "the first one", (), kind="qa",
                                          perturbed_answers=("the last one", "a middle one"))
    text_csv = _write(tmp_path, "t.csv", 'text\n"a b c d"\n')
    assert load_fact_file(text_csv)[0].answer == "c d"
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(WorkbenchError, match=r"broken\.parquet: not a readable Parquet file"):
        load_fact_file(tmp_path / "broken.parquet")


def test_the_example_files_load_in_every_format():
    for shape in ("mc", "qa", "text"):
        for side in ("forget", "retain"):
            facts = load_fact_file(EXAMPLES / f"{shape}_{side}.jsonl")
            assert facts and {f.kind for f in facts} == {shape}
    assert load_fact_file(EXAMPLES / "mc_forget.csv") == load_fact_file(EXAMPLES / "mc_forget.jsonl")
    assert load_fact_file(EXAMPLES / "qa_forget.parquet") == load_fact_file(EXAMPLES / "qa_forget.jsonl")
    qa = load_fact_file(EXAMPLES / "qa_forget.jsonl")
    assert all(len(f.answer.split()) > 1 and f.paraphrased_answers and len(f.perturbed_answers) == 3 for f in qa)
    capitals = load_fact_file(EXAMPLES / "capitals_mc_forget.jsonl")
    assert len(capitals) == 46 and {f.kind for f in capitals} == {"mc"}
    assert all(f.answer in f.choices and len(set(f.choices)) == 4 for f in capitals)
    assert any(len(f.answer.split()) > 1 for f in capitals)  # "Andorra la Vella": several tokens


# --- ROUGE-L --------------------------------------------------------------------------------------


def test_rouge_l_recall_on_hand_examples():
    assert B.lcs_length(["a", "b", "c", "d"], ["a", "c", "d"]) == 3
    assert B.lcs_length(["x", "y"], ["a", "b"]) == 0
    # reference "the cat sat on the mat" (6 words); prediction shares "the cat on the mat" in order (5)
    assert B.rouge_l_recall("The cat, it sat not; on the mat!", "the cat sat on the mat") == pytest.approx(1.0)
    assert B.rouge_l_recall("the cat on the mat", "the cat sat on the mat") == pytest.approx(5 / 6)
    assert B.rouge_l_recall("mat the on", "the cat sat on the mat") == pytest.approx(2 / 6)
    assert B.rouge_l_recall("anything", "") == 0.0
    assert B.rouge_tokens("Hello, World-42!") == ["hello", "world", "42"]


# --- multiple choice: lm-evaluation-harness scoring against a direct computation ----------------


def _loglik(hf, tok, context: str, continuation: str) -> float:
    c = tok(context)["input_ids"]
    x = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([c + x])).logits[0].double(), -1)
    return sum(float(logp[len(c) - 1 + k, t]) for k, t in enumerate(x))


def _mc_facts() -> list[Fact]:
    out = []
    for i in range(12):
        choices = (f"w{i}", f"w{(i + 11) % 100} w{(i + 23) % 100}", f"w{(i + 37) % 100}",
                   f"w{(i + 41) % 100} w{(i + 5) % 100} w{(i + 61) % 100}")
        out.append(Fact(f"w{(3 * i) % 100} w{(7 * i) % 100}", choices[i % 4], choices, kind="mc"))
    return out


def test_mc_scores_equal_a_direct_lm_eval_computation(toy_gpt2):
    hf, tok = toy_gpt2.hf, toy_gpt2.tokenizer
    facts = _mc_facts()
    hits = {"acc": 0, "acc_norm": 0, "letter": 0}
    for f in facts:
        right = f.choices.index(f.answer)
        ll = [_loglik(hf, tok, f"Question: {f.prompt}\nAnswer:", " " + c) for c in f.choices]
        norm = [v / len(c.encode()) for v, c in zip(ll, f.choices)]
        lettered = f.prompt + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", f.choices)) + "\nAnswer:"
        letters = [_loglik(hf, tok, lettered, " " + L) for L in "ABCD"]
        for key, scores in (("acc", ll), ("acc_norm", norm), ("letter", letters)):
            hits[key] += max(range(4), key=scores.__getitem__) == right
    got = B.mc_scores(toy_gpt2, facts)
    assert got.n == 12
    assert (got.acc, got.acc_norm, got.letter_acc) == pytest.approx(
        (hits["acc"] / 12, hits["acc_norm"] / 12, hits["letter"] / 12))
    # not vacuous: a random model is neither always right nor always wrong
    assert 0 < got.acc < 1
    assert B.letter_prompt("Q?", ["x", "y"]) == "Q?\nA. x\nB. y\nAnswer:"


# --- question answering: truth ratio, ROUGE-L of greedy answers, forget quality ------------------


def _qa_facts() -> list[Fact]:
    return [Fact(QA_PROMPT.format(question=f"w{i} w{i + 1}"), f"w{i + 2} w{i + 3}", (), kind="qa",
                 paraphrased_answers=(f"w{i + 4} w{i + 2} w{i + 3}",),
                 perturbed_answers=(f"w{i + 5}", f"w{i + 6} w{i + 7}", f"w{i + 8} w{i + 9} w{i + 1}"))
            for i in range(0, 40, 5)]


def test_truth_ratio_is_the_length_normalised_geometric_mean_ratio(toy_gpt2):
    hf, tok = toy_gpt2.hf, toy_gpt2.tokenizer
    facts = _qa_facts()
    want = []
    def norm_lp(prompt: str, a: str) -> float:
        return _loglik(hf, tok, prompt, " " + a) / len(tok(" " + a, add_special_tokens=False)["input_ids"])

    for f in facts:
        true = sum(norm_lp(f.prompt, a) for a in f.paraphrased_answers) / len(f.paraphrased_answers)
        false = sum(norm_lp(f.prompt, a) for a in f.perturbed_answers) / len(f.perturbed_answers)
        want.append(math.exp(false - true))
    got = B.truth_ratios(toy_gpt2, facts)
    assert got == pytest.approx(want, rel=1e-4)
    scores = B.qa_scores(toy_gpt2, facts)
    assert scores.truth_ratios == got
    assert scores.truth_ratio == pytest.approx(sum(min(r, 1 / r) for r in want) / len(want), rel=1e-4)


def test_greedy_answers_and_their_rouge(toy_gpt2):
    hf, tok = toy_gpt2.hf, toy_gpt2.tokenizer
    # plain prompts: the QA template's words are unknown to the toy vocabulary
    facts = [Fact(f"w{i} w{i + 1} w{i + 2}", f"w{i + 3} w{i + 4}", (), kind="qa") for i in range(0, 60, 6)]
    gen = B.greedy_continuations(hf, tok, [f.prompt for f in facts], [2] * len(facts))
    for f, g in zip(facts, gen):  # token by token, by hand
        ids = tok(f.prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(2):
                ids = [*ids, int(hf(torch.tensor([ids])).logits[0, -1].argmax())]
        assert g == tok.decode(ids[-2:], skip_special_tokens=True)
    # facts whose gold answer is the model's own greedy answer score ROUGE-L recall 1
    own = [Fact(f.prompt, g.strip(), (), kind="qa") for f, g in zip(facts, gen) if g.strip()]
    assert len(own) >= 2
    assert B.qa_scores(toy_gpt2, own).rouge_l_recall == pytest.approx(1.0)
    assert B.qa_scores(toy_gpt2, facts).rouge_l_recall < 1.0


def test_forget_quality_is_the_ks_p_value_or_says_why_not():
    a, b = [0.2, 0.4, 0.5, 0.9, 1.1], [0.8, 1.0, 1.3, 1.5, 2.0]
    fq = B.forget_quality(a, b)
    assert fq.pvalue == pytest.approx(ks_2samp(a, b).pvalue) and fq.reason == ""
    assert B.forget_quality(a, a).pvalue == pytest.approx(1.0)
    none = B.forget_quality(a, None, "no retrain oracle for a user's file")
    assert none.pvalue is None and none.text() == "n/a (no retrain oracle for a user's file)"
    assert "no row has both" in B.forget_quality((), b).reason


# --- raw text -------------------------------------------------------------------------------------


def test_text_scores_equal_direct_computation(toy_gpt2):
    hf, tok = toy_gpt2.hf, toy_gpt2.tokenizer
    texts = [" ".join(f"w{(5 * i + 3 * k) % 100}" for k in range(4 + i)) for i in range(5)]
    halves = [(t.split()[: len(t.split()) // 2], t.split()[len(t.split()) // 2 :]) for t in texts]
    facts = [Fact(" ".join(a), " ".join(b), (), kind="text") for a, b in halves]
    total, count = 0.0, 0
    for f in facts:
        head, rest = f.text.split(" ", 1)
        total += _loglik(hf, tok, head, " " + rest)
        count += len(tok(" " + rest, add_special_tokens=False)["input_ids"])
    got = B.text_scores(toy_gpt2, facts)
    assert got.nll_per_token == pytest.approx(-total / count, rel=1e-4)
    assert 0 <= got.rouge_l <= 1 and got.n == 5


# --- the faces: the CLI end to end on a tiny Llama directory with the example files ---------------


def _example_vocab() -> list[str]:
    words = {"Question:", "Answer:", "A.", "B.", "C.", "D.", "A", "B", "C", "D"}
    for path in EXAMPLES.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            for value in json.loads(line).values():
                for text in value if isinstance(value, list) else [value]:
                    words.update(str(text).split())
    return sorted(words)


def test_cli_end_to_end_on_a_local_llama_directory(tmp_path, capsys):
    """The issue's acceptance path on a local Llama-family directory: eval, attribute, MANSU and
    GradDiff on a TOFU-style QA file (multi-token answers) and a WMDP-style MC file, then the
    benchmark comparison of the base and the runs."""
    from workbench.faces.cli import main
    from workbench.models.toy import toy_model

    model = toy_model("llama", d_model=32, n_heads=4, n_kv_heads=2, vocab=_example_vocab(), n_ctx=128)
    path = tmp_path / "llama"
    model.hf.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    runs = str(tmp_path / "runs")
    common = ["--model", str(path), "--quant", "none"]
    assert main(["eval", *common, "--data", str(EXAMPLES / "qa_forget.parquet")]) == 0
    out = capsys.readouterr().out
    assert "exact" in out and "qa ROUGE-L recall" in out and "qa truth ratio" in out and "n/a (no retrain oracle" in out
    assert main(["eval", *common, "--data", str(EXAMPLES / "mc_forget.csv"), "--format", "mc"]) == 0
    out = capsys.readouterr().out
    assert "mc acc_norm" in out and "mc letter acc" in out
    for shape, ext in (("qa", "jsonl"), ("mc", "csv")):
        forget, retain = str(EXAMPLES / f"{shape}_forget.{ext}"), str(EXAMPLES / f"{shape}_retain.jsonl")
        assert main(["attribute", "--model", str(path), "--forget", forget, "--top-k", "4",
                     "--out", str(tmp_path / f"{shape}.json")]) == 0
        for method in ("mansu", "graddiff"):
            assert main(["unlearn", "--model", str(path), "--forget", forget, "--retain", retain, "--method", method,
                         "--max-rounds", "2", "--max-steps", "2", "--lr", "1e-3", "--runs-root", runs]) == 0, method
    capsys.readouterr()
    ids = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(ids) == 4
    assert main(["eval", *common, "--forget", str(EXAMPLES / "qa_forget.jsonl"), "--retain",
                 str(EXAMPLES / "qa_retain.jsonl"), "--runs", *ids, "--runs-root", runs, "--oracle", str(path),
                 "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)["benchmarks"]
    methods = sorted(r["model"].split(" ")[0] for r in bench["forget"])
    assert methods == ["base", "graddiff", "graddiff", "mansu", "mansu"]
    # the oracle given is the base itself: its truth ratios equal the base's, so the KS p-value is 1
    assert bench["forget"][0]["qa forget quality"] == pytest.approx(1.0)
    assert all(0 <= r["qa forget quality"] <= 1 for r in bench["forget"])
    assert "qa forget quality" not in bench["retain"][0]  # forget quality is a forget-set metric


def test_the_app_session_takes_benchmark_files():
    """The app's setup with a TOFU-style upload (Parquet), and the file check with a forced format."""
    from workbench.faces.app import on_check_file
    from workbench.faces.session import Session

    s = Session()
    result = s.setup("facts", forget_file=str(EXAMPLES / "qa_forget.parquet"),
                     retain_file=str(EXAMPLES / "qa_retain.jsonl"), data_format="qa")
    assert s.split is not None and {f.kind for f in s.split.forget} == {"qa"} and result.summary
    check = on_check_file(s, str(EXAMPLES / "mc_forget.csv"), "auto", which="forget")
    assert check.startswith("✓ forget file: 12 facts (12 mc;")
    refused = on_check_file(s, str(EXAMPLES / "mc_forget.csv"), "text", which="forget")
    assert "Cannot use this forget file" in refused and "missing field 'text'" in refused
