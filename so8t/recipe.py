"""One run, start to end: setup → train → cleanup (the torchtune recipe shape).

Setup takes the run dir's lock, records the attempt, builds the components and resumes
from the newest good checkpoint; train runs PPO updates and acts at each step boundary
(metrics row, checkpoint cadence, stop signal, deadline); cleanup saves the end checkpoint,
exports ``final/`` and closes the attempt in ``session.json``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Exit codes a job script can act on (a stop signal exits with 128 + its number).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2  # the config, or the checkpoints in the run dir, do not allow this run
EXIT_LOCKED = 3  # another live process holds the run dir
EXIT_DEADLINE = 75  # stopped with a checkpoint before max_wall_seconds: re-run to continue


def run_dir_of_job() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _process_started() -> float:
    """``time.monotonic()`` when this process started, so ``max_wall_seconds`` also counts the
    interpreter and Hydra start-up (seconds on a loaded machine), as a job's clock does.
    Linux reads /proc/self/stat; elsewhere (or if that fails) it is now."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now
    return now - age if age >= 0 else now


class Deadline:
    """Stops before ``max_wall_seconds`` with time left for one more update and a save."""

    def __init__(self, max_wall_seconds: float | None, started: float):
        self.limit = max_wall_seconds
        self.started = started
        self.slowest_step = 0.0
        self.slowest_save = 0.0

    def observe_step(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def observe_save(self, seconds: float) -> None:
        self.slowest_save = max(self.slowest_save, seconds)

    def next_step_would_overrun(self) -> bool:
        # Without a measured update there is nothing to go on, and an attempt that stopped
        # before its first update would be requeued forever: every attempt makes one.
        if self.limit is None or self.slowest_step == 0.0:
            return False
        elapsed = time.monotonic() - self.started
        # The measured worst step and save, with a margin for jitter.
        return elapsed + 1.5 * (self.slowest_step + self.slowest_save) + 1.0 > self.limit


def _export_final(cfg: DictConfig, components, run_dir: Path) -> None:
    from so8t.model.export import save_final

    trainer = components.trainer
    gate = trainer.gate_schedule.value(trainer.counters.step) if trainer.gate_schedule is not None else None
    save_final(
        components.policy,
        components.tokenizer,
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.adapter, resolve=True),
        gate,
        run_dir / "final",
        extra={
            "step": trainer.counters.step,
            # How the policy was asked and when it stopped, so load_policy(...).generate asks
            # and stops the same way.
            "stop_token_ids": list(trainer.stop_ids),
            "prompting": {key: cfg.data.get(key) for key in ("chat_template", "system_prompt", "instruction")},
        },
    )


def run_training(cfg: DictConfig, run_dir: Path | None = None) -> int:
    """Train the run described by ``cfg`` in ``run_dir``; returns the process exit code."""
    from so8t.errors import CheckpointError, ModelNotAvailableError, SetupError
    from so8t.run.attempts import archive_hydra_config
    from so8t.run.lock import RunLock, RunLockedError
    from so8t.run.session import SessionFile
    from so8t.run.signals import StopSignal

    started = _process_started()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of_job()
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunLockedError as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    stop = StopSignal().install()
    session = SessionFile(run_dir)
    try:
        if _completed_already(cfg, run_dir, session):
            return EXIT_OK
        archive_hydra_config(run_dir)
        session.load()
        return _train(cfg, run_dir, session, stop, Deadline(cfg.max_wall_seconds, started))
    except (CheckpointError, ModelNotAvailableError, SetupError) as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    except Exception:
        # The traceback goes to train.log; the attempt (opened here if setup failed before
        # training began) is closed as failed.
        log.exception("the run failed")
        if session.attempt_index is None:
            session.start_attempt(cfg.max_steps, None, None)
            session.end_attempt("failed", "exception", EXIT_FAILED)
        return EXIT_FAILED
    finally:
        stop.restore()
        lock.release()


def _completed_already(cfg: DictConfig, run_dir: Path, session) -> bool:
    """session.json says this very config already ran to ``max_steps`` and exported ``final/``:
    a re-run (say, of a sweep) then skips it in seconds, without building the model."""
    import json

    from so8t.config.identity import config_identity

    data = session.load()
    step = data.get("global_step")
    if (cfg.resume != "auto" or data.get("status") != "completed" or not isinstance(step, int)
            or step < cfg.max_steps or not (run_dir / "final").is_dir()
            or data.get("config_identity") != json.loads(json.dumps(config_identity(cfg)))):
        return False
    log.info("run already completed: step %d of max_steps=%d (session.json); skipped", step, cfg.max_steps)
    return True


def _train(cfg: DictConfig, run_dir: Path, session, stop, deadline: Deadline) -> int:
    from so8t.build import build_components
    from so8t.checkpoint import CheckpointService
    from so8t.config.identity import config_identity
    from so8t.errors import SetupError
    from so8t.run.console import run_summary
    from so8t.run.metrics import MetricsWriter
    from so8t.run.trackers import open_trackers

    log.info("run dir: %s", run_dir.resolve())
    components = build_components(cfg)
    trainer = components.trainer
    identity = config_identity(cfg)
    # Checkpoints also record which base weights they were trained on (session.json keeps the
    # config identity alone, so a completed run is recognised without loading the model).
    checkpoint_identity = {**identity, **components.base_fingerprint}
    checkpoints = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), checkpoint_identity)
    resumed = checkpoints.resume(cfg.resume, checkpoint_identity)
    if resumed is not None:
        log.info("resumed from step %d (checkpoint %s, reason %s)", resumed.step, resumed.path, resumed.reason)
    else:
        log.info("starting fresh at step 0")
    step = trainer.counters.step
    if step >= cfg.max_steps:
        log.info("run already completed: step %d of max_steps=%d; nothing to do", step, cfg.max_steps)
        if not (run_dir / "final").is_dir():
            _export_final(cfg, components, run_dir)
        checkpoints.close()
        if session.data.get("status") != "completed":
            # The attempt that reached max_steps died before closing session.json (killed between
            # its end checkpoint and the export): this attempt finished the run; record it.
            session.start_attempt(cfg.max_steps, identity, step)
            session.update(step, trainer.counters.training_time)
            session.end_attempt("completed", "end", EXIT_OK)
        return EXIT_OK

    session.start_attempt(cfg.max_steps, identity, step if resumed is not None else None)
    try:
        trackers = open_trackers(cfg, run_dir, session, step)
    except SetupError:
        checkpoints.close()
        session.end_attempt("failed", "refused", EXIT_REFUSED)
        raise
    samples = MetricsWriter(run_dir / cfg.output.samples_file)
    status, reason, code = "failed", "exception", EXIT_FAILED
    try:
        status, reason, code = _loop(cfg, trainer, checkpoints, trackers, samples, session, stop, deadline)
        if status == "completed":
            if cfg.checkpoint.save_on_end:
                if _already_saved(checkpoints, trainer.counters.step):
                    _record_progress(session, trainer, checkpoints)
                else:
                    _save(checkpoints, session, trainer, "end", deadline)
            _export_final(cfg, components, run_dir)
        log.info("%s", run_summary(run_dir, status, trainer.counters.step, cfg.max_steps, step,
                                   trainer.counters.training_time, cfg.output.metrics_file))
        return code
    finally:
        trackers.close(status)
        samples.close()
        try:
            checkpoints.close()
        except Exception:  # a failed background write was logged when it happened
            log.exception("the last background checkpoint write failed")
        session.update(trainer.counters.step, trainer.counters.training_time)
        session.end_attempt(status, reason, code)


def _save(checkpoints, session, trainer, reason: str, deadline: Deadline) -> None:
    began = time.monotonic()
    path = checkpoints.save_now(trainer.counters.step, reason)
    deadline.observe_save(time.monotonic() - began)
    session.update(trainer.counters.step, trainer.counters.training_time,
                   last_checkpoint={"step": trainer.counters.step, "path": str(path), "reason": reason})
    log.info("checkpoint at step %d (%s): %s", trainer.counters.step, reason, path)


def _already_saved(checkpoints, step: int) -> bool:
    """True when the cadence already committed a checkpoint of this very step."""
    checkpoints.wait()
    saved = checkpoints.last_saved
    return saved is not None and saved.step == step


def _record_progress(session, trainer, checkpoints) -> None:
    """Progress into session.json; a checkpoint only once committed (a background write
    that is still running, or that failed, is not named there)."""
    saved = checkpoints.last_saved
    last = None if saved is None else {"step": saved.step, "path": str(saved.path), "reason": saved.reason}
    session.update(trainer.counters.step, trainer.counters.training_time, last_checkpoint=last)


def _write_samples(cfg, trainer, samples) -> None:
    """A few episodes of this update, raw text included, at the first update and every
    ``output.samples_every`` updates: where a user checks what the model was given and said."""
    step, every = trainer.counters.step, cfg.output.samples_every
    if every and (step == 1 or step % every == 0):
        for sample in trainer.samples:
            samples.write({"step": step, **sample})


def _loop(cfg, trainer, checkpoints, trackers, samples, session, stop, deadline: Deadline) -> tuple[str, str, int]:
    """PPO updates until max_steps, a stop signal or the deadline; returns (status, reason, code)."""
    from so8t.run.console import bar_postfix, log_update, progress_bars

    with progress_bars(cfg.output.progress_bars, cfg.max_steps, trainer.counters.step, cfg.ppo.ppo_epochs) as (
            steps, epochs):
        while trainer.counters.step < cfg.max_steps:
            if stop.requested:
                break
            if deadline.next_step_would_overrun():
                log.warning("stopping before max_wall_seconds=%s: the next update and a save might not fit",
                            cfg.max_wall_seconds)
                _save(checkpoints, session, trainer, "deadline", deadline)
                return "interrupted", "deadline", EXIT_DEADLINE
            epochs.reset()
            row = trainer.train_step(on_epoch=lambda _epoch: epochs.update(1))
            deadline.observe_step(row["time/step"])
            trackers.log(row)
            _write_samples(cfg, trainer, samples)
            steps.set_postfix(bar_postfix(row), refresh=False)
            steps.update(1)
            log_update(row)
            if stop.requested:
                break
            began = time.monotonic()
            if checkpoints.maybe_save(trainer.counters.step) is not None:
                deadline.observe_save(time.monotonic() - began)
            _record_progress(session, trainer, checkpoints)
    if stop.requested:
        log.warning("stop requested by %s: saving at step %d, then exiting with code %d "
                    "(a second Ctrl+C aborts at once)", stop.name, trainer.counters.step, stop.exit_code)
        _save(checkpoints, session, trainer, "signal", deadline)
        return "interrupted", stop.name or "signal", stop.exit_code
    return "completed", "end", EXIT_OK
