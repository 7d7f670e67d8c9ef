"""The output of every unlearning method: a change to some of the model's parameters.

An :class:`Update` maps HF parameter names to dense deltas of the parameter's shape
(zeros where a parameter is untouched). "After" is always ``base + update``, built as a
new model; the base is never modified. On disk an update is a safetensors file that
stores each delta sparsely (flat indices + values) when that is smaller, so a sparse
MANSU edit of a 135M-parameter model stays a few MB.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.core.computed_weight import WeightAtForward
from workbench.core.errors import WorkbenchError
from workbench.core.files import atomic_write
from workbench.models.loaded import LoadedModel

_FORMAT = "workbench-update/1"


def stored_sum(base: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``w + Δ`` as a real pipeline saves it: summed in float32 (updates accumulate there), then
    rounded once to ``w``'s storage dtype (a no-op rounding for float32 weights)."""
    exact = base.float() + delta.to(base.device, torch.float32)
    return exact if base.dtype == torch.float32 else exact.to(base.dtype)


_ROUNDED_ONCE = (torch.float32, torch.bfloat16, torch.float16)
"""Storage dtypes where ``base + 0.0`` is what adding a float32 zero and rounding back gives."""


@dataclass(frozen=True, eq=False)  # holds tensors: no elementwise ==
class SparseDelta:
    """A delta held as the weights it changes: float32 ``values`` at the flat positions ``index``
    (int64, distinct) of a tensor of ``shape``, zero elsewhere. A run that moves a few thousand
    weights of a 1B model holds them in kilobytes, where a dense float32 delta holds 4 bytes per
    weight of every tensor it touched."""

    shape: torch.Size
    index: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        if self.index.shape != self.values.shape or self.index.ndim != 1:
            raise WorkbenchError(f"a sparse delta needs one value per index, got {tuple(self.index.shape)} "
                                 f"indices and {tuple(self.values.shape)} values")

    @classmethod
    def of(cls, delta: torch.Tensor) -> SparseDelta:
        """Every entry of a dense delta (its zeros too: what it adds is the dense sum's)."""
        flat = delta.detach().reshape(-1)
        return cls(delta.shape, torch.arange(flat.numel(), device=flat.device), flat.to(torch.float32))

    def dense(self) -> torch.Tensor:
        """The delta as a float32 tensor of ``shape`` (a fresh one)."""
        out = torch.zeros(self.shape.numel(), dtype=torch.float32, device=self.values.device)
        out[self.index] = self.values.to(torch.float32)
        return out.view(self.shape)

    def added_to(self, base: torch.Tensor) -> torch.Tensor:
        """``stored_sum(base, self.dense())``, bit for bit, without the dense delta: elsewhere
        ``base + 0.0`` (what adding the dense delta's zeros gives: ``-0.0`` becomes ``+0.0``,
        in the storage dtype as in float32), at ``index`` the float32 sum rounded once."""
        if base.shape != self.shape:
            raise WorkbenchError(f"a delta of shape {tuple(self.shape)} added to a weight of shape {tuple(base.shape)}")
        if not base.is_contiguous() or base.dtype not in _ROUNDED_ONCE:
            # the dense sum's layout (a matmul's bits may follow it); a float64 weight, which
            # stored_sum sums in float32
            return stored_sum(base, self.dense())
        out = base.detach() + 0.0
        flat, index = out.view(-1), self.index.to(base.device)
        flat[index] = stored_sum(base.detach().reshape(-1)[index], self.values)
        return out


class SumAtForward(WeightAtForward):
    """A weight held as the base's tensor and a sparse delta, summed
    (:meth:`SparseDelta.added_to`, which is :func:`stored_sum`) by each forward of its module
    (:func:`~workbench.core.computed_weight.install`): the model at w+Δ without a copy of the
    weight, where the caller keeps the delta anyway (MANSU over every weight of a model). The
    delta is a snapshot: :meth:`hold` the new one after each change."""

    def __init__(self, base: torch.Tensor, delta: SparseDelta) -> None:
        super().__init__(base.shape, base.dtype, base.device)
        self.hold(base, delta)

    def hold(self, base: torch.Tensor, delta: SparseDelta) -> None:
        if base.shape != self.shape or delta.shape != self.shape:
            raise WorkbenchError(f"w+Δ of shapes {tuple(base.shape)} and {tuple(delta.shape)} for a weight "
                                 f"of shape {tuple(self.shape)}")
        self.base, self.delta = base.detach(), delta

    def value(self) -> torch.Tensor:
        return self.delta.added_to(self.base)


@dataclass
class Update:
    """Parameter name -> delta tensor (same shape as the parameter).

    Attributes:
        deltas: the changes; parameters not named are unchanged.
        meta: free-form JSON-safe description (method, model fingerprint, ...).
    """

    deltas: dict[str, torch.Tensor]
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Kept on the CPU whatever device produced them (saved, compared, shipped as is);
        # moved to the model's device only when applied. ``.cpu()`` of a CPU tensor is itself.
        self.deltas = {name: delta.cpu() if isinstance(delta, torch.Tensor) else delta
                       for name, delta in self.deltas.items()}
        for name, delta in self.deltas.items():
            if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
                raise WorkbenchError(f"update entry {name!r} is not a floating-point tensor")
            if not torch.isfinite(delta).all():
                raise WorkbenchError(f"update entry {name!r} contains NaN or inf")

    # --- inspection ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self.deltas)

    def nnz(self) -> int:
        """Number of parameters that change."""
        return int(sum(int((d != 0).sum()) for d in self.deltas.values()))

    def norm(self) -> float:
        """Frobenius norm of the whole update."""
        return float(torch.sqrt(sum((d.double() ** 2).sum() for d in self.deltas.values()) or torch.tensor(0.0)))

    def nnz_by_param(self) -> dict[str, int]:
        return {name: int((d != 0).sum()) for name, d in sorted(self.deltas.items())}

    def is_empty(self) -> bool:
        return self.nnz() == 0

    # --- algebra ------------------------------------------------------------------------
    def check_fits(self, model: LoadedModel) -> None:
        """Raise if a name is not a parameter of ``model`` or a shape differs."""
        params = dict(model.hf.named_parameters())
        for name, delta in self.deltas.items():
            if name not in params:
                raise WorkbenchError(f"update names {name!r}, which model {model.name!r} does not have")
            if tuple(params[name].shape) != tuple(delta.shape):
                raise WorkbenchError(
                    f"update for {name!r} has shape {tuple(delta.shape)}, the model's parameter "
                    f"{tuple(params[name].shape)}"
                )

    def after_state(self, base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New tensors ``base[name] + delta`` for every updated name (base untouched), as stored:
        added in float32 and rounded once to the base's dtype (:func:`stored_sum`)."""
        return {name: stored_sum(base[name].detach(), delta) for name, delta in self.deltas.items()}

    def apply(self, model: LoadedModel, name: str | None = None) -> LoadedModel:
        """The after-model ``base + update`` as a new :class:`LoadedModel`."""
        self.check_fits(model)
        return model.with_state(self.after_state(model.state()), name or f"{model.name}+update")

    def scaled(self, factor: float) -> Update:
        return Update({k: v * factor for k, v in self.deltas.items()}, dict(self.meta))

    def restricted(self, masks: Mapping[str, torch.Tensor]) -> Update:
        """Only the entries where ``masks[name]`` is True (names without a mask are dropped)."""
        return Update(
            {k: v * masks[k].to(v.dtype) for k, v in self.deltas.items() if k in masks}, dict(self.meta)
        )

    @classmethod
    def between(cls, base: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> Update:
        """The update taking ``base`` to ``after`` (names whose tensors differ)."""
        deltas = {}
        for name, tensor in after.items():
            delta = tensor.detach().float() - base[name].detach().float()
            if bool((delta != 0).any()):
                deltas[name] = delta
        return cls(deltas)

    # --- persistence --------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically as safetensors (sparse entries where that is smaller)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        layout: dict[str, dict[str, object]] = {}
        for i, (name, delta) in enumerate(sorted(self.deltas.items())):
            flat = delta.detach().reshape(-1).contiguous()
            idx = torch.nonzero(flat, as_tuple=False).reshape(-1)
            # Sparse costs 12 bytes per entry (int64 index + fp32 value), dense 4 per weight.
            if idx.numel() * 3 < flat.numel():
                tensors[f"{i}.idx"] = idx.to(torch.int64)
                tensors[f"{i}.val"] = flat[idx].to(torch.float32).contiguous()
                layout[str(i)] = {"name": name, "shape": list(delta.shape), "sparse": True}
            else:
                tensors[f"{i}.dense"] = flat.to(torch.float32)
                layout[str(i)] = {"name": name, "shape": list(delta.shape), "sparse": False}
        metadata = {"format": _FORMAT, "layout": json.dumps(layout), "meta": json.dumps(self.meta)}
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Update:
        """Read an update written by :meth:`save` (safetensors only: no pickle)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise WorkbenchError(f"no update file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != _FORMAT:
                    raise WorkbenchError(f"{path} is not a workbench update (format {metadata.get('format')!r})")
                layout = json.loads(metadata["layout"])
                deltas: dict[str, torch.Tensor] = {}
                for key, entry in layout.items():
                    shape = tuple(int(s) for s in entry["shape"])
                    numel = 1
                    for s in shape:
                        numel *= s
                    if entry["sparse"]:
                        idx = f.get_tensor(f"{key}.idx")
                        val = f.get_tensor(f"{key}.val")
                        if idx.numel() and (int(idx.max()) >= numel or int(idx.min()) < 0):
                            raise WorkbenchError(f"{path}: index out of range for {entry['name']}")
                        flat = torch.zeros(numel, dtype=torch.float32)
                        flat[idx] = val
                    else:
                        flat = f.get_tensor(f"{key}.dense")
                        if flat.numel() != numel:
                            raise WorkbenchError(f"{path}: {entry['name']} has the wrong number of values")
                    deltas[str(entry["name"])] = flat.reshape(shape)
                meta = json.loads(metadata.get("meta", "{}"))
        except WorkbenchError:
            raise
        except Exception as exc:  # safetensors/json raise several types for a damaged file
            raise WorkbenchError(f"{path} is not a readable update file: {exc}") from exc
        return cls(deltas, meta)
