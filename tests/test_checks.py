"""Numeric settings are checked before any work: NaN, inf, bools, wrong kinds and out-of-range values."""

from __future__ import annotations

import math

import pytest

from workbench.core.checks import Range, check_ranges
from workbench.core.errors import WorkbenchError
from workbench.unlearning.mansu import MansuConfig
from workbench.unlearning.methods.lora import LoraConfig
from workbench.unlearning.methods.quail import QuailConfig
from workbench.unlearning.methods.rmu import RmuConfig
from workbench.unlearning.methods.sure import SureConfig
from workbench.unlearning.objectives import BaselineConfig
from workbench.unlearning.task import OptimConfig, StopRule


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None, 11, 0])
def test_a_range_refuses_what_it_should(value):
    with pytest.raises(WorkbenchError, match=r"Owner\.x must be a whole number in \(0, 10\]"):
        check_ranges("Owner", {"x": value}, {"x": Range(0, 10, low_open=True, integer=True)})


def test_a_range_admits_its_values():
    check_ranges("Owner", {"x": 10, "y": None, "z": 0.5}, {"x": Range(0, 10, integer=True),
                                                          "y": Range(optional=True), "z": Range(0, 1)})


BAD = [
    (MansuConfig, "retain_guard", math.nan), (MansuConfig, "retain_guard", -0.01), (MansuConfig, "max_rounds", 10**9),
    (MansuConfig, "fisher_budget", math.inf), (MansuConfig, "code_steps", 300),
    (MansuConfig, "round_fraction", math.nan),
    (MansuConfig, "params_per_round", 1.5), (MansuConfig, "no_floor_step", math.nan),
    (OptimConfig, "lr", 0.0), (OptimConfig, "lr", math.nan), (OptimConfig, "forget_batch", True),
    (StopRule, "max_steps", 10**9), (StopRule, "forget_target", math.nan),
    (BaselineConfig, "alpha", math.inf), (BaselineConfig, "gamma", math.nan),
    (RmuConfig, "steering_scale", math.nan), (SureConfig, "lr_scale", math.inf),
    (QuailConfig, "margin_scale", math.nan),
    (LoraConfig, "rank", 10**6), (LoraConfig, "alpha", math.nan),
]


@pytest.mark.parametrize("config,field,value", BAD, ids=[f"{c.__name__}.{f}={v!r}" for c, f, v in BAD])
def test_every_config_refuses_non_finite_and_out_of_range_settings(config, field, value):
    with pytest.raises(WorkbenchError, match=rf"{config.__name__}\.{field}|{field}"):
        config(**{field: value})
