"""Tests of workbench.facts: the synthetic world, user fact files, the real-fact candidates."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact, FactSplit
from workbench.data.files import load_fact_file, save_fact_file
from workbench.data.real import real_fact_candidates
from workbench.data.world import CANONICAL_TEMPLATE, fact_world

# --------------------------------------------------------------------------------------------
# Synthetic fact world
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["full", "tiny"])
def world(request):
    return fact_world(seed=0, size=request.param)


def test_world_is_deterministic_in_the_seed():
    # Bypass the cache: determinism must come from the seed, not from returning one object.
    a = fact_world.__wrapped__(seed=3, size="full")
    b = fact_world.__wrapped__(seed=3, size="full")
    assert a == b and a is not b
    c = fact_world.__wrapped__(seed=4, size="full")
    assert set(a.domains[0].subjects) != set(c.domains[0].subjects)
    assert [f.answer for f in a.facts] != [f.answer for f in c.facts]


def test_domains_and_hazard_domain(world):
    assert len(world.domains) >= 4
    hazards = [d for d in world.domains if d.hazard]
    assert len(hazards) == 1 and world.hazard_domain == "pathogens" == hazards[0].name
    n_subjects = {"full": 70, "tiny": 12}[world.size]
    for d in world.domains:
        assert len(d.subjects) == n_subjects
        assert 2 <= len(d.relations) <= 3


def test_templates_and_held_out(world):
    for d in world.domains:
        for rel in d.relations:
            assert len(rel.templates) >= 4
            facts = world.select(d.name, relations=rel.name)
            held = {f.template for f in facts if f.paraphrase}
            assert held == {rel.held_out}  # exactly one held-out template
            assert {f.template for f in facts} == set(range(len(rel.templates)))
            # The held-out phrasing is new, but made of words the trained phrasings use.
            trained_words = {w for i in rel.trained_templates for w in rel.templates[i].split()}
            assert set(rel.templates[rel.held_out].split()) <= trained_words
            assert rel.templates[rel.held_out] not in {rel.templates[i] for i in rel.trained_templates}


def test_subjects_are_unique_invented_words(world):
    subjects = [s for d in world.domains for s in d.subjects]
    assert len({s.lower() for s in subjects}) == len(subjects)
    answers = {a.lower() for d in world.domains for r in d.relations for a in r.answers}
    template_words = {
        w.lower() for d in world.domains for r in d.relations for t in r.templates for w in t.split()
    }
    for s in subjects:
        assert re.fullmatch(r"[A-Z][a-z]+", s)
        assert s.lower() not in answers and s.lower() not in template_words


def test_answers_are_single_words_and_prompts_are_clean(world):
    vocab = set(world.vocabulary())
    for f in world.facts:
        assert re.fullmatch(r"[A-Za-z]+", f.answer)
        assert f.prompt == f.prompt.strip() and "  " not in f.prompt
        assert all(w.isalpha() for w in f.prompt.split())
        assert f.subject in f.prompt.split()
        assert set(f.prompt.split()) <= vocab and f.answer in vocab and set(f.choices) <= vocab
        assert set(f.corrupt_prompt.split()) <= vocab


def test_multiple_choice(world):
    for d in world.domains:
        for rel in d.relations:
            for f in world.select(d.name, relations=rel.name):
                assert len(f.choices) == 4 and len(set(f.choices)) == 4
                assert f.answer in f.choices and set(f.choices) <= set(rel.answers)
    # The answer's position varies (a fixed position would be a free shortcut).
    positions = Counter(f.answer_index for f in world.facts)
    assert len(positions) == 4


def test_corrupt_prompts(world):
    answer_of = {(f.domain, f.relation, f.subject): f.answer for f in world.facts}
    for f in world.facts:
        words, corrupt = f.prompt.split(), f.corrupt_prompt.split()
        assert len(words) == len(corrupt) and corrupt != words
        diff = [i for i, (a, b) in enumerate(zip(words, corrupt, strict=True)) if a != b]
        assert len(diff) == 1 and words[diff[0]] == f.subject
        other = corrupt[diff[0]]
        assert answer_of[(f.domain, f.relation, other)] != f.answer


def test_split_is_disjoint_and_canonical(world):
    s = world.split()
    assert s.forget and s.retain and s.forget_paraphrase and s.retain_paraphrase
    assert {f.domain for f in s.forget} == {"pathogens"} == {f.domain for f in s.forget_paraphrase}
    assert "pathogens" not in {f.domain for f in s.retain + s.retain_paraphrase}
    assert all(f.template == CANONICAL_TEMPLATE and not f.paraphrase for f in s.forget + s.retain)
    assert all(f.paraphrase for f in s.forget_paraphrase + s.retain_paraphrase)
    prompts = [{f.prompt for f in part} for part in (s.forget, s.retain, s.forget_paraphrase, s.retain_paraphrase)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not prompts[i] & prompts[j]
    # The paraphrase sets hold the same (subject, relation) facts as the trained sets.
    key = lambda f: (f.subject, f.relation, f.answer)  # noqa: E731
    assert {key(f) for f in s.forget} == {key(f) for f in s.forget_paraphrase}
    assert {key(f) for f in s.retain} == {key(f) for f in s.retain_paraphrase}
    other = world.split("people")
    assert {f.domain for f in other.forget} == {"people"}
    with pytest.raises(WorkbenchError, match="no fact domain"):
        world.split("dragons")


def test_training_facts(world):
    train = world.training_facts()
    assert train and not any(f.paraphrase for f in train)
    held = {(f.domain, f.relation, f.template) for f in world.facts if f.paraphrase}
    assert not {(f.domain, f.relation, f.template) for f in train} & held
    n_trained = sum(len(r.templates) - 1 for d in world.domains for r in d.relations)
    assert len(train) == n_trained * len(world.domains[0].subjects)
    oracle = world.training_facts(exclude_domains=("pathogens",))
    assert oracle and "pathogens" not in {f.domain for f in oracle}
    assert world.training_facts(exclude_domains="pathogens") == oracle  # a bare name works too
    assert len(oracle) < len(train)
    with pytest.raises(WorkbenchError):
        world.training_facts(exclude_domains=("nope",))


def test_sizes():
    full, tiny = fact_world(0, "full"), fact_world(0, "tiny")
    assert len(full.split().forget) == 210 and len(full.split().retain) == 630
    assert len(tiny.training_facts()) < 400  # small enough to train a 2-layer model quickly
    with pytest.raises(WorkbenchError):
        fact_world(0, "huge")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Fact / FactSplit validation
# --------------------------------------------------------------------------------------------


def test_fact_validation():
    f = Fact("The sky is", "blue", ["blue", "red"])  # list choices are stored as a tuple
    assert f.choices == ("blue", "red") and f.text == "The sky is blue" and f.answer_index == 0
    for bad in (
        dict(prompt="", answer="x", choices=()),
        dict(prompt="The sky is ", answer="blue", choices=()),
        dict(prompt="The sky is", answer=" blue", choices=()),
        dict(prompt="The sky is", answer="blue", choices=("red", "green")),
        dict(prompt="The sky is", answer="blue", choices=("blue", "blue")),
        dict(prompt="The sky is", answer="blue", choices=(), template=-1),
        dict(prompt="The sky is", answer="blue", choices=(), corrupt_prompt="The sky is"),
    ):
        with pytest.raises(WorkbenchError):
            Fact(**bad)


def test_fact_split_validation():
    a, b = Fact("A is", "x", ()), Fact("B is", "y", ())
    s = FactSplit("s", [a], [b])
    assert s.forget == (a,) and s.retain == (b,) and s.forget_paraphrase == ()
    with pytest.raises(WorkbenchError, match="share"):
        FactSplit("s", (a,), (a, b))
    with pytest.raises(WorkbenchError, match="empty"):
        FactSplit("s", (), (b,))


# --------------------------------------------------------------------------------------------
# User fact files
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    """A tiny word-level tokenizer: every listed word is one token, anything else <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "The", "capital", "of", "France", "is", "Paris", "a", "b", "c", "Is", "this", "true"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def _write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return p


def test_load_jsonl_cloze_and_multiple_choice(tmp_path):
    p = _write(
        tmp_path,
        "f.jsonl",
        '{"prompt": "The capital of France is ", "answer": "Paris", "corrupt_prompt": "The capital of Spain is"}\n'
        "\n"
        '{"question": "Which letter comes first?", "choices": ["b", "a", "c"], "answer": 1}\n'
        '{"question": "Which letter comes last?", "choices": ["b", "a", "c"], "answer": "2", "domain": "letters"}\n',
    )
    facts = load_fact_file(p)
    assert len(facts) == 3
    assert facts[0] == Fact("The capital of France is", "Paris", (), corrupt_prompt="The capital of Spain is")
    assert facts[1].prompt == "Which letter comes first?" and facts[1].answer == "a"
    assert facts[1].choices == ("b", "a", "c")
    assert facts[2].answer == "c" and facts[2].domain == "letters"


def test_load_csv(tmp_path):
    p = _write(
        tmp_path,
        "f.csv",
        "prompt,question,choices,answer\n"
        "The capital of France is,,,Paris\n"
        ',"Pick, carefully",a|b|c,0\n',
    )
    facts = load_fact_file(p)
    assert facts[0] == Fact("The capital of France is", "Paris", ())
    assert facts[1] == Fact("Pick, carefully", "a", ("a", "b", "c"), kind="mc")


def test_save_and_reload_round_trip(tmp_path, world):
    facts = world.split().forget[:20] + world.split().retain_paraphrase[:5]
    p = save_fact_file(facts, tmp_path / "sub" / "facts.jsonl")
    assert load_fact_file(p) == facts
    assert not [x for x in p.parent.iterdir() if x.name.endswith(".tmp")]  # temp file renamed away
    with pytest.raises(WorkbenchError):
        save_fact_file(facts, tmp_path / "facts.csv")
    with pytest.raises(WorkbenchError):
        save_fact_file((), tmp_path / "empty.jsonl")


BAD_FILES = [
    # (file name, content, expected line, message fragment)
    ("empty.jsonl", "", 1, "empty"),
    ("blank.jsonl", "\n  \n", 1, "empty"),
    ("empty.csv", "", 1, "empty"),
    ("header_only.csv", "prompt,answer\n", 2, "no fact rows"),
    ("missing_answer.jsonl", '{"prompt": "A is", "answer": "x"}\n{"prompt": "B is"}\n', 2, "missing field 'answer'"),
    ("missing_prompt.jsonl", '{"answer": "x"}\n', 1, "missing field 'prompt'"),
    ("missing_choices.jsonl", '{"question": "Q?", "answer": 0}\n', 1, "choices"),
    ("missing_column.csv", "prompt,solution\nA is,x\n", 1, "missing column 'answer'"),
    ("missing_cell.csv", "prompt,answer\nA is,x\nB is,\n", 3, "missing field 'answer'"),
    ("index_range.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": 2}\n', 1, "out of range"),
    ("index_negative.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": -1}\n', 1, "out of range"),
    ("index_float.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": 1.5}\n', 1, "index"),
    ("index_text.jsonl", '{"question": "Q?", "choices": ["a", "b"], "answer": "b"}\n', 1, "index"),
    ("index_range.csv", "question,choices,answer\nQ?,a|b,x\nR?,a|b,5\n", 2, "index"),
    ("empty_prompt.jsonl", '{"prompt": "A is", "answer": "x"}\n{"prompt": "   ", "answer": "x"}\n', 2, "empty prompt"),
    ("empty_prompt.csv", 'prompt,answer\n" ",x\n', 2, "missing field 'prompt'"),
    ("bad_json.jsonl", '{"prompt": "A is", "answer": "x"}\n{"prompt": "B is", "answer": }\n', 2, "invalid JSON"),
    ("array.json", '[\n{"prompt": "A is", "answer": "x"}\n]\n', 1, "one JSON object per line"),
    ("not_object.jsonl", '["A is", "x"]\n', 1, "JSON object"),
    ("duplicate.jsonl", '{"prompt": "A is", "answer": "x"}\n{"prompt": "A is", "answer": "y"}\n', 2, "line 1"),
    ("answer_not_choice.jsonl", '{"prompt": "A is", "answer": "x", "choices": ["y", "z"]}\n', 1, "not one of"),
    ("prompt_type.jsonl", '{"prompt": 3, "answer": "x"}\n', 1, "must be text"),
]


@pytest.mark.parametrize("name, content, line, fragment", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_name_file_and_line(tmp_path, name, content, line, fragment):
    p = _write(tmp_path, name, content)
    with pytest.raises(WorkbenchError) as info:
        load_fact_file(p)
    msg = str(info.value)
    assert str(p) in msg and f"line {line}" in msg and fragment in msg, msg


def test_non_utf8_bytes_name_the_line(tmp_path):
    for name in ("latin1.jsonl", "latin1.csv"):
        content = b'{"prompt": "A is", "answer": "x"}\n' if name.endswith("jsonl") else b"prompt,answer\n"
        content += b'{"prompt": "Caf\xe9 is", "answer": "x"}\n' if name.endswith("jsonl") else b"Caf\xe9 is,x\n"
        p = _write(tmp_path, name, content)
        with pytest.raises(WorkbenchError, match=r"line 2: not valid UTF-8") as info:
            load_fact_file(p)
        assert str(p) in str(info.value)


def test_bad_paths(tmp_path):
    with pytest.raises(WorkbenchError, match="no such file"):
        load_fact_file(tmp_path / "missing.jsonl")
    with pytest.raises(WorkbenchError, match="directory"):
        load_fact_file(tmp_path)
    p = _write(tmp_path, "facts.txt", '{"prompt": "A is", "answer": "x"}\n')
    with pytest.raises(WorkbenchError, match="unsupported") as info:
        load_fact_file(p)
    assert str(p) in str(info.value)


def test_tokenizer_checks(tmp_path, word_tokenizer):
    ok = _write(
        tmp_path,
        "ok.jsonl",
        '{"prompt": "The capital of France is", "answer": "Paris"}\n'
        # Multiple-choice rows may have multi-token choices (scored by summed log-prob).
        '{"question": "Is this true", "choices": ["a b", "c"], "answer": 0}\n',
    )
    assert len(load_fact_file(ok, tokenizer=word_tokenizer, max_context=6)) == 2

    multi = _write(
        tmp_path,
        "multi.jsonl",
        '{"prompt": "The capital of France is", "answer": "Paris"}\n'
        '{"prompt": "The capital of France is not", "answer": "a b"}\n',
    )
    # multi-token answers are accepted (scored over their whole span)
    assert load_fact_file(multi, tokenizer=word_tokenizer)[1].answer == "a b"
    # ... and count all their tokens against the context: 6 prompt tokens + 2 answer tokens
    with pytest.raises(WorkbenchError, match=r"line 2: .*take 8 tokens.*context of 7"):
        load_fact_file(multi, tokenizer=word_tokenizer, max_context=7)

    # a word the tokenizer does not know is one <unk> token: one token, but not the answer
    oov = _write(tmp_path, "oov.jsonl", '{"prompt": "The capital of France is", "answer": "Lutetia"}\n')
    with pytest.raises(WorkbenchError, match=r"line 1: the answer 'Lutetia' is not in the tokenizer's vocabulary"):
        load_fact_file(oov, tokenizer=word_tokenizer)

    # "The capital of France is" is 5 tokens, + 1 answer token = 6.
    with pytest.raises(WorkbenchError, match="context of 5") as info:
        load_fact_file(ok, tokenizer=word_tokenizer, max_context=5)
    assert str(ok) in str(info.value) and "line 1" in str(info.value)
    long_csv = _write(tmp_path, "long.csv", "prompt,answer\na,b\nThe capital of France is,Paris\n")
    with pytest.raises(WorkbenchError, match=r"line 3: .*context of 4"):
        load_fact_file(long_csv, tokenizer=word_tokenizer, max_context=4)


# --------------------------------------------------------------------------------------------
# Real-fact candidates
# --------------------------------------------------------------------------------------------

DATA = Path(__file__).resolve().parents[1] / "workbench" / "data" / "real_facts.jsonl"

EUROPE = {
    "Albania", "Andorra", "Austria", "Belarus", "Belgium", "Bosnia and Herzegovina", "Bulgaria", "Croatia",
    "Cyprus", "the Czech Republic", "Denmark", "Estonia", "Finland", "France", "Germany", "Greece", "Hungary",
    "Iceland", "Ireland", "Italy", "Kosovo", "Latvia", "Liechtenstein", "Lithuania", "Luxembourg", "Malta",
    "Moldova", "Monaco", "Montenegro", "the Netherlands", "North Macedonia", "Norway", "Poland", "Portugal",
    "Romania", "Russia", "San Marino", "Serbia", "Slovakia", "Slovenia", "Spain", "Sweden", "Switzerland",
    "Ukraine", "the United Kingdom", "Vatican City",
}  # fmt: skip


def test_real_facts_file():
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 600
    keys = [(r["prompt"], r["answer"]) for r in rows]
    assert len(set(keys)) == len(keys)
    answer_of: dict[str, str] = {}
    for r in rows:
        assert set(r) >= {"prompt", "answer", "relation", "region", "subject", "template", "paraphrase"}
        assert r["prompt"] == r["prompt"].strip() and r["answer"] == r["answer"].strip() and r["answer"]
        assert answer_of.setdefault(r["prompt"], r["answer"]) == r["answer"]  # no contradictions
        assert len(re.findall(r"(?<!\w)" + re.escape(r["subject"]) + r"(?!\w)", r["prompt"])) == 1
        assert r["region"] in ("", "europe", "asia", "africa", "americas", "oceania")
    capitals = {r["subject"]: r["answer"] for r in rows if r["relation"] == "capital" and r["region"] == "europe"}
    assert set(capitals) == EUROPE and len(capitals) >= 45
    # Spot checks of facts people get wrong.
    assert capitals["Switzerland"] == "Bern" and capitals["Ukraine"] == "Kyiv"
    others = {r["subject"]: r["answer"] for r in rows if r["relation"] == "capital"}
    assert others["Australia"] == "Canberra" and others["Canada"] == "Ottawa" and others["Turkey"] == "Ankara"
    # Every capital fact has the canonical phrasing, more trained ones, and one paraphrase phrasing.
    for country in others:
        rows_of = [r for r in rows if r["relation"] == "capital" and r["subject"] == country]
        forms = {(r["template"], r["paraphrase"]) for r in rows_of}
        assert (0, False) in forms and len(forms) >= 2
        assert [t for t, para in forms if para] == [1]


def test_real_fact_candidates():
    facts = real_fact_candidates()
    assert len(facts) >= 600
    eu = [f for f in facts if f.domain == "capital/europe"]
    assert len({f.subject for f in eu}) >= 45
    for f in facts:
        assert f.domain == f.relation or f.domain.startswith(f.relation + "/")
        assert len(f.choices) == 4 and len(set(f.choices)) == 4 and f.answer in f.choices
        if f.corrupt_prompt:
            assert f.corrupt_prompt != f.prompt
    with_corrupt = [f for f in facts if f.corrupt_prompt]
    assert len(with_corrupt) >= 0.99 * len(facts)
    by_prompt = {f.prompt: f for f in facts}
    for f in with_corrupt:
        other = by_prompt.get(f.corrupt_prompt)
        if other is not None:  # the corrupt prompt is another fact of the same template
            assert other.answer != f.answer and other.relation == f.relation
    assert real_fact_candidates() == facts  # deterministic
