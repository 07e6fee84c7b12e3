"""A process killed at an arbitrary instant (kill -9 / TerminateProcess) while saving
continuously never leaves a committed checkpoint that fails verification, and resume works."""

import subprocess
import sys
import textwrap
import time

import pytest

from so8t.checkpoint import CheckpointStore

pytestmark = pytest.mark.slow  # real processes

# Shared by the child process and the test, so both build the same parts.
SETUP = textwrap.dedent(
    """
    from types import SimpleNamespace
    import torch
    from so8t.checkpoint import CheckpointService

    class Counter:
        def __init__(self): self.steps = 0
        def state_dict(self): return {"steps": self.steps}
        def load_state_dict(self, s): self.steps = s["steps"]

    def build(run_dir):
        model = torch.nn.Linear(256, 256)
        parts = {"model": model, "optim": torch.optim.Adam(model.parameters()), "counter": Counter()}
        cfg = SimpleNamespace(cadence="step", every_seconds=None, every_steps=1, keep_last=3,
                              keep_every_steps=None, save_on_end=True, async_write=True, max_failed_saves=5,
                              max_unprotected=3.0)
        return CheckpointService(run_dir, cfg, parts, {"model.size": 256}), parts
    """
)

CHILD = SETUP + textwrap.dedent(
    """
    import sys
    service, parts = build(sys.argv[1])
    model = parts["model"]
    result = service.resume("auto")
    step = result.step if result else 0
    print("ready", step, flush=True)
    while True:
        step += 1
        loss = model(torch.randn(4, 256)).pow(2).mean()
        parts["optim"].zero_grad(); loss.backward(); parts["optim"].step()
        parts["counter"].steps = step
        service.maybe_save(step)
    """
)


def _run_and_kill(run_dir, seconds):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().split()
        assert first[:1] == ["ready"], first
        time.sleep(seconds)
    finally:
        proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows: no handler runs
        proc.wait(10)
        proc.stdout.close()
    return int(first[1])


@pytest.mark.parametrize("seconds", [0.7])
def test_kill_during_continuous_saving_leaves_only_sound_checkpoints(tmp_path, seconds):
    started = _run_and_kill(tmp_path, seconds)
    assert started == 0
    resumed_at = _run_and_kill(tmp_path, seconds / 2)  # the second run resumed from the first
    assert resumed_at > 0

    store = CheckpointStore(tmp_path / "checkpoints")
    for path in store.list_checkpoints():
        assert store.verify(path) == [], path

    scope: dict = {}
    exec(SETUP, scope)
    service, parts = scope["build"](tmp_path)
    result = service.resume("auto")
    assert result.step >= resumed_at
    assert parts["counter"].steps == result.step  # state and manifest agree
    assert not any(p.name.startswith(".") for p in store.root.iterdir())
