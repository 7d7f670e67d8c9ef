"""Training the synthetic-facts models (``facts``, ``facts-tiny`` and their oracles).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.core.progress import Progress, Steps
from workbench.data.world import fact_world
from workbench.models.scoring import encode_prompts


@dataclass(frozen=True)
class FactsPreset:
    """Recipe of a built-in model trained on the synthetic fact world.

    Attributes:
        world_size: ``"full"`` or ``"tiny"`` world of :func:`workbench.facts.fact_world`.
        n_layer, n_embd, n_head: GPT-2 shape.
        max_epochs: training budget; training stops earlier once every trained fact is top-1.
        oracle: leave the forget domain out of training (retrain oracle).
        seed: seeds the world and the training.
    """

    world_size: Literal["full", "tiny"]
    n_layer: int
    n_embd: int
    n_head: int
    max_epochs: int
    oracle: bool = False
    seed: int = 0
    lr: float = 3e-3
    batch_size: int = 64
    stop_loss: float = 0.01


def word_tokenizer(vocabulary: list[str], directory: Path) -> Any:
    """A word-level fast tokenizer over ``vocabulary``, saved to and re-loaded from ``directory``.

    Re-loading from a directory matters: TransformerLens reads ``name_or_path`` from it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    words = specials + sorted(set(vocabulary) - set(specials))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(directory))
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


def build_facts_model(preset: FactsPreset, out: Path, progress: Progress | None) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel


    world = fact_world(seed=preset.seed, size=preset.world_size)
    tokenizer = word_tokenizer(world.vocabulary(), out)
    exclude = (world.split().forget[0].domain,) if preset.oracle else ()
    train = world.training_facts(exclude_domains=exclude)
    max_len = max(len(f.prompt.split()) for f in train) + 2

    torch.manual_seed(preset.seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max(32, max_len),
        n_embd=preset.n_embd,
        n_layer=preset.n_layer,
        n_head=preset.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = GPT2LMHeadModel(config)
    ids, last, answers = encode_prompts(tokenizer, [f.prompt for f in train], [f.answer for f in train])
    opt = torch.optim.AdamW(model.parameters(), lr=preset.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(preset.seed)
    n = ids.shape[0]
    steps_per_epoch = (n + preset.batch_size - 1) // preset.batch_size
    total = preset.max_epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=preset.lr, total_steps=total, pct_start=0.1)

    bar = Steps(preset.max_epochs, f"training facts model ({preset.world_size})", progress, leave=True, unit="epoch")
    accuracy = 0.0
    epoch = 0
    rows = torch.arange(n)
    for epoch in range(1, preset.max_epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        epoch_loss = 0.0
        for start in range(0, n, preset.batch_size):
            idx = order[start : start + preset.batch_size]
            sub = ids[idx][:, : int(last[idx].max()) + 1]
            logits = model(sub).logits[torch.arange(len(idx)), last[idx]]
            loss = torch.nn.functional.cross_entropy(logits, answers[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            epoch_loss += float(loss.detach()) * len(idx) / n
        if epoch % 5 == 0 or epoch == preset.max_epochs:
            model.eval()
            with torch.no_grad():
                pred = model(ids).logits[rows, last].argmax(-1)
            accuracy = float((pred == answers).float().mean())
            bar.postfix(acc=f"{accuracy:.3f}", loss=f"{epoch_loss:.4f}")
            # Stop only with a comfortable margin: a barely-memorised fact would flip under
            # the base's own quantization noise and blur every before/after comparison.
            if accuracy >= 0.999 and epoch_loss < preset.stop_loss:
                bar.step(f"trained in {epoch} epochs, top-1 {accuracy:.3f}", n=preset.max_epochs - bar.done)
                break
        bar.step(f"training epoch {epoch}, top-1 {accuracy:.3f}")
    bar.close()
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    return {
        "kind": "facts",
        "preset": preset.__dict__,
        "epochs": epoch,
        "train_top1": accuracy,
        "train_loss": epoch_loss,
        "n_train_facts": n,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
