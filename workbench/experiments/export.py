"""Export an unlearned model so it can leave the workbench.

:func:`export_run` writes the run's after-model ``w + Δ`` as an ordinary Hugging Face directory
(``config.json``, ``model.safetensors``, the tokenizer, and ``workbench_export.json`` saying
where it came from), which ``AutoModelForCausalLM.from_pretrained`` loads — also in 4 bits
through bitsandbytes, the deployment the workbench's quantized numbers simulate.
:func:`export_lora_adapter` writes a LoRA run as a PEFT adapter instead: its update is exactly
rank ``r`` per adapted matrix, so a truncated SVD recovers factors ``B A`` that reproduce it.

Both write into a temporary directory beside ``out`` and rename it into place, so an
interrupted export never leaves a directory that looks complete; an existing ``out`` is
refused rather than overwritten. The base model is never modified.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.core.device import DTYPES
from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_directory
from workbench.experiments.flow import run_base_model
from workbench.experiments.store import Run
from workbench.models.loaded import LoadedModel
from workbench.models.update import Update

"""Storage dtypes an export may be written in (``--dtype``)."""

EXPORT_INFO = "workbench_export.json"


@dataclass(frozen=True)
class Export:
    """What was written: the directory, its storage dtype, and the run it came from."""

    path: Path
    dtype: str
    run_id: str
    kind: str  # "model" (a full HF directory) or "lora-adapter" (a PEFT adapter)


def export_run(run: Run, out: str | Path, *, dtype: str | None = None, model: LoadedModel | None = None) -> Export:
    """Write the run's after-model ``w + Δ`` to ``out`` as a Hugging Face directory.

    Args:
        run: a saved run.
        out: a directory that does not exist yet.
        dtype: storage dtype (``float32``, ``bfloat16``, ``float16``); default: the base's.
        model: the run's base model, if already loaded (else loaded by the run's model name).
    """
    target = _check_out(out)
    base = run_base_model(run, model)
    update = _checked_update(run, base)
    torch_dtype = _dtype(dtype, base)
    after = update.apply(base, f"{base.name}+Δ")
    after.hf.to(torch_dtype)  # pyright: ignore[reportArgumentType] -- transformers' decorated .to()
    with atomic_directory(target) as tmp:
        after.hf.save_pretrained(str(tmp), safe_serialization=True)
        base.tokenizer.save_pretrained(str(tmp))
        _write_info(tmp, run, base, kind="model", dtype=str(torch_dtype).removeprefix("torch."))
    return Export(target, str(torch_dtype).removeprefix("torch."), run.id, "model")


def export_lora_adapter(run: Run, out: str | Path, *, model: LoadedModel | None = None) -> Export:
    """Write a LoRA run's update as a PEFT adapter (``adapter_config.json``, ``adapter_model.safetensors``).

    The factors come from a truncated SVD of each update matrix at the run's rank, with
    ``lora_alpha = r`` (scaling 1), so ``B A`` is the update (to float precision); the test
    loads the adapter with ``PeftModel.from_pretrained`` and checks the merged weights.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if not str(run.config.get("method", "")).startswith("lora"):
        raise WorkbenchError(f"run {run.id} is a {run.config.get('method')!r} run; only LoRA runs export as adapters")
    target = _check_out(out)
    base = run_base_model(run, model)
    update = _checked_update(run, base)
    rank = int((run.config.get("method_config") or {}).get("rank", 8))
    conv1d = base.adapter.transposed
    modules = sorted({n.rsplit(".", 1)[0] for n in update.deltas})
    if any(not n.endswith(".weight") for n in update.deltas):
        raise WorkbenchError(f"run {run.id}: its update changes more than adapted weights; export it as a model")
    peft_config = PeftLoraConfig(r=rank, lora_alpha=rank, target_modules=modules, lora_dropout=0.0,
                                 fan_in_fan_out=bool(conv1d & set(update.deltas)), bias="none",
                                 task_type="CAUSAL_LM")
    peft_model = get_peft_model(copy.deepcopy(base.hf), peft_config)
    with torch.no_grad():
        for name, delta in update.deltas.items():
            b, a = _low_rank_factors(delta.T if name in conv1d else delta, rank)
            layer: Any = peft_model.get_submodule("base_model.model." + name.rsplit(".", 1)[0])  # a peft LoraLayer
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    with atomic_directory(target) as tmp:
        peft_model.save_pretrained(str(tmp))
        _write_info(tmp, run, base, kind="lora-adapter", dtype="float32")
    return Export(target, "float32", run.id, "lora-adapter")


def _low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B [out, r]``, ``A [r, in]`` with ``B A`` the best rank-``r`` approximation of ``delta [out, in]``."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float()


def _check_out(out: str | Path) -> Path:
    target = Path(out).expanduser()
    if target.exists():
        raise WorkbenchError(f"{target} already exists; export into a new directory")
    return target


def _checked_update(run: Run, base: LoadedModel) -> Update:
    update = run.update()
    update.check_fits(base)
    return update


def _dtype(name: str | None, base: LoadedModel) -> torch.dtype:
    if name is None:
        return next(base.hf.parameters()).dtype
    if name not in DTYPES:
        raise WorkbenchError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[name]


def _write_info(directory: Path, run: Run, base: LoadedModel, *, kind: str, dtype: str) -> None:
    info = {"kind": kind, "run_id": run.id, "method": run.config.get("method"), "base_model": base.name,
            "base_fingerprint": base.fingerprint, "dtype": dtype,
            # the versions and commit that produced the run, so the export can be traced back
            "provenance": run.config.get("provenance")}
    (directory / EXPORT_INFO).write_text(json.dumps(info, indent=2))
