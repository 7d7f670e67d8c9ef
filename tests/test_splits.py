"""Built-in forget/retain splits (facts models), and splitting hand-made facts by domain."""

from __future__ import annotations

import pytest

from workbench.core.errors import WorkbenchError
from workbench.data.facts import Fact
from workbench.data.splits import split_by_domain
from workbench.data.world import HAZARD_DOMAIN, fact_world
from workbench.models.builtin_splits import builtin_split


def _prompts(facts) -> set[str]:
    return {f.prompt for f in facts}


def test_facts_tiny_default_split_forgets_the_hazard_domain(facts_tiny):
    split = builtin_split(facts_tiny)
    assert split.forget and split.retain
    assert split.forget_paraphrase and split.retain_paraphrase
    assert _prompts(split.forget).isdisjoint(_prompts(split.retain))
    assert _prompts(split.forget_paraphrase).isdisjoint(_prompts(split.retain_paraphrase))
    assert {f.domain for f in split.forget} == {HAZARD_DOMAIN} == {f.domain for f in split.forget_paraphrase}
    assert HAZARD_DOMAIN not in {f.domain for f in split.retain} | {f.domain for f in split.retain_paraphrase}
    assert not any(f.paraphrase for f in split.forget + split.retain)
    assert all(f.paraphrase for f in split.forget_paraphrase + split.retain_paraphrase)
    world = fact_world(seed=0, size="tiny")
    # the retain set covers every other domain of the world
    assert {f.domain for f in split.retain} == set(world.domain_names) - {HAZARD_DOMAIN}
    # paraphrases are the same facts on another template
    assert {(f.subject, f.relation) for f in split.forget} == {(f.subject, f.relation) for f in split.forget_paraphrase}
    assert split == world.split()


def test_facts_tiny_another_domain_is_selectable(facts_tiny):
    world = fact_world(seed=0, size="tiny")
    other = next(d for d in world.domain_names if d != HAZARD_DOMAIN)
    split = builtin_split(facts_tiny, forget_domain=other)
    assert {f.domain for f in split.forget} == {other}
    assert other not in {f.domain for f in split.retain}
    assert HAZARD_DOMAIN in {f.domain for f in split.retain}
    assert _prompts(split.forget).isdisjoint(_prompts(split.retain))
    assert other in split.name


def test_unknown_domain_is_a_workbench_error_listing_the_domains(facts_tiny):
    with pytest.raises(WorkbenchError, match="no fact domain 'volcanoes'") as err:
        builtin_split(facts_tiny, forget_domain="volcanoes")
    assert HAZARD_DOMAIN in str(err.value)


def test_local_directory_model_has_no_builtin_split(tmp_path):
    from workbench.models.loading import load_model
    from workbench.models.toy import toy_model

    toy = toy_model("gpt2", n_layers=1, d_model=32, n_heads=2)
    toy.hf.save_pretrained(tmp_path / "mine")
    toy.tokenizer.save_pretrained(tmp_path / "mine")
    model = load_model(str(tmp_path / "mine"))
    with pytest.raises(WorkbenchError, match="no built-in fact split; pass forget and retain fact files"):
        builtin_split(model)
    # an in-memory model (e.g. an after-model) has none either
    with pytest.raises(WorkbenchError, match="fact files"):
        builtin_split(toy)


def _fact(prompt: str, answer: str, domain: str, relation: str, paraphrase: bool = False) -> Fact:
    return Fact(prompt=prompt, answer=answer, choices=(), domain=domain, relation=relation, paraphrase=paraphrase,
                template=1 if paraphrase else 0)


HAND = (
    _fact("The capital of France is", "Paris", "capital/europe", "capital"),
    _fact("The capital of Peru is", "Lima", "capital/americas", "capital"),
    _fact("France's capital city is", "Paris", "capital/europe", "capital", paraphrase=True),
    _fact("The currency of Japan is the", "yen", "currency/asia", "currency"),
    _fact("Japan pays with the", "yen", "currency/asia", "currency", paraphrase=True),
    _fact("The language of Brazil is", "Portuguese", "language/americas", "language"),
)


def test_split_by_domain_on_hand_made_facts():
    split = split_by_domain(HAND, "capital/europe", name="mine")
    assert split.name == "mine:capital/europe"
    assert [f.prompt for f in split.forget] == ["The capital of France is"]
    assert [f.prompt for f in split.forget_paraphrase] == ["France's capital city is"]
    assert [f.prompt for f in split.retain] == [
        "The capital of Peru is", "The currency of Japan is the", "The language of Brazil is",
    ]
    assert [f.prompt for f in split.retain_paraphrase] == ["Japan pays with the"]
    # every fact lands in exactly one of the four sets
    together = split.forget + split.retain + split.forget_paraphrase + split.retain_paraphrase
    assert sorted(f.prompt for f in together) == sorted(f.prompt for f in HAND)


def test_split_by_domain_accepts_a_relation_across_regions():
    split = split_by_domain(HAND, "capital", name="mine")
    assert {f.domain for f in split.forget} == {"capital/europe", "capital/americas"}
    assert {f.relation for f in split.retain} == {"currency", "language"}
    assert len(split.forget_paraphrase) == 1 and len(split.retain_paraphrase) == 1


def test_split_by_domain_unknown_domain_lists_the_domains():
    with pytest.raises(WorkbenchError, match="no facts in domain 'rivers'") as err:
        split_by_domain(HAND, "rivers", name="mine")
    for domain in ("capital/europe", "currency/asia", "language/americas"):
        assert domain in str(err.value)


def test_split_by_domain_with_only_paraphrases_in_the_domain_is_an_error():
    facts = (
        _fact("Japan pays with the", "yen", "currency/asia", "currency", paraphrase=True),
        _fact("The capital of Peru is", "Lima", "capital/americas", "capital"),
    )
    # the forget set would be empty: FactSplit refuses that with a WorkbenchError
    with pytest.raises(WorkbenchError, match="forget set is empty"):
        split_by_domain(facts, "currency/asia", name="mine")

