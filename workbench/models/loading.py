"""Loading a model by name: a built-in (built and cached on first use) or a local HF directory.

Anything that is not a built-in name is read as a local Hugging Face causal-LM directory,
offline, from safetensors only (never a pickled ``.bin``) and without the directory's own
code (``trust_remote_code=False``). Loaded models are shared in-process: the same built-in
name, or the same directory however it is spelled (``/m``, ``/m/``, ``/m/.``, a symlink to
it), gives the same object, and at most :func:`max_loaded` models stay cached (least
recently used first out).

A caller serving remote users (the app) passes :class:`ModelRoots`: then only built-ins and
directories under the operator's roots load, and every other name gets one message, so the
answer never tells whether a path exists elsewhere on the server.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.core.device import choose_device, choose_dtype, dtype_name
from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress
from workbench.models.builtins import BUILTINS, build_model
from workbench.models.loaded import LoadedModel

_LOADED: dict[str, LoadedModel] = {}
"""Loaded models by key, least recently used first (a plain dict keeps insertion order)."""

_LOAD_LOCK = threading.Lock()
_MAX_LOADED = [int(os.environ.get("WORKBENCH_MAX_MODELS") or 2)]


def max_loaded() -> int:
    """How many loaded models stay cached (``$WORKBENCH_MAX_MODELS``, default 2)."""
    return _MAX_LOADED[0]


def set_max_loaded(n: int) -> None:
    """Keep at most ``n`` loaded models cached; a model still held by a caller stays alive."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WorkbenchError(f"the number of cached models must be a whole number >= 1, got {n!r}")
    with _LOAD_LOCK:
        _MAX_LOADED[0] = n
        _evict()


def _evict() -> None:
    while len(_LOADED) > _MAX_LOADED[0]:
        del _LOADED[next(iter(_LOADED))]


@dataclass(frozen=True)
class ModelRoots:
    """Directories (resolved real paths) under which model directories may be loaded."""

    roots: tuple[Path, ...] = ()

    @classmethod
    def of(cls, dirs: list[str] | tuple[str, ...]) -> ModelRoots:
        """Resolve the operator's directories; a missing one is an error at start-up, not later."""
        resolved = []
        for d in dirs:
            path = Path(d).expanduser().resolve()
            if not path.is_dir():
                raise WorkbenchError(f"--models-dir {d}: not a directory")
            resolved.append(path)
        return cls(tuple(resolved))

    def admits(self, path: Path) -> bool:
        return any(path == root or path.is_relative_to(root) for root in self.roots)


def refused(name: str) -> WorkbenchError:
    """The one message for a name that is not allowed *or* not found (no existence oracle)."""
    return WorkbenchError(
        f"model {name!r} is neither a built-in ({', '.join(BUILTINS)}) nor a model directory under "
        "the folders this app may load from (not allowed or not found)"
    )


def model_key(name_or_dir: str | os.PathLike[str], roots: ModelRoots | None = None) -> str:
    """A built-in's name or the directory's resolved real path (one key for every spelling).

    With ``roots``, a directory outside them, missing, or without ``config.json`` is refused
    with :func:`refused`'s message, checked on the resolved path (symlinks cannot lead out).
    """
    name = str(name_or_dir)
    if name in BUILTINS:
        return name
    try:
        path = Path(name).expanduser().resolve()
        allowed = roots is None or (roots.admits(path) and (path / "config.json").is_file())
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, a symlink loop
        allowed, path = False, Path(name)
    if not allowed:
        raise refused(name if len(name) <= 200 else name[:200] + "…")
    return str(path)


def load_model(
    name_or_dir: str | os.PathLike[str],
    *,
    progress: Progress | None = None,
    device_map: str | dict[str, Any] | None = None,
    device: str | None = None,
    roots: ModelRoots | None = None,
    dtype: str | torch.dtype | None = None,
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

    ``roots`` (the app): only built-ins and directories under them load (:func:`model_key`).

    ``dtype`` (``"float32"``, ``"bfloat16"``, ``"float16"``; default ``$WORKBENCH_DTYPE``, else
    float32, also for the built-ins): the storage dtype of the weights
    (:func:`workbench.core.device.choose_dtype`); a model in another dtype is cached under its own key.
    """

    if device_map is not None and device is not None:
        raise WorkbenchError("give device_map or device, not both")
    target = choose_device(device) if device_map is None else None
    storage = choose_dtype(dtype)
    resolved = model_key(name_or_dir, roots)
    key = resolved if device_map is None else f"{resolved}|device_map={device_map!r}"
    if target is not None and target.type != "cpu":
        key = f"{key}|device={target}"
    if storage != torch.float32:
        key = f"{key}|dtype={dtype_name(storage)}"
    with _LOAD_LOCK:
        if key in _LOADED:
            _LOADED[key] = _LOADED.pop(key)  # most recently used last
            return _LOADED[key]
        if str(name_or_dir) in BUILTINS:
            if device_map is not None:
                raise WorkbenchError("device_map is for local model directories; built-ins load on the CPU")
            path = build_model(str(name_or_dir), progress=progress)
        else:
            path = Path(resolved)
            if not path.exists():
                names = ", ".join(BUILTINS)
                raise WorkbenchError(
                    f"model {str(name_or_dir)!r} is neither a built-in ({names}) nor an existing directory"
                )
            if not path.is_dir() or not (path / "config.json").exists():
                raise WorkbenchError(
                    f"{path} is not a Hugging Face model directory (no config.json in it)"
                )
        model = _load_hf_dir(path, name=str(name_or_dir), device_map=device_map, dtype=storage)
        if target is not None and target.type != "cpu":
            model.hf.to(target)  # pyright: ignore[reportArgumentType] -- transformers' decorated .to()
        _LOADED[key] = model
        _evict()
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


def _load_hf_dir(path: Path, name: str, device_map: str | dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not any(path.glob("*.safetensors")):
        # A .bin is a pickle: loading it can run code, so only safetensors weights are read.
        raise WorkbenchError(
            f"{path} holds no .safetensors weights (a pytorch_model.bin is never loaded, since unpickling can "
            "run code); save the model with save_pretrained(..., safe_serialization=True)"
        )
    try:
        tokenizer = _tokenizer_class(path, AutoTokenizer).from_pretrained(str(path), local_files_only=True,
                                                                           trust_remote_code=False)
    except Exception as exc:  # transformers raises many types here; the user needs one message
        raise WorkbenchError(f"could not load a tokenizer from {path}: {exc}") from exc
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        hf = AutoModelForCausalLM.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, attn_implementation="eager",
            trust_remote_code=False, use_safetensors=True, **extra
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
