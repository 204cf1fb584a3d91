"""Dropout rate schedule: fixed / redraw / adaptive rates, reproducible per (seed, step), checkpointable."""

from __future__ import annotations

import pytest

from uegr_dist.forward import DropoutRateSchedule


def test_fixed_rates_are_evenly_spaced_and_constant() -> None:
    schedule = DropoutRateSchedule(3, 0.1, 0.3, mode="fixed")
    assert schedule.rates(0) == pytest.approx([0.1, 0.2, 0.3])
    assert schedule.rates(17) == schedule.rates(0)
    assert DropoutRateSchedule(1, 0.1, 0.3, mode="fixed").rates(5) == pytest.approx([0.2])
    assert all(isinstance(rate, float) for rate in schedule.rates(0))


def test_redraw_depends_only_on_seed_and_step() -> None:
    schedule = DropoutRateSchedule(4, 0.05, 0.3, mode="redraw", seed=3)
    again = DropoutRateSchedule(4, 0.05, 0.3, mode="redraw", seed=3)
    draws = [schedule.rates(step) for step in range(50)]
    assert [again.rates(step) for step in reversed(range(50))] == list(reversed(draws))
    assert draws[0] != draws[1]
    assert DropoutRateSchedule(4, 0.05, 0.3, seed=4).rates(0) != draws[0]
    flat = [rate for rates in draws for rate in rates]
    assert all(isinstance(rate, float) and 0.05 <= rate <= 0.3 for rate in flat)
    assert min(flat) < 0.08 and max(flat) > 0.27  # the draws cover the range
    assert all(len(rates) == 4 for rates in draws)


def test_adaptive_shift_direction_and_clamp() -> None:
    schedule = DropoutRateSchedule(2, 0.1, 0.2, mode="adaptive", target_js=0.05, gain=1.0, seed=1)
    base = schedule.rates(7)
    schedule.update(0.0)  # sub-models agree more than the target: more dropout
    assert schedule.shift == pytest.approx(0.05)
    assert schedule.rates(7) == pytest.approx([rate + 0.05 for rate in base])
    schedule.update(0.25)  # they disagree more than the target: less dropout
    assert schedule.shift == pytest.approx(-0.15)
    # The range [-0.05, 0.05] is clamped to [0, 0.05]; the same uniform draws land in it.
    assert schedule.rates(7) == pytest.approx([0.05 * (rate - 0.1) / 0.1 for rate in base])
    for _ in range(100):
        schedule.update(0.0)
    assert all(0.0 <= rate <= 0.95 for rate in schedule.rates(7))
    assert schedule.rates(7) == pytest.approx([0.95, 0.95])
    fixed = DropoutRateSchedule(2, 0.1, 0.2, mode="redraw")
    fixed.update(0.0)
    assert fixed.shift == 0.0


def test_state_dict_round_trip() -> None:
    schedule = DropoutRateSchedule(3, 0.05, 0.3, mode="adaptive", seed=2)
    schedule.update(0.01)
    schedule.update(0.02)
    resumed = DropoutRateSchedule(3, 0.05, 0.3, mode="adaptive", seed=2)
    resumed.load_state_dict(schedule.state_dict())
    assert resumed.shift == schedule.shift != 0.0
    assert resumed.rates(123) == schedule.rates(123)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be an int >= 1"),
        ({"p_min": -0.1}, "0 <= p_min <= p_max < 1"),
        ({"p_min": 0.4, "p_max": 0.3}, "0 <= p_min <= p_max < 1"),
        ({"p_max": 1.0}, "0 <= p_min <= p_max < 1"),
        ({"mode": "cosine"}, "mode must be one of \\('fixed', 'redraw', 'adaptive'\\)"),
        ({"gain": -1.0}, "gain must be >= 0"),
        ({"target_js": -0.1}, "target_js must be >= 0"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, message: str) -> None:
    arguments = {"k": 2, "p_min": 0.05, "p_max": 0.3, **kwargs}
    with pytest.raises(ValueError, match=message):
        DropoutRateSchedule(**arguments)


def test_non_finite_measurement_raises() -> None:
    with pytest.raises(ValueError, match="measured_js must be finite"):
        DropoutRateSchedule(2, 0.05, 0.3, mode="adaptive").update(float("nan"))
