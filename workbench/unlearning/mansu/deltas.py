"""What a MANSU run has changed: per candidate tensor, the delta of each weight it moved and which
weights count as moved, held per weight rather than per tensor.

A round moves at most a few thousand weights, spread over the candidate tensors; dense float32
deltas and bool flags cost 5 bytes for every weight of each tensor a round touched (57 MB per MLP
matrix of the scale bench's 1B model; its MANSU peak fell by 0.4–0.7 GiB without them). Here they
cost ~130 bytes per moved weight (Python's dict and set entries). Every read gives what the dense
tensors gave, bit for bit: the values are float32 numbers, stored as the Python floats that hold
them exactly, and a tensor's dense delta is rebuilt (zeros, then the values) only for the step
that reads it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import torch

from workbench.models.update import SparseDelta


class SparseDeltas:
    """The deltas and moved flags of a run over the tensors ``like`` (the base's candidate tensors).

    A tensor counts as written from the first move tried on it (:meth:`touch`, even when the
    Fisher budget then skips the move, as the dense store allocated it there), so :meth:`items`
    lists tensors in the order the rounds first tried them (the update's order, which the Fisher
    bound's sum follows); its moved flags from its first :meth:`mark`. ``[name]`` is the dense
    float32 delta (a fresh tensor: writing into it changes nothing).
    """

    def __init__(self, like: Mapping[str, torch.Tensor]) -> None:
        self._like = like
        self._values: dict[str, dict[int, float]] = {}
        self._moved: dict[str, set[int]] = {}

    def touch(self, name: str) -> None:
        """Count ``name`` as written (it keeps the place it takes now in :meth:`written`)."""
        self._values.setdefault(name, {})

    def at(self, name: str, index: int) -> float:
        """The delta of weight ``index`` (flat) of ``name`` (0.0 when never set)."""
        return self._values.get(name, {}).get(index, 0.0)

    def set(self, name: str, indices: Iterable[int], values: Iterable[float]) -> None:
        """Set the deltas at ``indices``; each value rounded to float32, as a float32 tensor
        would store it."""
        held = self._values.setdefault(name, {})
        for i, v in zip(indices, values, strict=True):
            held[int(i)] = float(np.float32(v))

    def replace(self, name: str, index: torch.Tensor, values: torch.Tensor) -> None:
        """Make the tensor's delta ``values`` (float32) at the flat ``index`` and zero elsewhere."""
        self._values[name] = {}
        self.set(name, index.tolist(), values.to(torch.float32).tolist())

    def mark(self, name: str, indices: Iterable[int], moved: Iterable[bool] | bool = True) -> None:
        """Set the moved flags at ``indices`` (one flag for all, or one each)."""
        flags = self._moved.setdefault(name, set())
        indices = [int(i) for i in indices]
        each = [moved] * len(indices) if isinstance(moved, bool) else [bool(m) for m in moved]
        for i, m in zip(indices, each, strict=True):
            if m:
                flags.add(i)
            else:
                flags.discard(i)

    def mark_only(self, name: str, indices: Iterable[int]) -> None:
        """The moved flags of ``name``: set at ``indices``, clear elsewhere."""
        self._moved[name] = {int(i) for i in indices}

    def sparse(self, name: str) -> SparseDelta:
        """The tensor's delta as the weights it sets (kept in insertion order)."""
        held = self._values.get(name, {})
        like = self._like[name]
        index = torch.tensor(list(held), dtype=torch.long, device=like.device)
        values = torch.tensor(list(held.values()), dtype=torch.float32, device=like.device)
        return SparseDelta(like.shape, index, values)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.sparse(name).dense()

    def after(self, name: str) -> torch.Tensor:
        """w+Δ of ``name`` as stored (:func:`~workbench.models.update.stored_sum` of the base and the delta)."""
        return self.sparse(name).added_to(self._like[name])

    def moved(self, name: str) -> torch.Tensor:
        """The flat bool flags of ``name`` (a fresh tensor)."""
        like = self._like[name]
        flags = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
        flags[torch.tensor(list(self._moved.get(name, ())), dtype=torch.long, device=like.device)] = True
        return flags

    def written(self) -> list[str]:
        """The tensors written (:meth:`touch`), in the order they were first tried."""
        return list(self._values)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Each written tensor's dense delta, built as it is reached."""
        return ((n, self[n]) for n in self._values)

    def moved_names(self) -> list[str]:
        """The tensors with moved flags, sorted."""
        return sorted(self._moved)

    def n_moved(self) -> int:
        return sum(len(flags) for flags in self._moved.values())

    def n_held(self) -> int:
        """How many weights' deltas are held (moved or set back to zero)."""
        return sum(len(held) for held in self._values.values())
