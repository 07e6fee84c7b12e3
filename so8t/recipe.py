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

from so8t.config.schema import TrainConfig

log = logging.getLogger(__name__)

# Exit codes a job script can act on (a stop signal exits with 128 + its number).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_REFUSED = 2  # the config, or the checkpoints in the run dir, do not allow this run
EXIT_LOCKED = 3  # another live process holds the run dir
EXIT_CHECKPOINTING = 74  # checkpoints kept failing (a full disk?): stopped rather than train unprotected
EXIT_DEADLINE = 75  # stopped with a checkpoint before max_wall_seconds: re-run to continue


def run_dir_of_job() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _hydra_output_subdir() -> str | None:
    """Where Hydra wrote this job's record, relative to the run dir (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().output_subdir if HydraConfig.initialized() else None


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


def _export_final(cfg: TrainConfig, components, run_dir: Path) -> None:
    from so8t.config.typed import config_record
    from so8t.model.export import save_final

    if not components.trainer.group.is_main:  # distributed hook: rank 0 writes final/
        return
    trainer = components.trainer
    gate = trainer.gate_schedule.value(trainer.counters.step) if trainer.gate_schedule is not None else None
    save_final(
        components.policy,
        components.tokenizer,
        config_record(cfg.model),
        config_record(cfg.adapter),
        gate,
        run_dir / "final",
        extra={
            "step": trainer.counters.step,
            # How the policy was asked and when it stopped, so load_policy(...).generate asks
            # and stops the same way.
            "stop_token_ids": list(trainer.stop_ids),
            "prompting": {key: getattr(cfg.data, key) for key in ("chat_template", "system_prompt", "instruction")},
        },
    )


def run_training(cfg: TrainConfig, run_dir: Path | None = None) -> int:
    """Train the run described by ``cfg`` (a validated config: ``so8t.config.validate.validate``
    of the composed one) in ``run_dir``; returns the process exit code."""
    from so8t import distributed
    from so8t.errors import CheckpointError, ModelNotAvailableError, SetupError
    from so8t.run.attempts import adopt_hydra_files, archive_hydra_config, discard_hydra_files
    from so8t.run.lock import RunLock, RunLockedError, RunLockUnavailableError
    from so8t.run.run_log import discard_run_log, open_run_log
    from so8t.run.session import SessionFile
    from so8t.run.signals import StopSignal

    started = _process_started()
    run_dir = Path(run_dir) if run_dir is not None else run_dir_of_job()
    # Distributed hook (so8t.distributed): join the launcher's process group (a lone process
    # is a group of one); rank 0 holds the lock, and its outcome is every rank's.
    try:
        group = distributed.join_group(cfg.hardware)
        distributed.check_batch_sizes(cfg.ppo, cfg.hardware, group)
    except SetupError as exc:
        open_run_log()
        log.error("%s", exc)
        return EXIT_REFUSED
    distributed.redirect_rank_log(run_dir, group)
    incoming = _hydra_output_subdir()
    lock = RunLock(run_dir)
    refusal = None
    if group.is_main:
        try:
            lock.acquire()
        except RunLockedError as exc:
            refusal = (EXIT_LOCKED, str(exc))
        except RunLockUnavailableError as exc:
            refusal = (EXIT_REFUSED, str(exc))
    refusal = group.broadcast(refusal)
    if refusal is not None:
        code, message = refusal
        if code == EXIT_LOCKED:
            # The run is another live process's: leave its train.log and .hydra/ alone.
            discard_run_log()
            discard_hydra_files(run_dir, incoming)
        else:
            open_run_log()
        log.error("%s", message)
        return code
    open_run_log()
    if group.is_main:
        adopt_hydra_files(run_dir, incoming)
    stop = distributed.GroupStop(StopSignal(), group).install()
    session = SessionFile(run_dir) if group.is_main else distributed.NullSession()
    try:
        if group.broadcast(_completed_already(cfg, run_dir, session) if group.is_main else None):
            return EXIT_OK
        if group.is_main:
            archive_hydra_config(run_dir)
        session.load()
        deadline = distributed.AgreedDeadline(Deadline(cfg.max_wall_seconds, started), group)
        return _train(cfg, run_dir, session, stop, deadline, lock, group)
    except (CheckpointError, ModelNotAvailableError, SetupError) as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    except Exception:
        # The traceback goes to train.log; the attempt (opened here if setup failed before
        # training began) is closed as failed.
        log.exception("the run failed")
        hint = distributed.failure_hint(group)  # distributed hook: say why a collective failed
        if hint:
            log.error("%s", hint)
        if session.attempt_index is None:
            session.start_attempt(cfg.max_steps, None, None)
            session.end_attempt("failed", "exception", EXIT_FAILED)
        return EXIT_FAILED
    finally:
        stop.restore()
        lock.release()


def _completed_already(cfg: TrainConfig, run_dir: Path, session) -> bool:
    """session.json says this very config already ran to ``max_steps`` and exported ``final/``:
    a re-run (say, of a sweep) then skips it in seconds, without building the model."""
    import json

    from so8t.config.identity import config_identity, upgrade_identity
    from so8t.run.folder_manifest import verify_folder

    data = session.load()
    recorded = data.get("config_identity")
    step = data.get("global_step")
    if (cfg.resume != "auto" or data.get("status") != "completed" or not isinstance(step, int)
            or step < cfg.max_steps
            or not isinstance(recorded, dict)
            or upgrade_identity(recorded) != json.loads(json.dumps(config_identity(cfg)))):
        return False
    problems = verify_folder(run_dir / "final")
    if problems:
        log.warning("session.json says completed, but final/ does not verify (%s): checking the run",
                    "; ".join(problems[:3]))
        return False
    log.info("run already completed: step %d of max_steps=%d (session.json); skipped", step, cfg.max_steps)
    return True


def _use_deterministic_algorithms() -> None:
    """For so8t-verify-resume (SO8T_DETERMINISTIC=1): deterministic CUDA kernels, so two runs
    can only differ through their state. cuBLAS needs its workspace setting before it starts."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    log.info("torch.use_deterministic_algorithms(True) (SO8T_DETERMINISTIC=1)")


def _train(cfg: TrainConfig, run_dir: Path, session, stop, deadline: Deadline, lock, group) -> int:
    from so8t import distributed
    from so8t.build import build_components
    from so8t.checkpoint import DEFAULT_SHAPE_KEYS, CheckpointService
    from so8t.config.identity import config_identity
    from so8t.errors import SetupError
    from so8t.resume_config import RESUME_SHAPE_KEYS, capture_hyperparameters, reapply_hyperparameters
    from so8t.run.console import run_summary
    from so8t.run.folder_manifest import verify_folder
    from so8t.run.metrics import MetricsWriter
    from so8t.run.trackers import open_trackers

    log.info("run dir: %s", run_dir.resolve())
    if os.environ.get("SO8T_DETERMINISTIC") == "1":
        _use_deterministic_algorithms()
    components = build_components(cfg, group)
    trainer = components.trainer
    identity = config_identity(cfg)
    # Checkpoints also record which base weights they were trained on (session.json keeps the
    # config identity alone, so a completed run is recognised without loading the model).
    checkpoint_identity = {**identity, **components.base_fingerprint}
    checkpoints = CheckpointService(run_dir, cfg.checkpoint, trainer.stateful_parts(), checkpoint_identity,
                                    shape_keys=(*DEFAULT_SHAPE_KEYS, *RESUME_SHAPE_KEYS), fence=lock.check_owner,
                                    ranks=distributed.RankParts(group))
    fresh = capture_hyperparameters(trainer)
    resumed = distributed.resume_group(checkpoints, cfg.resume, checkpoint_identity, group)
    if resumed is not None:
        reapply_hyperparameters(trainer, fresh, cfg.ppo.kl.kind, resumed.changed_keys)
        log.info("resumed from step %d (checkpoint %s, reason %s)", resumed.step, resumed.path, resumed.reason)
    else:
        log.info("starting fresh at step 0")
    step = trainer.counters.step
    if step >= cfg.max_steps:
        log.info("run already completed: step %d of max_steps=%d; nothing to do", step, cfg.max_steps)
        problems = verify_folder(run_dir / "final")
        if problems:
            log.info("exporting final/ again: %s", "; ".join(problems[:3]))
            _export_final(cfg, components, run_dir)
        checkpoints.close()
        if session.data.get("status") != "completed":
            # The attempt that reached max_steps died before closing session.json (killed between
            # its end checkpoint and the export): this attempt finished the run; record it.
            session.start_attempt(cfg.max_steps, identity, step)
            session.update(step, trainer.counters.training_time)
            session.end_attempt("completed", "end", EXIT_OK)
        return EXIT_OK

    from so8t.checkpoint.errors import CheckpointError, CheckpointingStalledError, OwnershipLostError

    session.start_attempt(cfg.max_steps, identity, step if resumed is not None else None)
    # Distributed hook: rank 0 writes the run's metrics, trackers and samples.
    try:
        trackers = open_trackers(cfg, run_dir, session, step) if group.is_main else distributed.NullWriter()
    except SetupError:
        checkpoints.close()
        session.end_attempt("failed", "refused", EXIT_REFUSED)
        raise
    samples = MetricsWriter(run_dir / cfg.output.samples_file) if group.is_main else distributed.NullWriter()
    status, reason, code = "failed", "exception", EXIT_FAILED
    try:
        try:
            status, reason, code = _loop(cfg, trainer, checkpoints, trackers, samples, session, stop, deadline)
            if status == "completed" and cfg.checkpoint.save_on_end:
                if trainer.group.broadcast(_already_saved(checkpoints, trainer.counters.step)):
                    _record_progress(session, trainer, checkpoints)
                else:
                    _save(checkpoints, session, trainer, "end", deadline)
        except OwnershipLostError as exc:
            # Nothing more is written: the folder, session.json included, is the new owner's.
            log.error("%s", exc)
            session.detach()
            status, reason, code = "failed", "taken over", EXIT_LOCKED
            return code
        except CheckpointingStalledError as exc:
            log.error("%s", exc)
            status, reason, code = "failed", "checkpointing", EXIT_CHECKPOINTING
        except CheckpointError as exc:  # the end checkpoint: the run must not be called completed
            log.error("%s; the run is not completed: run the same command again once saving works", exc)
            status, reason, code = "failed", "checkpointing", EXIT_CHECKPOINTING
        if status == "completed":
            try:
                _export_final(cfg, components, run_dir)
            except OSError as exc:  # a full disk: the end checkpoint holds the result
                log.error("could not write final/: %s; the run is not completed (its end checkpoint is "
                          "intact): run the same command again once there is room", exc)
                status, reason, code = "failed", "export", EXIT_CHECKPOINTING
                return code
        log.info("%s", run_summary(run_dir, status, trainer.counters.step, cfg.max_steps, step,
                                   trainer.counters.training_time, cfg.output.metrics_file))
        return code
    finally:
        trackers.close(status)
        samples.close()
        try:
            checkpoints.close()
        except CheckpointError as exc:  # logged when it happened; said once more, without a traceback
            log.error("%s", exc)
        session.set_checkpoint_stats(checkpoints.stats)
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
    session.set_checkpoint_stats(checkpoints.stats)
    session.update(trainer.counters.step, trainer.counters.training_time, last_checkpoint=last)


def _write_samples(cfg, trainer, samples) -> None:
    """A few episodes of this update, raw text included, at the first update and every
    ``output.samples_every`` updates: where a user checks what the model was given and said."""
    step, every = trainer.counters.step, cfg.output.samples_every
    if every and (step == 1 or step % every == 0):
        for sample in trainer.samples:
            samples.write({"step": step, **sample})


def _stop_save(checkpoints, session, trainer, reason: str, deadline: Deadline) -> None:
    """The checkpoint of a stop (signal, deadline): once per step, and a failure is reported
    without turning the stop into another exit code — the caller exits as the stop asks,
    so a job script or sweep stops too; the older checkpoints are intact."""
    from so8t.checkpoint.errors import CheckpointError, OwnershipLostError

    if _already_saved(checkpoints, trainer.counters.step):  # the cadence just committed this step
        _record_progress(session, trainer, checkpoints)
        return
    try:
        _save(checkpoints, session, trainer, reason, deadline)
    except OwnershipLostError:
        raise
    except CheckpointError as exc:
        newest = checkpoints.newest_verified
        log.error("%s; stopping anyway: a re-run resumes from %s", exc,
                  f"step {newest.step}" if newest else "the start")
        _record_progress(session, trainer, checkpoints)


def _loop(cfg, trainer, checkpoints, trackers, samples, session, stop, deadline: Deadline) -> tuple[str, str, int]:
    """PPO updates until max_steps, a stop signal or the deadline; returns (status, reason, code)."""
    from so8t.run.console import bar_postfix, log_update, progress_bars

    show = cfg.output.progress_bars if trainer.group.is_main else False  # distributed hook: rank 0's bars
    with progress_bars(show, cfg.max_steps, trainer.counters.step, cfg.ppo.ppo_epochs) as (steps, epochs):
        while trainer.counters.step < cfg.max_steps:
            stop.agree()  # distributed hook: every rank stops at the same boundary
            if stop.requested:
                break
            if deadline.next_step_would_overrun():
                log.warning("stopping before max_wall_seconds=%s: the next update and a save might not fit",
                            cfg.max_wall_seconds)
                _stop_save(checkpoints, session, trainer, "deadline", deadline)
                return "interrupted", "deadline", EXIT_DEADLINE
            epochs.reset()
            row = trainer.train_step(on_epoch=lambda _epoch: epochs.update(1))
            deadline.observe_step(row["time/step"])
            trackers.log(row)
            _write_samples(cfg, trainer, samples)
            steps.set_postfix(bar_postfix(row), refresh=False)
            steps.update(1)
            log_update(row)
            stop.agree()
            if stop.requested:
                break
            began = time.monotonic()
            if checkpoints.maybe_save(trainer.counters.step) is not None:
                deadline.observe_save(time.monotonic() - began)
            _record_progress(session, trainer, checkpoints)
    if stop.requested:
        log.warning("stop requested by %s: saving at step %d, then exiting with code %d "
                    "(a second Ctrl+C aborts at once)", stop.name, trainer.counters.step, stop.exit_code)
        _stop_save(checkpoints, session, trainer, "signal", deadline)
        return "interrupted", stop.name or "signal", stop.exit_code
    return "completed", "end", EXIT_OK
