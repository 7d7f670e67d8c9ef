"""Where models run: chosen once per process, CUDA when torch sees one, else the CPU.

Every model the workbench loads is placed on :func:`choose_device` (or spread over devices by
an explicit ``device_map``); everything downstream takes its device from the model it is
given (:func:`module_device`), so the same code runs on either.

Weights are float32 unless asked otherwise (:func:`choose_dtype`: ``load_model(..., dtype=)``,
``workbench --dtype``, ``$WORKBENCH_DTYPE``). In bfloat16/float16 the quantization analysis
reads the weights as stored (as bitsandbytes quantizes a deployed 16-bit model); updates
still accumulate in float32 (docs/SCIENCE.md, "Storage dtype").

Override with ``$WORKBENCH_DEVICE`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) or
``load_model(..., device=...)``.

Tested on CPU only: the machine this was built on has no GPU. The selection logic is tested
by simulating CUDA's presence; a real CUDA run is unverified.
"""

from __future__ import annotations

import os

import torch

from workbench.core.errors import WorkbenchError

ENV = "WORKBENCH_DEVICE"
DTYPE_ENV = "WORKBENCH_DTYPE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The storage dtypes a model may be loaded in, by name."""

WORKING_MB_ENV = "WORKBENCH_WORKING_MB"
"""A working budget in MiB that replaces the default one (``workbench --working-mb``; read by
:meth:`~workbench.models.loaded.LoadedModel.working_budget_bytes`)."""


def working_mib(text: str, what: str = f"${WORKING_MB_ENV}") -> int:
    """A working budget as written (``$WORKBENCH_WORKING_MB``, ``--working-mb``): whole MiB, ≥ 1.

    Raises:
        WorkbenchError: for anything else (a sign, a fraction, a unit, digits grouped by ``_``).
    """
    raw = text.strip()
    if not (raw.isascii() and raw.isdigit()):  # int() would also take "+5", "1_000", "٣"
        raise WorkbenchError(f"{what} must be a whole number of MiB, got {raw!r}")
    if int(raw) < 1:
        raise WorkbenchError(f"{what} must be at least 1 (MiB), got {int(raw)}")
    return int(raw)


def working_budget_setting() -> int | None:
    """``$WORKBENCH_WORKING_MB`` in bytes, or ``None`` when it is unset or empty.

    Raises:
        WorkbenchError: when it is not a whole number of MiB of at least 1 (:func:`working_mib`).
    """
    raw = os.environ.get(WORKING_MB_ENV, "")
    return working_mib(raw) * 2**20 if raw.strip() else None


def choose_dtype(requested: str | torch.dtype | None = None) -> torch.dtype:
    """The storage dtype models are loaded in: ``requested`` (a name of :data:`DTYPES` or a
    torch dtype), else ``$WORKBENCH_DTYPE``, else float32.

    Raises:
        WorkbenchError: for any other dtype.
    """
    if isinstance(requested, torch.dtype):
        if requested not in DTYPES.values():
            raise WorkbenchError(f"dtype {requested} is not supported; choose {', '.join(DTYPES)}")
        return requested
    value = (requested if requested is not None else os.environ.get(DTYPE_ENV, "float32")).strip().lower()
    if value not in DTYPES:
        raise WorkbenchError(f"unknown dtype {value!r}: choose {', '.join(DTYPES)}")
    return DTYPES[value]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def choose_device(requested: str | None = None) -> torch.device:
    """The device models are placed on.

    Args:
        requested: ``"auto"`` (default; CUDA when available, else CPU), ``"cpu"``, ``"cuda"``
            or ``"cuda:N"``. ``None`` reads ``$WORKBENCH_DEVICE``.

    Raises:
        WorkbenchError: for an unknown name, or CUDA asked for where torch sees none.
    """
    value = (requested if requested is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    if value == "cuda" or value.startswith("cuda:"):
        index = value.partition(":")[2]
        if index and not index.isdigit():
            raise WorkbenchError(f"device {value!r}: the CUDA index must be a number, e.g. cuda:0")
        if not torch.cuda.is_available():
            raise WorkbenchError(f"device {value!r} requested (via {ENV} or device=) but torch sees no CUDA device; "
                                 "use 'cpu' or 'auto'")
        if index and int(index) >= torch.cuda.device_count():
            raise WorkbenchError(f"device {value!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device(value)
    raise WorkbenchError(f"unknown device {value!r}: choose auto, cpu, cuda or cuda:N")


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` takes its inputs: the device of its first parameter (the embedding,
    also for a model spread over devices by a ``device_map``)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def device_memory_bytes(device: torch.device) -> int | None:
    """A CUDA device's total memory; ``None`` elsewhere (the CPU's bound is the host's, which the
    workbench leaves to the operating system)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)
