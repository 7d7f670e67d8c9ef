"""workbench.quant against bitsandbytes itself: codes, scales, dequantized values, bin geometry."""

from __future__ import annotations

import copy
import json
import math

import bitsandbytes.functional as bnbf
import numpy as np
import pytest
import torch

from workbench.core.errors import WorkbenchError
from workbench.quant import (
    RATIO_EDGES,
    QuantConfig,
    bin_geometry,
    bin_histogram,
    bin_occupancy,
    code_order,
    code_table,
    compare_quantization,
    decision_boundaries,
    fake_quantize_model,
    fake_quantize_state,
    quantizable_parameters,
    quantize_codes,
    quantize_dequantize,
    quantize_weight,
    transposed_parameters,
    weight_relative_error,
)

NF4_REFERENCE = [
    -1.0, -0.69619, -0.52507, -0.39492, -0.28444, -0.18477, -0.09105, 0.0,
    0.07958, 0.16093, 0.24611, 0.33792, 0.44071, 0.56262, 0.72296, 1.0,
]  # fmt: skip

# (rows, cols): 150 and 975 values are not multiples of any blocksize (bnb's short last
# block), (64, 128) is, (5, 3) has odd numel (bnb pads the last byte)
SHAPES = [(3, 50), (25, 39), (64, 128), (5, 3)]


@pytest.fixture(autouse=True, scope="module")
def _eager_bnb_fallbacks():
    # bnb's pure-torch fallback kernels (odd-length dequantization) are torch.compile-d
    # per shape, seconds each; eager mode runs the same ops
    with torch._dynamo.config.patch(disable=True):
        yield


def _rng_weight(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


def _unpack_reference(packed: torch.Tensor, n: int) -> np.ndarray:
    """bnb's packed bytes -> one code per weight, earlier weight in the high nibble."""
    b = packed.reshape(-1).numpy()
    return np.stack([b >> 4, b & 0x0F], axis=1).reshape(-1)[:n]


# ----------------------------------------------------------------------------- config


def test_config_label_roundtrip_and_validation() -> None:
    cfg = QuantConfig("nf4")
    assert cfg.label == "nf4/b64" and cfg.n_codes == 16 and cfg.bits == 4
    full = QuantConfig("fp4", 128, True, True, True)
    assert full.label == "fp4/b128/dq+emb+head"
    for c in (cfg, full, QuantConfig("int8", 256)):
        assert QuantConfig.from_label(c.label) == c
        assert QuantConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert QuantConfig("int8").n_codes == 256


@pytest.mark.parametrize(
    "kwargs",
    [
        {"type": "nf8"},
        {"type": "NF4"},
        {"type": "nf4", "blocksize": 48},
        {"type": "nf4", "blocksize": 8192},
        {"type": "int8", "blocksize": 32},
        {"type": "nf4", "blocksize": True},
        {"type": "nf4", "blocksize": 64.0},
        {"type": "nf4", "double_quant": 1},
        {"type": "nf4", "include_embeddings": "yes"},
        {"type": "nf4", "include_lm_head": None},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(WorkbenchError):
        QuantConfig(**kwargs)


def test_config_bad_label_and_dict() -> None:
    for bad in ("nf4", "nf4/64", "q4/b64", "nf4/b48"):
        with pytest.raises(WorkbenchError):
            QuantConfig.from_label(bad)
    with pytest.raises(WorkbenchError):
        QuantConfig.from_dict({"type": "nf4", "bits": 4})
    with pytest.raises(WorkbenchError):
        QuantConfig.from_dict({"blocksize": 64})


# ----------------------------------------------------------------------------- code tables


def test_nf4_table_matches_reference_and_bnb() -> None:
    table = code_table(QuantConfig("nf4"))
    assert torch.equal(table, bnbf.get_4bit_type("nf4", device="cpu"))
    np.testing.assert_allclose(table.numpy(), NF4_REFERENCE, atol=5e-6)
    assert torch.equal(code_order(QuantConfig("nf4")), torch.arange(16))


def test_fp4_order_matches_bnb_quantizer() -> None:
    from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

    _bounds, order = _get_4bit_quantize_bounds("fp4", torch.device("cpu"))
    assert torch.equal(code_order(QuantConfig("fp4")), order)
    table = code_table(QuantConfig("fp4"))
    assert torch.equal(table, bnbf.get_4bit_type("fp4", device="cpu"))


def test_decision_boundaries() -> None:
    for qtype in ("nf4", "fp4"):
        cfg = QuantConfig(qtype)
        v = code_table(cfg)[code_order(cfg)]
        # measured from bnb, and exactly the midpoints
        assert torch.equal(decision_boundaries(cfg), (v[:-1] + v[1:]) / 2)
    cfg = QuantConfig("int8")
    t = decision_boundaries(cfg)
    v = code_table(cfg)
    assert t.shape == (255,) and torch.all(t[1:] >= t[:-1])
    # away from zero bnb's CPU search lands within a small fraction of a gap of the midpoint
    mid = (v[:-1] + v[1:]) / 2
    far = mid.abs() > 1e-2
    assert torch.all(((t - mid).abs() / (v[1:] - v[:-1]))[far] < 0.05)


def test_int8_table_is_bnb_dynamic_map() -> None:
    _, state = bnbf.quantize_blockwise(torch.randn(300), blocksize=64)
    assert torch.equal(code_table(QuantConfig("int8")), state.code)


def test_nibble_order_high_nibble_first() -> None:
    # NF4: -absmax -> code 0, +absmax -> code 15; bnb packs them as one byte 0x0F
    w = torch.tensor([-2.0, 2.0])
    packed, _ = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert packed.reshape(-1).tolist() == [0x0F]
    assert quantize_codes(w, QuantConfig("nf4")).codes.tolist() == [0, 15]


# ----------------------------------------------------------------------------- codes vs bnb


def _check_4bit_against_bnb(w: torch.Tensor, cfg: QuantConfig) -> None:
    n = w.numel()
    packed, state = bnbf.quantize_4bit(
        w, blocksize=cfg.blocksize, compress_statistics=cfg.double_quant, quant_type=cfg.type
    )
    qw = quantize_codes(w, cfg)
    assert qw.codes.dtype == torch.uint8 and qw.codes.shape == (n,)
    assert np.array_equal(qw.codes.numpy(), _unpack_reference(packed, n)), tuple(w.shape)
    assert qw.n_blocks == -(-n // cfg.blocksize)
    if cfg.double_quant:
        eff = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert torch.equal(qw.absmax, eff)
        if qw.n_blocks > 2:  # one block: value - mean offset = 0 is stored exactly
            assert not torch.equal(qw.absmax, qw.absmax_exact)
    else:
        assert torch.equal(qw.absmax, state.absmax) and torch.equal(qw.absmax_exact, state.absmax)
    # flat layout: bnb's AVX-512 CPU kernel is only right for rows that hold whole blocks
    flat_state = copy.copy(state)
    flat_state.shape = torch.Size([n])
    expected = bnbf.dequantize_4bit(packed, flat_state).reshape(w.shape)
    got = qw.dequantize()
    assert got.shape == w.shape and got.dtype == w.dtype
    assert torch.equal(got, expected), tuple(w.shape)


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [64, 128, 256])
@pytest.mark.parametrize("dq", [False, True])
def test_4bit_codes_and_values_match_bnb(qtype: str, bs: int, dq: bool) -> None:
    cfg = QuantConfig(qtype, bs, dq)
    for i, shape in enumerate(SHAPES):
        _check_4bit_against_bnb(_rng_weight(shape, seed=i), cfg)
    w = _rng_weight(SHAPES[0])
    assert torch.equal(quantize_dequantize(w, cfg), quantize_codes(w, cfg).dequantize())


@pytest.mark.parametrize("bs", [32, 4096])
def test_4bit_extreme_blocksizes(bs: int) -> None:
    for qtype in ("nf4", "fp4"):
        _check_4bit_against_bnb(_rng_weight((25, 39)), QuantConfig(qtype, bs, bs == 32))


def test_codes_do_not_depend_on_double_quant() -> None:
    w = _rng_weight((40, 64))
    for qtype in ("nf4", "fp4", "int8"):
        a = quantize_codes(w, QuantConfig(qtype))
        b = quantize_codes(w, QuantConfig(qtype, double_quant=True))
        assert torch.equal(a.codes, b.codes) and torch.equal(a.absmax_exact, b.absmax_exact)


def test_4bit_native_layout_when_rows_hold_whole_blocks() -> None:
    # 128-wide rows, blocksize 64: bnb's own 2-D dequantization is right, and equal to ours
    w = _rng_weight((64, 128))
    for qtype in ("nf4", "fp4"):
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type=qtype)
        assert torch.equal(quantize_dequantize(w, QuantConfig(qtype)), bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes(dtype: torch.dtype) -> None:
    w = _rng_weight((16, 64)).to(dtype)
    q = quantize_dequantize(w, QuantConfig("nf4"))
    assert q.dtype == dtype and q.shape == w.shape
    ref = quantize_dequantize(w.float(), QuantConfig("nf4"))
    assert torch.allclose(q.float(), ref, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("bs,dq", [(64, False), (128, True), (256, False)])
def test_int8_codes_and_values_match_bnb(bs: int, dq: bool) -> None:
    cfg = QuantConfig("int8", bs, dq)
    for i, shape in enumerate(SHAPES):
        w = _rng_weight(shape, seed=10 + i)
        q, state = bnbf.quantize_blockwise(w, blocksize=bs, nested=dq)
        qw = quantize_codes(w, cfg)
        assert torch.equal(qw.codes, q.reshape(-1))
        assert torch.equal(qw.dequantize(), bnbf.dequantize_blockwise(q, state))
        if dq:
            assert torch.equal(qw.absmax, bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset)
        else:
            assert torch.equal(qw.absmax, state.absmax)


def test_transposed_layout_is_bnb_on_the_transpose() -> None:
    w = _rng_weight((48, 80))
    cfg = QuantConfig("nf4")
    qw = quantize_codes(w, cfg, transposed=True)
    packed, _ = bnbf.quantize_4bit(w.t().contiguous(), blocksize=64, quant_type="nf4")
    assert np.array_equal(qw.codes.numpy(), _unpack_reference(packed, w.numel()))
    assert torch.equal(qw.codes_like_weight(), quantize_codes(w.t().contiguous(), cfg).codes.reshape(80, 48).t())
    assert torch.equal(quantize_dequantize(w, cfg, transposed=True), quantize_dequantize(w.t(), cfg).t())
    assert not torch.equal(quantize_dequantize(w, cfg, transposed=True), quantize_dequantize(w, cfg))


def test_all_zero_blocks() -> None:
    w = torch.zeros(200)
    w[64:128] = torch.randn(64)
    for qtype in ("nf4", "fp4", "int8"):
        cfg = QuantConfig(qtype)
        q = quantize_dequantize(w, cfg)
        assert torch.all(q[:64] == 0) and torch.all(q[128:] == 0)
        g = bin_geometry(w, cfg)
        assert torch.all(g.bin_width[:64] == 0)
        assert not torch.isnan(g.to_upper).any() and not torch.isnan(g.to_lower).any()


# ----------------------------------------------------------------------------- bin geometry


def _ranks(x: torch.Tensor, cfg: QuantConfig, transposed: bool) -> torch.Tensor:
    return bin_geometry(x, cfg, transposed=transposed).rank


@pytest.mark.parametrize(
    "qtype,bs,dq",
    [
        ("nf4", 64, False),
        ("nf4", 128, True),
        ("fp4", 64, False),
        ("fp4", 256, True),
        ("int8", 64, False),
        ("int8", 128, True),
    ],
)
@pytest.mark.parametrize("transposed", [False, True])
def test_boundary_distances_flip_codes_under_bnb(qtype: str, bs: int, dq: bool, transposed: bool) -> None:
    cfg = QuantConfig(qtype, bs, dq)
    w = _rng_weight((25, 39), seed=3)
    w.view(-1)[::37] *= 1e-3  # populate the small codes (FP4's +-0 pair, int8's fine region)
    g = bin_geometry(w, cfg, transposed=transposed)
    qw = quantize_codes(w, cfg, transposed=transposed)
    assert torch.equal(g.code, qw.codes_like_weight())
    assert torch.all(g.to_upper >= 0) and torch.all(g.to_lower <= 0)
    if qtype != "int8":  # 4-bit thresholds are the midpoints: the interval is the bin
        inner = torch.isfinite(g.to_upper) & torch.isfinite(g.to_lower)
        assert torch.allclose((g.to_upper - g.to_lower)[inner], g.bin_width[inner], rtol=1e-4, atol=1e-9)
    eps = 1e-3 * g.bin_width

    up = torch.isfinite(g.to_upper) & ~g.is_block_max
    down = torch.isfinite(g.to_lower) & ~g.is_block_max
    assert up.sum() > 0.8 * w.numel() and down.sum() > 0.8 * w.numel()

    # every selected weight moves at once; none reaches its block's absmax, so the
    # block scales stay put and each code flips by exactly one rank (or not at all)
    # (int8 on CPU can skip codes bnb never emits, so "next code" is the next reachable one)
    step = 1 if qtype != "int8" else None
    over_up = _ranks(w + torch.where(up, g.to_upper + eps, 0.0), cfg, transposed)
    assert torch.equal(over_up[~up], g.rank[~up])
    assert torch.all(over_up[up] > g.rank[up])
    assert step is None or torch.all(over_up[up] == g.rank[up] + step)
    under_up = w + torch.where(up, g.to_upper - eps, 0.0)
    assert torch.equal(_ranks(under_up, cfg, transposed), g.rank)
    over_down = _ranks(w + torch.where(down, g.to_lower - eps, 0.0), cfg, transposed)
    assert torch.equal(over_down[~down], g.rank[~down])
    assert torch.all(over_down[down] < g.rank[down])
    assert step is None or torch.all(over_down[down] == g.rank[down] - step)
    under_down = w + torch.where(down, g.to_lower + eps, 0.0)
    assert torch.equal(_ranks(under_down, cfg, transposed), g.rank)


def test_bin_width_definition_nf4() -> None:
    cfg = QuantConfig("nf4")
    v = code_table(cfg)
    w = torch.cat([torch.tensor([1.0]), v[1:-1] * 0.999, torch.tensor([-0.99])])  # one block, absmax 1
    g = bin_geometry(w, cfg)
    assert g.code.tolist() == [15, *range(1, 15), 0]
    interior = (v[2:] - v[:-2]) / 2
    assert torch.allclose(g.bin_width[1:15], interior)
    assert math.isclose(g.bin_width[0].item(), (v[15] - v[14]).item(), rel_tol=1e-6)
    assert math.isclose(g.bin_width[15].item(), (v[1] - v[0]).item(), rel_tol=1e-6)
    assert g.to_upper[0].item() == math.inf and g.to_lower[15].item() == -math.inf
    assert g.is_block_max.tolist() == [True] + [False] * 15
    lo, hi = 0.0796, 0.3038  # docs/SCIENCE.md §2.2: NF4 gaps 0.0796 ... 0.3038
    gaps = v[1:] - v[:-1]
    assert abs(gaps.min().item() - lo) < 1e-4 and abs(gaps.max().item() - hi) < 1e-4


@pytest.mark.parametrize("qtype,bs", [("nf4", 64), ("nf4", 128), ("fp4", 64), ("int8", 256)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_placement_unpacks_to_bin_geometrys_values_in_a_byte_per_weight(
        qtype: str, bs: int, transposed: bool, dtype: torch.dtype) -> None:
    """A placement kept packed (codes and block absmaxes) unpacks, from the same weight, to every
    field :func:`bin_geometry` computes with the quantizer, including a last partial block and
    an all-zero block; it holds a byte per weight and one float per block."""
    from workbench.quant import packed_placement, unpack_placement

    cfg = QuantConfig(qtype, bs)
    w = _rng_weight((45, 37), seed=11).to(dtype)  # 1,665 weights: the last block is partial
    w[:7], w[:, :6] = 0.0, 0.0  # the first block all zero in either layout (up to 256 a block)
    packed = packed_placement(w, cfg, transposed=transposed)
    assert packed.code.dtype == torch.uint8 and packed.nbytes() == w.numel() + 4 * math.ceil(w.numel() / bs)
    placed, geo = unpack_placement(packed, w), bin_geometry(w, cfg, transposed=transposed)
    assert torch.equal(placed.code, geo.code.reshape(-1)) and placed.rank.dtype == torch.int16
    assert torch.equal(placed.rank.long(), geo.rank.reshape(-1))
    for mine, theirs in ((placed.absmax, geo.absmax), (placed.bin_width, geo.bin_width),
                         (placed.is_block_max, geo.is_block_max)):
        assert torch.equal(mine, theirs.reshape(-1))
    assert bool(placed.is_block_max.any()) and bool((placed.bin_width == 0).any())
    with pytest.raises(WorkbenchError, match="packed from one of shape"):
        unpack_placement(packed, w.t())


# ----------------------------------------------------------------------------- comparison


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"a.weight": _rng_weight((32, 96), seed), "b.weight": _rng_weight((25, 39), seed + 1)}


@pytest.mark.parametrize("qtype", ["nf4", "fp4", "int8"])
def test_compare_zero_delta(qtype: str) -> None:
    base = _state()
    cfg = QuantConfig(qtype)
    for delta in ({k: torch.zeros_like(v) for k, v in base.items()}, {}):
        r = compare_quantization(base, delta, list(base), cfg)
        for m in (*r.modules, r.overall):
            assert m.code_flips == 0 and m.n_changed == 0 and m.absmax_changes == 0
            assert m.bucket_overlap == 1.0 and m.direction_agreement is None and m.ratio_median is None
        assert r.overall.n_weights == sum(v.numel() for v in base.values())
        json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("qtype,dq", [("nf4", False), ("fp4", True), ("int8", False)])
def test_compare_counts_exactly_the_planted_flips(qtype: str, dq: bool) -> None:
    cfg = QuantConfig(qtype, double_quant=dq)
    base = _state(5)
    name = "a.weight"
    w = base[name]
    g = bin_geometry(w, cfg)
    gen = torch.Generator().manual_seed(1)
    ok = (torch.isfinite(g.to_upper) & torch.isfinite(g.to_lower) & ~g.is_block_max).view(-1)
    ok &= ((g.to_upper > 0.2 * g.bin_width) & (g.to_lower < -0.2 * g.bin_width)).view(-1)
    cand = torch.nonzero(ok).squeeze(1)
    pick = cand[torch.randperm(cand.numel(), generator=gen)[:40]]
    flip_up, flip_down, stay = pick[:10], pick[10:20], pick[20:]
    d = torch.zeros_like(w).view(-1)
    eps = 1e-3 * g.bin_width.view(-1)
    d[flip_up] = g.to_upper.view(-1)[flip_up] + eps[flip_up]
    d[flip_down] = g.to_lower.view(-1)[flip_down] - eps[flip_down]
    up_half = torch.arange(stay.numel()) % 2 == 0
    d[stay] = 0.5 * torch.where(up_half, g.to_upper.view(-1)[stay], g.to_lower.view(-1)[stay])
    delta = {name: d.view_as(w)}

    r = compare_quantization(base, delta, list(base), cfg)
    m = r.module(name)
    assert m.n_changed == 40 and m.code_flips == 20 and m.changed_flips == 20 and m.agreeing_flips == 20
    assert m.absmax_changes == 0 and m.scale_changes == 0
    assert m.stable_weights == w.numel() - 20
    assert m.changed_flip_fraction == 0.5 and m.direction_agreement == 1.0
    ratio = (d[pick].abs() / g.bin_width.view(-1)[pick]).double().numpy()
    assert math.isclose(m.ratio_median, float(np.median(ratio)), rel_tol=1e-9)
    assert math.isclose(m.ratio_p90, float(np.quantile(ratio, 0.9)), rel_tol=1e-9)
    assert sum(m.ratio_counts) + m.ratio_below + m.ratio_above == 40
    assert len(m.ratio_counts) == len(RATIO_EDGES) - 1
    # Q(w+d) - Q(w) is nonzero exactly at the flips; check the projection against a direct computation
    q0 = quantize_dequantize(w, cfg).double()
    q1 = quantize_dequantize(w + delta[name], cfg).double()
    dd = delta[name].double()
    assert math.isclose(m.update_projection, float(((q1 - q0) * dd).sum() / (dd * dd).sum()), rel_tol=1e-6)
    other = r.module("b.weight")
    assert other.n_changed == 0 and other.code_flips == 0
    assert r.overall.code_flips == 20 and r.overall.n_changed == 40
    # overall quantiles are histogram estimates of the same distribution
    assert math.isclose(r.overall.ratio_median, m.ratio_median, rel_tol=0.02)
    json.dumps(r.to_dict(), allow_nan=False)


@pytest.mark.parametrize("dq", [False, True])
def test_compare_detects_absmax_change(dq: bool) -> None:
    cfg = QuantConfig("nf4", double_quant=dq)
    w = _rng_weight((16, 64), seed=9)  # 16 full blocks of 64
    block = 3
    seg = w.view(-1)[block * 64 : (block + 1) * 64]
    j = int(seg.abs().argmax())
    d = torch.zeros_like(w)
    d.view(-1)[block * 64 + j] = seg[j] * 0.5  # the block max grows by half
    r = compare_quantization({"w": w}, {"w": d}, ["w"], cfg)
    m = r.module("w")
    assert m.absmax_changes == 1 and m.n_changed == 1
    assert m.stable_weights == w.numel() - 64  # the whole rescaled block left its buckets
    assert m.code_flips > 0 and m.changed_flips == 0  # the max keeps its top code
    flips = quantize_codes(w, cfg).codes != quantize_codes(w + d, cfg).codes
    assert torch.nonzero(flips).squeeze(1).div(64, rounding_mode="floor").unique().tolist() == [block]
    if dq:
        assert m.scale_changes >= 1
    else:
        assert m.scale_changes == 1


def test_ratio_quantiles_exact_then_estimated() -> None:
    cfg = QuantConfig("nf4")
    w = _rng_weight((320, 256), seed=6)  # 81,920 weights: above the exact-quantile limit
    d = torch.randn(320, 256, generator=torch.Generator().manual_seed(7)) * 1e-3
    ratio = (d.abs() / bin_geometry(w, cfg).bin_width).double().numpy().ravel()
    for n_rows in (40, 320):  # 10,240 changed (exact) / 81,920 changed (histogram estimate)
        dm = d.clone()
        dm[n_rows:] = 0
        m = compare_quantization({"w": w}, {"w": dm}, ["w"], cfg).module("w")
        r = ratio[: n_rows * 256]
        tol = 1e-9 if n_rows == 40 else 6e-3
        assert math.isclose(m.ratio_median, float(np.median(r)), rel_tol=tol)
        assert math.isclose(m.ratio_p90, float(np.quantile(r, 0.9)), rel_tol=tol)
        hist, _ = np.histogram(r, bins=np.array(RATIO_EDGES))
        assert abs(np.asarray(m.ratio_counts) - hist).sum() <= 0.001 * r.size  # float32 log10 at edges


def test_compare_transposed_matches_quantizing_the_transpose() -> None:
    cfg = QuantConfig("nf4")
    w = _rng_weight((48, 80), seed=2)
    d = torch.randn(48, 80, generator=torch.Generator().manual_seed(3)) * 1e-3
    a = compare_quantization({"w": w}, {"w": d}, ["w"], cfg, transposed={"w", "unused"}).module("w")
    b = compare_quantization({"w": w.t().contiguous()}, {"w": d.t().contiguous()}, ["w"], cfg).module("w")
    assert a == b


_STREAM_PROBE = """
import sys, torch
from workbench.faces.bench import PeakMemory
from workbench.quant import QuantConfig, compare_quantization

def peak_mb(n):
    g = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(2048, 2048, generator=g) for i in range(n)}
    delta = {k: torch.zeros_like(v).index_fill_(0, torch.tensor([3, 700]), 0.5) for k, v in base.items()}
    with PeakMemory() as mem:
        result = compare_quantization(base, delta, list(base), QuantConfig("nf4"), progress=lambda *_: None)
    assert result.overall.n_changed == n * 2 * 2048
    return mem.peak_mb

peak_mb(1)  # warm-up: bitsandbytes' first call allocates its own buffers
print(peak_mb(2), peak_mb(12))
"""


def test_compare_streams_so_its_peak_does_not_grow_with_the_model() -> None:
    """The analysis holds one weight's working set at a time (after = base + delta, its codes
    and bin geometry) and keeps only summaries: analysing 12 weights of 16 MiB peaks no higher
    than analysing 2, where holding every after-copy would add 160 MiB or more. Resident
    memory is the kernel's high-water mark, and the measurement runs in a fresh interpreter, so
    what earlier tests left on the heap cannot move it. glibc's mmap threshold is pinned at 1 MiB:
    by default it grows after the first 16 MiB buffer is freed, later buffers then come from the
    heap and fragment it, and the peak wandered by up to 90 MiB between identical runs (a CI
    failure: 106 vs 199 MiB); pinned, repeated runs agree within 2 MiB."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(
        [sys.executable, "-c", _STREAM_PROBE], capture_output=True, text=True, timeout=600, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    small, large = map(float, done.stdout.split()[-2:])
    one_weight = 2048 * 2048 * 4 / 2**20
    assert large - small < 5 * one_weight, (small, large)


@pytest.mark.parametrize("dq", [False, True])
def test_compare_dense_small_update_dithers_through(dq: bool) -> None:
    # docs/SCIENCE.md §6.3: tiny dense updates flip few codes, mostly along Δ
    cfg = QuantConfig("nf4", double_quant=dq)
    w = _rng_weight((128, 256), seed=4)
    d = torch.randn(128, 256, generator=torch.Generator().manual_seed(5)) * 2e-5
    m = compare_quantization({"w": w}, {"w": d}, ["w"], cfg).overall
    assert m.n_changed == w.numel()
    assert 0 < m.code_flips < 0.05 * w.numel() and m.code_overlap > 0.95
    # every block's absmax weight moved too: all blocks rescale, no weight keeps its bucket
    assert m.absmax_changes == m.n_blocks and m.bucket_overlap < 0.05
    assert m.direction_agreement > 0.95
    assert m.ratio_median < 0.05 and m.ratio_p90 > m.ratio_median
    # Q(w+Δ) − Q(w), decomposed by blocks inside, against the direct difference
    q0 = quantize_dequantize(w, cfg).double()
    q1 = quantize_dequantize(w + d, cfg).double()
    dd = d.double()
    assert math.isclose(m.update_projection, float(((q1 - q0) * dd).sum() / (dd * dd).sum()), rel_tol=1e-3)
    assert math.isclose(m.update_norm_ratio, float((q1 - q0).norm() / dd.norm()), rel_tol=1e-3)
    assert 0.5 < m.update_projection < 1.5


# ----------------------------------------------------------------------------- state / model


def test_fake_quantize_state_returns_new_dict_and_leaves_input() -> None:
    state = {**_state(), "a.bias": torch.randn(32)}
    before = {k: v.clone() for k, v in state.items()}
    cfg = QuantConfig("fp4", 128)
    calls: list[float] = []
    out = fake_quantize_state(state, ["a.weight", "b.weight"], cfg, progress=lambda f, msg: calls.append(f))
    assert out is not state and set(out) == set(state)
    for k in state:
        assert torch.equal(state[k], before[k])
    assert out["a.bias"] is state["a.bias"]
    assert torch.equal(out["a.weight"], quantize_dequantize(state["a.weight"], cfg))
    assert not torch.equal(out["a.weight"], state["a.weight"])
    assert calls and calls[-1] == 1.0


def test_occupancy_and_relative_error() -> None:
    state = _state()
    cfg = QuantConfig("nf4")
    occ = bin_occupancy(state, list(state), cfg)
    for k, w in state.items():
        assert occ[k].shape == (16,) and occ[k].sum() == w.numel()
        assert np.array_equal(occ[k], np.bincount(quantize_codes(w, cfg).codes.numpy(), minlength=16))
        assert np.array_equal(occ[k], bin_histogram(w, cfg))
    assert np.array_equal(occ["overall"], occ["a.weight"] + occ["b.weight"])
    assert bin_histogram(state["a.weight"], QuantConfig("int8")).shape == (256,)
    err = weight_relative_error(state, list(state), cfg)
    for k, w in state.items():
        q = quantize_dequantize(w, cfg)
        assert math.isclose(err[k], float((q - w).norm() / w.norm()), rel_tol=1e-5)
    assert 0.05 < err["overall"] < 0.15  # NF4 on Gaussian weights


def _gpt2(tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=96, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def test_quantizable_parameters_gpt2() -> None:
    m = _gpt2()
    blocks = [
        f"transformer.h.{i}.{s}.weight"
        for i in range(2)
        for s in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert quantizable_parameters(m, QuantConfig("nf4")) == blocks
    assert transposed_parameters(m) == frozenset(blocks)
    with_emb = quantizable_parameters(m, QuantConfig("nf4", include_embeddings=True))
    assert with_emb == ["transformer.wte.weight", "transformer.wpe.weight", *blocks]
    # tied head: the one tensor under its named_parameters() name
    assert quantizable_parameters(m, QuantConfig("nf4", include_lm_head=True)) == ["transformer.wte.weight", *blocks]
    both = quantizable_parameters(m, QuantConfig("nf4", include_embeddings=True, include_lm_head=True))
    assert both == with_emb


def test_quantizable_parameters_gpt_neox() -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(
        GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      vocab_size=96, max_position_embeddings=32)
    )  # fmt: skip
    blocks = [
        f"gpt_neox.layers.{i}.{s}.weight"
        for i in range(2)
        for s in ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    ]
    assert quantizable_parameters(m, QuantConfig("nf4")) == blocks
    assert transposed_parameters(m) == frozenset()
    assert quantizable_parameters(m, QuantConfig("fp4", include_embeddings=True, include_lm_head=True)) == [
        "gpt_neox.embed_in.weight", *blocks, "lm_head.weight"
    ]  # fmt: skip


@pytest.mark.parametrize("tie", [False, True])
def test_quantizable_parameters_llama(tie: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(
        LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, vocab_size=96, max_position_embeddings=32, tie_word_embeddings=tie)
    )  # fmt: skip
    blocks = [
        f"model.layers.{i}.{s}.weight"
        for i in range(2)
        for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]  # fmt: skip
    assert quantizable_parameters(m, QuantConfig("nf4")) == blocks
    head = quantizable_parameters(m, QuantConfig("nf4", include_lm_head=True))
    assert head == (["model.embed_tokens.weight", *blocks] if tie else [*blocks, "lm_head.weight"])
    assert quantizable_parameters(m, QuantConfig("nf4", include_embeddings=True))[0] == "model.embed_tokens.weight"


def test_fake_quantize_model_leaves_base_bit_identical() -> None:
    m = _gpt2()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cfg = QuantConfig("nf4")
    q = fake_quantize_model(m, cfg)
    assert q is not m
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    qs = q.state_dict()
    names = set(quantizable_parameters(m, cfg))
    for k, v in before.items():
        if k in names:
            assert torch.equal(qs[k], quantize_dequantize(v, cfg, transposed=True)), k
        else:
            assert torch.equal(qs[k], v), k
    # tied head: quantizing it quantizes the embedding of the copy only
    qh = fake_quantize_model(m, QuantConfig("nf4", include_lm_head=True))
    assert torch.equal(qh.lm_head.weight, qh.transformer.wte.weight)
    assert not torch.equal(qh.transformer.wte.weight, m.transformer.wte.weight)
    assert torch.equal(m.transformer.wte.weight, before["transformer.wte.weight"])
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(q(ids).logits).all()


# ----------------------------------------------------------------------------- bad input


def _bad_calls():
    cfg = QuantConfig("nf4")
    w = _rng_weight((4, 64))
    st = {"w": w}
    nan = w.clone()
    nan[0, 0] = float("nan")
    return [
        ("int tensor", lambda: quantize_dequantize(torch.arange(64), cfg)),
        ("bool tensor", lambda: quantize_codes(torch.ones(64, dtype=torch.bool), cfg)),
        ("not a tensor", lambda: bin_geometry([0.1, 0.2], cfg)),
        ("empty", lambda: quantize_dequantize(torch.empty(0), cfg)),
        ("nan", lambda: quantize_dequantize(nan, cfg)),
        ("inf", lambda: bin_histogram(torch.full((64,), math.inf), cfg)),
        ("cfg not QuantConfig", lambda: quantize_dequantize(w, "nf4")),
        ("transposed 1-D", lambda: quantize_codes(torch.randn(64), cfg, transposed=True)),
        ("name not in state", lambda: fake_quantize_state(st, ["missing"], cfg)),
        ("names as a string", lambda: fake_quantize_state(st, "w", cfg)),
        ("duplicate names", lambda: bin_occupancy(st, ["w", "w"], cfg)),
        ("non-float in state", lambda: weight_relative_error({"w": torch.arange(64)}, ["w"], cfg)),
        ("name not in base", lambda: compare_quantization(st, {}, ["x"], cfg)),
        ("delta shape", lambda: compare_quantization(st, {"w": torch.zeros(64, 4)}, ["w"], cfg)),
        ("delta int", lambda: compare_quantization(st, {"w": torch.zeros(4, 64, dtype=torch.long)}, ["w"], cfg)),
        ("delta not a dict", lambda: compare_quantization(st, [w], ["w"], cfg)),
        ("transposed names as a string", lambda: compare_quantization(st, {}, ["w"], cfg, transposed="w")),
        ("transposed not names", lambda: fake_quantize_state(st, ["w"], cfg, transposed=True)),
        ("model not a module", lambda: quantizable_parameters({"w": w}, cfg)),
        ("fake_quantize_model not a module", lambda: fake_quantize_model(st, cfg)),
        ("transposed_parameters not a module", lambda: transposed_parameters(st)),
        ("code_table cfg", lambda: code_table("nf4")),
        ("unknown comparison name", lambda: compare_quantization(st, {}, ["w"], cfg).module("nope")),
    ]


@pytest.mark.parametrize("label,call", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_workbench_error(label: str, call) -> None:
    with pytest.raises(WorkbenchError):
        call()


def test_alias_and_no_input_mutation() -> None:
    w = _rng_weight((8, 64))
    w0 = w.clone()
    assert quantize_weight is quantize_dequantize
    quantize_dequantize(w, QuantConfig("nf4"))
    bin_geometry(w, QuantConfig("int8", double_quant=True))
    compare_quantization({"w": w}, {"w": torch.ones_like(w) * 1e-4}, ["w"], QuantConfig("fp4"))
    assert torch.equal(w, w0)
    # deep-copied models keep working after the tables were built
    copy.deepcopy(QuantConfig("nf4"))
