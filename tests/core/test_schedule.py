"""Sigma schedules against the values published in SPEC §4.1 / §4.4."""

from __future__ import annotations

import pytest

from mochi_core.schedule import denoise_schedule, linear_quadratic_schedule


def test_64_steps_matches_published_values():
    s = linear_quadratic_schedule(64)
    assert len(s) == 65
    assert s[0] == 1.0 and s[-1] == 0.0
    published_head = {1: 0.9992, 31: 0.9758, 32: 0.975, 33: 0.9733, 34: 0.9697, 35: 0.9643}
    published_tail = [0.1721, 0.1166, 0.0592, 0.0]
    for i, v in published_head.items():
        assert s[i] == pytest.approx(v, abs=5e-5), i
    assert s[-4:] == pytest.approx(published_tail, abs=5e-5)
    assert all(a > b for a, b in zip(s, s[1:], strict=False)), "not strictly decreasing"


def test_linear_part_is_exactly_linear():
    s = linear_quadratic_schedule(64)
    steps = [a - b for a, b in zip(s[:33], s[1:33], strict=False)]
    assert steps == pytest.approx([0.025 / 32] * 32, rel=1e-9)


def test_fast_mode_values():
    s = linear_quadratic_schedule(8, threshold_noise=0.1, linear_steps=6)
    expected = [1.0, 0.9833, 0.9667, 0.95, 0.9333, 0.9167, 0.9, 0.6667, 0.0]
    assert s == pytest.approx(expected, abs=5e-5)


def test_single_step():
    assert linear_quadratic_schedule(1) == [1.0, 0.0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_steps": 0},
        {"num_steps": 2.5},
        {"num_steps": True},
        {"num_steps": 10, "threshold_noise": 0.0},
        {"num_steps": 10, "threshold_noise": 1.0},
        {"num_steps": 10, "linear_steps": 10},
        {"num_steps": 10, "linear_steps": 0},
    ],
)
def test_invalid_inputs(kwargs):
    with pytest.raises(ValueError):
        linear_quadratic_schedule(**kwargs)


def test_denoise_keeps_tail_of_longer_schedule():
    s = denoise_schedule(10, 0.5)
    full = linear_quadratic_schedule(20)
    assert s == full[-11:]
    assert s[0] < 1.0 and s[-1] == 0.0


def test_denoise_rounds_step_count():
    # 10 / 0.3 = 33.33 -> 33 steps, not 34 (ceil) or a float
    assert denoise_schedule(10, 0.3) == linear_quadratic_schedule(33)[-11:]


def test_denoise_one_is_full_schedule():
    assert denoise_schedule(12, 1.0) == linear_quadratic_schedule(12)


@pytest.mark.parametrize("denoise", [0.0, -0.1, 1.5])
def test_denoise_invalid(denoise):
    with pytest.raises(ValueError):
        denoise_schedule(10, denoise)
