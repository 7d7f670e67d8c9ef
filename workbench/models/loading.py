"""Loading a model by name: a built-in (built and cached on first use) or a local HF directory.

Anything that is not a built-in name is read as a local Hugging Face causal-LM directory,
offline. Loaded models are shared in-process: the same name gives the same object.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import torch

from workbench.core.device import choose_device
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress
from workbench.models.builtins import BUILTINS, build_model
from workbench.models.loaded import LoadedModel

_LOADED: dict[str, LoadedModel] = {}


_LOAD_LOCK = threading.Lock()


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
            model.hf.to(target)  # pyright: ignore[reportArgumentType] -- transformers' decorated .to()
        _LOADED[key] = model
        return model


# A tokenizer saved as a plain ``tokenizers`` object (tokenizer_class "TokenizersBackend" or
# "PreTrainedTokenizerFast", e.g. the workbench's own word-level tokenizers) is loaded as
# such: AutoTokenizer would otherwise pick the model family's class (Qwen2Tokenizer, …) and
# rebuild a different pre-tokenizer around the saved vocabulary.
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(path: Path, auto: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    config = path / "tokenizer_config.json"
    try:
        # Plain json: transformers writes model_max_length as a 31-digit integer, which
        # parse_json's limits refuse; the file is read as transformers itself reads it.
        declared = json.loads(config.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return auto
    return PreTrainedTokenizerFast if declared in _GENERIC_TOKENIZERS else auto


def _load_hf_dir(path: Path, name: str, device_map: str | dict[str, Any] | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = _tokenizer_class(path, AutoTokenizer).from_pretrained(str(path), local_files_only=True)
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
    # Fail early, with a clear message, on unsupported families and on layouts the adapter
    # cannot place (every later step reads the adapter anyway).
    model.adapter  # noqa: B018
    return model
