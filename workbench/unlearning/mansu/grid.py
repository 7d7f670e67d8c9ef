"""(d) The quantization grid of the moved weights, and the floor rule's targets.

A moved weight is set to the *value of its neighbouring quantization code* in the direction
of the forget gradient (``code_steps`` codes away): ``w_i + Δ_i = code[c_i ± k] · absmax_b``.
That is past the decision boundary by at least half a bin, so the quantized code changes by
construction, and ``Q(w+Δ) = w+Δ`` on the moved weights. A block's absmax element is never
moved (its block scale, and so every other code of the block, stays put).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.quant import BinPlacement, QuantConfig, bin_placement, code_order, code_table


@dataclass(frozen=True, eq=False)
class Grid:
    """Per weight of one tensor (flattened in the weight's own layout): where it sits on the grid.

    Attributes:
        code: ``[numel]`` int16, its code index (as bitsandbytes numbers the codes).
        rank: ``[numel]`` int16, position of its code in ascending code-value order.
        absmax: ``[numel]`` exact absmax of its block (what bnb divides by to pick codes).
        values: ``[n_codes]`` code values in ascending order.
        bin_width: ``[numel]`` local bin width (:class:`workbench.quant.BinGeometry`).
        is_block_max: ``[numel]`` moving it could change the block scale.
    """

    code: torch.Tensor
    rank: torch.Tensor
    absmax: torch.Tensor
    values: torch.Tensor
    bin_width: torch.Tensor
    is_block_max: torch.Tensor

    def part(self, weights: slice) -> Grid:
        """The grid of the flat range ``weights`` (views; the code values are every weight's)."""
        return Grid(code=self.code[weights], rank=self.rank[weights], absmax=self.absmax[weights],
                    values=self.values, bin_width=self.bin_width[weights],
                    is_block_max=self.is_block_max[weights])


def weight_grid(w: torch.Tensor, quant: QuantConfig, *, transposed: bool) -> Grid:
    # bin_placement, not bin_geometry: a grid needs no distances to the boundaries, and above
    # 16M candidate weights it is rebuilt for every tensor twice a round
    return placement_grid(bin_placement(w, quant, transposed=transposed), quant)


def placement_grid(placed: BinPlacement, quant: QuantConfig) -> Grid:
    """The :class:`Grid` of a weight placed as ``placed`` (:func:`~workbench.quant.bin_placement`,
    or a kept :class:`~workbench.quant.PackedPlacement` unpacked)."""
    values = code_table(quant)[code_order(quant)]
    return Grid(
        # int16 codes (≤ 256 of them): 4 bytes per candidate weight instead of 16 as int64
        code=placed.code.to(torch.int16), rank=placed.rank, absmax=placed.absmax.float(), values=values.float(),
        bin_width=placed.bin_width.float(), is_block_max=placed.is_block_max,
    )


def floor_targets(direction: torch.Tensor, grid: Grid, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight (flat): the value of the code ``steps`` away in ``sign(direction)``, and validity.

    The target sits *on* a code value, half a bin or more past the decision boundary, so the
    real quantizer maps it to that code. Invalid where the direction is 0 (or NaN), the code
    would leave the table, or the weight is its block's absmax (moving it rescales the block).
    """
    return sign_targets(direction_sign(direction), grid, steps)


def direction_sign(direction: torch.Tensor) -> torch.Tensor:
    """``sign(direction)`` flat, as int16 (0 where it is 0 or NaN): all the floor rule reads of a
    direction, so a caller can let the float32 direction go before the grid is built."""
    flat = direction.reshape(-1)
    return (flat > 0).to(torch.int16) - (flat < 0).to(torch.int16)


def sign_targets(sign: torch.Tensor, grid: Grid, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`floor_targets` of a direction whose :func:`direction_sign` is ``sign``.

    Ranks are counted in int16 (codes number at most 256): 2 bytes per weight per temporary;
    the target is scaled in place (the same product, one float32 tensor fewer at once).
    """
    target_rank = grid.rank.to(torch.int16) + steps * sign
    n = grid.values.numel()
    valid = (sign != 0) & (target_rank >= 0) & (target_rank < n) & ~grid.is_block_max
    target = grid.values[target_rank.clamp_(0, n - 1).int()].mul_(grid.absmax)
    return target, valid
