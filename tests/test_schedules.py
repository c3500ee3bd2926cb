"""Glance schedules: pure maths, no ComfyUI."""

import math

import pytest

from glance_core import GlanceError, schedules

QWEN = [1.0, 0.97919, 0.95752, 0.93492, 0.91134, 0.88671, 0.74507, 0.56295, 0.32008, 0.02, 0.0]
FLUX = [1.0, 0.98698, 0.97320, 0.95861, 0.94312, 0.92665, 0.82570, 0.67799, 0.44120, 0.06055, 0.0]


def test_presets_are_the_official_lists():
    assert list(schedules.preset("glance_qwen_image").sigmas) == QWEN
    assert list(schedules.preset("glance_flux").sigmas) == FLUX


def test_official_indices():
    assert schedules.glance_indices(50, 5, 2, 5) == ([0, 2, 4, 6, 8], [10, 20, 30, 40, 49])


@pytest.mark.parametrize("name,expected", [("glance_qwen_image", QWEN), ("glance_flux", FLUX)])
def test_custom_mode_reproduces_presets(name, expected):
    src = schedules.PRESET_SOURCES[name]

    def percent_to_sigma(p):
        return 1.0 if p <= 0 else schedules.flux_time_shift(src["mu"], 1.0 - p)

    sched = schedules.custom(percent_to_sigma, 50, 5, 2, 5, src["shift_terminal"])
    assert len(sched.sigmas) == 11 and sched.slow_steps == 5
    assert max(abs(a - b) for a, b in zip(sched.sigmas, expected)) < 5e-6


@pytest.mark.parametrize("name", list(schedules.PRESETS))
def test_boundary_lies_between_slow_and_fast(name):
    s = schedules.preset(name)
    assert s.sigmas[4] > s.boundary > s.sigmas[5]


def test_single_expert_boundaries():
    slow_only = schedules.custom(lambda p: 1 - p, 50, 5, 2, 0)
    fast_only = schedules.custom(lambda p: 1 - p, 50, 0, 2, 5)
    assert slow_only.boundary == 0.0 and len(slow_only.sigmas) == 6
    assert fast_only.boundary > fast_only.sigmas[0] == 1.0 and len(fast_only.sigmas) == 6


def test_fewer_steps_schedules():
    slow, fast = schedules.glance_indices(50, 3, 2, 3)
    assert slow == [0, 2, 4] and fast[0] == 6 and fast[-1] == 49 and fast == sorted(fast)
    assert schedules.glance_indices(50, 2, 2, 2) == ([0, 2], [4, 49])


@pytest.mark.parametrize(
    "args,msg",
    [
        ((50, 0, 2, 0), "at least one"),
        ((50, 5, 0, 5), "slow_stride"),
        ((10, 5, 2, 5), "too few"),
        ((1, 1, 1, 0), "base_steps"),
    ],
)
def test_bad_settings_are_named(args, msg):
    with pytest.raises(GlanceError, match=msg):
        schedules.glance_indices(*args)


def test_shift_terminal_stretches_last_sigma():
    sig = schedules.base_sigmas(lambda p: 1 - p, 50, shift_terminal=0.02)
    assert sig[0] == 1.0 and math.isclose(sig[-1], 0.02, abs_tol=1e-12)
    with pytest.raises(GlanceError, match="shift_terminal"):
        schedules.base_sigmas(lambda p: 1 - p, 50, shift_terminal=1.5)


def test_validate_sigmas():
    schedules.validate_sigmas(FLUX)
    for bad in ([1.0], [1.0, 1.0, 0.0], [1.0, float("nan")], [0.5, 0.7, 0.0]):
        with pytest.raises(GlanceError):
            schedules.validate_sigmas(bad)
