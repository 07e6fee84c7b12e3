"""so8t.run.signals: handlers only set a flag; exit 128+n; a second Ctrl+C aborts at once."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from so8t.run.signals import StopSignal, default_stop_signals

pytestmark = pytest.mark.slow  # real processes

posix_only = pytest.mark.skipif(os.name == "nt", reason="os.kill with arbitrary signals is POSIX-only")

# A stand-in for the training loop: poll the flag at each "step boundary", then exit with the
# code StopSignal chose. In "busy" mode the "checkpoint save" is one long C call that never
# returns to the interpreter, which a Python-level handler could not interrupt.
LOOP = """
import sys, time
from so8t.run.signals import StopSignal
with StopSignal() as stop:
    print("READY", flush=True)
    deadline = time.monotonic() + 30
    while not stop.requested and time.monotonic() < deadline:
        time.sleep(0.01)
    if not stop.requested:
        sys.exit(99)
    print("STOP", stop.name, flush=True)
    if sys.argv[1] == "busy":
        print("SAVING", flush=True)
        sum(range(10**12))
        print("SAVED", flush=True)
sys.exit(stop.exit_code)
"""


def _spawn(mode="quick"):
    proc = subprocess.Popen([sys.executable, "-c", LOOP, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "READY"
    return proc


@posix_only
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_signal_sets_flag_and_process_exits_128_plus_n(name):
    sig = getattr(signal, name)
    proc = _spawn()
    os.kill(proc.pid, sig)
    out, _ = proc.communicate(timeout=20)
    assert f"STOP {name}" in out
    assert proc.returncode == 128 + sig  # 143, 130, 138 on Linux


@posix_only
def test_double_sigint_aborts_at_once_even_inside_a_long_c_call():
    proc = _spawn("busy")
    os.kill(proc.pid, signal.SIGINT)
    assert proc.stdout.readline().strip() == "STOP SIGINT"
    assert proc.stdout.readline().strip() == "SAVING"
    time.sleep(0.2)  # now inside sum(range(10**12)), minutes of C code
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert time.monotonic() - t0 < 5
    assert "SAVED" not in out
    assert proc.returncode == -signal.SIGINT  # killed by the signal itself (shell shows 130)


@posix_only
def test_sigterm_during_stop_does_not_abort():
    proc = _spawn()
    os.kill(proc.pid, signal.SIGTERM)
    os.kill(proc.pid, signal.SIGTERM)  # schedulers may repeat SIGTERM; only Ctrl+C escalates
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 143 and "STOP SIGTERM" in out


def test_defaults_cover_platform_signals():
    sigs = default_stop_signals()
    assert signal.SIGINT in sigs and signal.SIGTERM in sigs
    for name in ("SIGUSR1", "SIGBREAK"):
        if hasattr(signal, name):
            assert getattr(signal, name) in sigs


@posix_only
def test_in_process_flag_exit_code_and_restore():
    before = {s: signal.getsignal(s) for s in default_stop_signals()}
    stop = StopSignal()
    with stop:
        assert stop.installed and not stop.requested and stop.exit_code is None
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while not stop.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested and stop.name == "SIGUSR1"
        assert stop.exit_code == 128 + signal.SIGUSR1
        # the next Ctrl+C is now left to the OS: it kills the process without Python code
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert not stop.installed
    assert {s: signal.getsignal(s) for s in default_stop_signals()} == before


def test_install_outside_main_thread_warns_and_skips(caplog):
    stop = StopSignal()
    with caplog.at_level(logging.WARNING, logger="so8t.run.signals"):
        t = threading.Thread(target=stop.install)
        t.start()
        t.join()
    assert not stop.installed
    assert "main thread" in caplog.text
