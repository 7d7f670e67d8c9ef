"""The output of every unlearning method: a change to some of the model's parameters.

An :class:`Update` maps HF parameter names to deltas of the parameter's shape, each held dense
or as the weights it changes (:class:`SparseDelta`, zeros elsewhere). "After" is always
``base + update``, built as a new model; the base is never modified. On disk an update is a
safetensors file that stores each delta sparsely (flat indices + values) when that is smaller,
so a sparse MANSU edit of a 135M-parameter model stays a few MB, on disk and in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
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

    def to(self, device: torch.device | str) -> SparseDelta:
        """The same delta with its index and values on ``device`` (itself when they are there)."""
        device = torch.device(device)
        if self.index.device == device and self.values.device == device:
            return self
        return SparseDelta(self.shape, self.index.to(device), self.values.to(device))

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


def _checked_entry(name: str, delta: object) -> torch.Tensor | SparseDelta:
    """``delta`` on the CPU, refused when it is not a finite floating-point delta."""
    if isinstance(delta, SparseDelta):
        delta = delta.to("cpu")
        numel = delta.shape.numel()
        if delta.index.numel() and (int(delta.index.min()) < 0 or int(delta.index.max()) >= numel):
            raise WorkbenchError(f"update entry {name!r} has an index out of range for shape {tuple(delta.shape)}")
        if torch.unique(delta.index).numel() != delta.index.numel():
            raise WorkbenchError(f"update entry {name!r} sets a weight twice")
    elif isinstance(delta, torch.Tensor):
        delta = delta.cpu()
    else:
        raise WorkbenchError(f"update entry {name!r} is not a floating-point tensor")
    values = _values(delta)
    if not values.is_floating_point():
        raise WorkbenchError(f"update entry {name!r} is not a floating-point tensor")
    if not torch.isfinite(values).all():
        raise WorkbenchError(f"update entry {name!r} contains NaN or inf")
    return delta


def _values(delta: torch.Tensor | SparseDelta) -> torch.Tensor:
    """The numbers a delta holds (a sparse one's zeros elsewhere are not among them)."""
    return delta.values if isinstance(delta, SparseDelta) else delta


class DenseDeltas(Mapping[str, torch.Tensor]):
    """An update's deltas as dense float32 tensors, in the update's order. A sparse entry is
    made dense on each read, so a loop over the update holds one dense delta at a time, not all of them."""

    def __init__(self, held: Mapping[str, torch.Tensor | SparseDelta]) -> None:
        self._held = held

    def __getitem__(self, name: str) -> torch.Tensor:
        held = self._held[name]
        return held.dense() if isinstance(held, SparseDelta) else held

    def __contains__(self, name: object) -> bool:  # without making the delta (Mapping's would)
        return name in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def __len__(self) -> int:
        return len(self._held)


class Update:
    """Parameter name -> delta (the parameter's shape), each held dense or as a :class:`SparseDelta`
    (MANSU's: a few thousand moved weights of a tensor held as those weights, not as the tensor).

    Attributes:
        meta: free-form JSON-safe description (method, model fingerprint, ...).
    """

    def __init__(self, deltas: Mapping[str, torch.Tensor | SparseDelta], meta: Mapping[str, str] | None = None) -> None:
        # Kept on the CPU whatever device produced them (saved, compared, shipped as is);
        # moved to the model's device only when applied. ``.cpu()`` of a CPU tensor is itself.
        self._held = {name: _checked_entry(name, delta) for name, delta in deltas.items()}
        self.meta: dict[str, str] = dict(meta or {})

    @property
    def deltas(self) -> DenseDeltas:
        """Name -> dense float32 delta (a sparse one made on each read); names not here are unchanged."""
        return DenseDeltas(self._held)

    def held(self, name: str) -> torch.Tensor | SparseDelta:
        """The delta of ``name`` as the update holds it."""
        return self._held[name]

    def only(self, names: Collection[str]) -> Update:
        """The entries named in ``names`` (shared, not copied)."""
        return Update({n: d for n, d in self._held.items() if n in names}, self.meta)

    # --- inspection ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return sorted(self._held)

    def nnz(self) -> int:
        """Number of parameters that change."""
        return sum(self.nnz_by_param().values())

    def norm(self) -> float:
        """Frobenius norm of the whole update."""
        return float(torch.sqrt(sum((_values(d).double() ** 2).sum() for d in self._held.values())
                                or torch.tensor(0.0)))

    def nnz_by_param(self) -> dict[str, int]:
        return {name: int((_values(d) != 0).sum()) for name, d in sorted(self._held.items())}

    def is_empty(self) -> bool:
        return self.nnz() == 0

    # --- algebra ------------------------------------------------------------------------
    def check_fits(self, model: LoadedModel) -> None:
        """Raise if a name is not a parameter of ``model`` or a shape differs."""
        params = dict(model.hf.named_parameters())
        for name, delta in self._held.items():
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
        return {name: self.added_to(name, base[name]) for name in self._held}

    def added_to(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """``stored_sum(base, self.deltas[name])`` (a sparse entry without its dense delta)."""
        held = self._held[name]
        return held.added_to(base.detach()) if isinstance(held, SparseDelta) else stored_sum(base.detach(), held)

    def apply(self, model: LoadedModel, name: str | None = None) -> LoadedModel:
        """The after-model ``base + update`` as a new :class:`LoadedModel`."""
        self.check_fits(model)
        return model.with_state(self.after_state(model.state()), name or f"{model.name}+update")

    def scaled(self, factor: float) -> Update:
        return Update({k: v * factor for k, v in self.deltas.items()}, self.meta)

    def restricted(self, masks: Mapping[str, torch.Tensor]) -> Update:
        """Only the entries where ``masks[name]`` is True (names without a mask are dropped)."""
        return Update(
            {k: v * masks[k].to(v.dtype) for k, v in self.deltas.items() if k in masks}, self.meta
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
        for i, name in enumerate(self.names):  # one dense delta at a time
            delta = self.deltas[name]
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
                deltas: dict[str, torch.Tensor | SparseDelta] = {}
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
                        # held as written: a sparse MANSU edit stays kilobytes in memory too
                        deltas[str(entry["name"])] = SparseDelta(torch.Size(shape), idx, val)
                    else:
                        flat = f.get_tensor(f"{key}.dense")
                        if flat.numel() != numel:
                            raise WorkbenchError(f"{path}: {entry['name']} has the wrong number of values")
                        deltas[str(entry["name"])] = flat.reshape(shape)
                meta = json.loads(metadata.get("meta", "{}"))
                return cls(deltas, meta)
        except WorkbenchError as exc:
            if str(path) in str(exc):
                raise
            raise WorkbenchError(f"{path}: {exc}") from exc  # refused by the constructor's checks
        except Exception as exc:  # safetensors/json raise several types for a damaged file
            raise WorkbenchError(f"{path} is not a readable update file: {exc}") from exc
