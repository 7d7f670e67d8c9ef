"""Top-1 read in length chunks (workbench/models/scoring.py): every no-grad top-1 reads the same
chunks, so unlearning's stopping checks and the report card's evaluation see the same logits bit
for bit; each chunk is cut to its longest prompt; the reference path reads one padded batch."""

from __future__ import annotations

import pytest
import torch

from workbench.data.facts import Fact
from workbench.measurement.evaluation import evaluate_facts
from workbench.models.prefix import PrefixCache
from workbench.models.scoring import (
    TOP1_CHUNK,
    FactBatch,
    answer_logits,
    correct,
    last_token_logits,
    length_chunks,
    whole_batches,
)
from workbench.models.toy import toy_model


def _facts(n: int = 2 * TOP1_CHUNK + 40) -> list[Fact]:
    """Prompts of 1–9 words in no order of length, answers of 1–3 words (so the batch's padding
    holds answer columns too, which top-1 never reads)."""
    return [Fact(prompt=" ".join(f"w{(7 * i + j) % 100}" for j in range(1 + (5 * i) % 9)),
                 answer=" ".join(f"w{(3 * i + k) % 100}" for k in range(1 + i % 3)), choices=())
            for i in range(n)]


@pytest.fixture(scope="module")
def llama():
    return toy_model("llama", n_layers=2, n_kv_heads=2)


def _widths(model) -> tuple[list[tuple[int, int]], object]:
    """Input shapes of every forward of ``model.hf``'s first block (recorded into the list)."""
    shapes: list[tuple[int, int]] = []
    block = model.hf.get_submodule(f"{model.adapter.blocks}.0")
    handle = block.register_forward_hook(lambda _m, args, _out: shapes.append(tuple(args[0].shape[:2])))
    return shapes, handle


def test_chunks_are_cut_to_their_longest_prompt_and_cover_every_row(llama):
    batch = FactBatch.from_facts(llama.tokenizer, _facts())
    chunks = list(length_chunks(batch.last))
    rows = torch.cat([r for r, _ in chunks])
    assert sorted(rows.tolist()) == list(range(len(batch)))
    assert [len(r) for r, _ in chunks] == [TOP1_CHUNK, TOP1_CHUNK, 40]
    assert all(w == int(batch.last[r].max()) + 1 for r, w in chunks)
    shapes, handle = _widths(llama)
    try:
        correct(llama.hf, batch)
    finally:
        handle.remove()
    assert shapes == [(len(r), w) for r, w in chunks]
    assert max(w for _, w in chunks) < batch.ids.shape[1]  # the answer columns are never run


def test_chunked_top1_is_the_evaluations_top1_bit_for_bit(llama):
    facts = _facts()
    batch = FactBatch.from_facts(llama.tokenizer, facts)
    reference = last_token_logits(llama.hf, batch.ids, batch.last)
    for rows, width in length_chunks(batch.last):
        assert torch.equal(answer_logits(llama.hf, batch.prompts(rows, width)), reference[rows])
    assert tuple(correct(llama.hf, batch).tolist()) == evaluate_facts(llama, facts, multiple_choice=False).correct


def test_the_prefix_cache_reads_the_same_chunks(llama):
    batch = FactBatch.from_facts(llama.tokenizer, _facts())
    cache = PrefixCache(llama.hf, llama.adapter)
    cache.changing([n for n in llama.adapter.quantized if llama.adapter.layer_of(n) == 1])
    for _ in range(2):  # the capture, then the replay
        assert torch.equal(cache.correct(batch), correct(llama.hf, batch))


def test_whole_batches_is_one_padded_forward_with_the_same_answers(llama):
    batch = FactBatch.from_facts(llama.tokenizer, _facts())
    shapes, handle = _widths(llama)
    try:
        with whole_batches():
            whole = correct(llama.hf, batch)
        chunked = correct(llama.hf, batch)
    finally:
        handle.remove()
    assert shapes[0] == tuple(batch.ids.shape)
    assert len(shapes) == 1 + 3
    # The same answers here; in general they may differ only where two logits tie within float
    # rounding (the padded forward sums in another order), which `workbench bench flow` checks.
    assert torch.equal(whole, chunked)
