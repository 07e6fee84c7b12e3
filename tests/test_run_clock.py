"""The deadline's clock counts from the process start, not from when so8t was imported."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from so8t.run.clock import Deadline, process_started


def test_process_started_counts_the_time_before_so8t_was_imported():
    # The child sleeps 1.5 s before it imports so8t: that time is part of the run's wall clock,
    # as it is of a scheduler's.
    code = ("import time; time.sleep(1.5); from so8t.run.clock import process_started; "
            "print(time.monotonic() - process_started())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    age = float(out.stdout.strip())
    assert 1.5 <= age < 30, age


def test_process_started_is_on_the_monotonic_clock_and_in_the_past():
    started = process_started()
    assert started <= time.monotonic()
    assert time.monotonic() - started < 24 * 3600  # this test process is not a day old


def test_the_deadline_stops_once_the_measured_step_and_save_would_not_fit():
    now = time.monotonic()
    deadline = Deadline(10.0, started=now - 5.0)
    assert not deadline.next_step_would_overrun()  # no measured update yet: always one more
    deadline.observe_step(1.0)
    assert not deadline.next_step_would_overrun()  # 5 + 1.5 * 1 + 1 < 10
    deadline.observe_save(2.0)
    assert deadline.next_step_would_overrun()  # 5 + 1.5 * 3 + 1 > 10
    assert not Deadline(None, now - 1e6).next_step_would_overrun()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's record in /proc")
def test_process_started_agrees_with_the_kernels_start_time_to_the_tick():
    # psutil adds the boot time, read to the whole second, to the kernel's start time: on the
    # wall clock that would be up to a second off, which a deadline of seconds notices.
    import os

    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
    kernel_age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    age = time.monotonic() - process_started()
    assert abs(age - kernel_age) < 0.05, (age, kernel_age)
