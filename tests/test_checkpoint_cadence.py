"""SaveCadence on a fake clock: time, step and both."""

import pytest

from so8t.checkpoint.cadence import SaveCadence


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_cadence_fires_after_every_seconds_and_restarts_on_save():
    clock = FakeClock()
    cadence = SaveCadence("time", every_seconds=180, clock=clock)
    assert cadence.due(1) is None
    clock.advance(179.9)
    assert cadence.due(50) is None  # steps never fire a time cadence
    clock.advance(0.1)
    assert cadence.due(51) == "time"
    cadence.mark_saved(51)
    assert cadence.due(52) is None
    clock.advance(180)
    assert cadence.due(53) == "time"


def test_step_cadence_counts_steps_since_last_save_and_ignores_time():
    clock = FakeClock()
    cadence = SaveCadence("step", every_steps=10, clock=clock)
    clock.advance(10_000)
    assert cadence.due(9) is None
    assert cadence.due(10) == "step"
    cadence.mark_saved(10)
    assert cadence.due(19) is None
    assert cadence.due(20) == "step"


def test_both_cadence_fires_on_whichever_comes_first_and_any_save_restarts_both():
    clock = FakeClock()
    cadence = SaveCadence("both", every_seconds=60, every_steps=10, clock=clock)
    assert cadence.due(10) == "step"
    cadence.mark_saved(10)

    clock.advance(60)  # time first
    assert cadence.due(12) == "time"
    cadence.mark_saved(12)
    # the step timer restarted at 12, the time timer at now
    assert cadence.due(21) is None
    assert cadence.due(22) == "step"
    clock.advance(59)
    cadence.mark_saved(22)
    clock.advance(59)
    assert cadence.due(23) is None  # time timer restarted by the step save


def test_resumed_cadence_starts_counting_at_the_resume_step():
    clock = FakeClock()
    cadence = SaveCadence("step", every_steps=5, clock=clock, start_step=40)
    assert cadence.due(40) is None
    assert cadence.due(44) is None
    assert cadence.due(45) == "step"


def test_seconds_until_due():
    clock = FakeClock()
    cadence = SaveCadence("time", every_seconds=10, clock=clock)
    clock.advance(4)
    assert cadence.seconds_until_due() == pytest.approx(6)
    assert SaveCadence("step", every_steps=3).seconds_until_due() is None


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="weekly", every_seconds=1, every_steps=1),
        dict(kind="time", every_seconds=0),
        dict(kind="step", every_steps=0),
        dict(kind="both", every_seconds=10, every_steps=None),
    ],
)
def test_invalid_policies_are_refused(kwargs):
    with pytest.raises(ValueError):
        SaveCadence(**kwargs)
