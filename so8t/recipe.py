"""One run, start to end: ``TrainingRecipe.setup`` → ``train`` → ``cleanup`` (the torchtune recipe shape).

Setup takes the run dir's lock, records the attempt, builds the components and resumes
from the newest good checkpoint; train runs PPO updates and acts at each step boundary
(metrics row, checkpoint cadence, stop signal, deadline); cleanup saves the end checkpoint,
exports ``final/``, closes the attempt in ``session.json`` and unlocks the run dir.
``run_training(cfg, run_dir)`` is the public entry: it calls the three phases and returns the
process exit code (so8t.exit_codes).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from so8t.config.schema import TrainConfig
from so8t.exit_codes import ExitCode
from so8t.run.clock import Deadline, process_started

log = logging.getLogger(__name__)

def run_dir_of_job() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _hydra_output_subdir() -> str | None:
    """Where Hydra wrote this job's record, relative to the run dir (None outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().output_subdir if HydraConfig.initialized() else None


def run_training(cfg: TrainConfig, run_dir: Path | None = None) -> int:
    """Train the run described by ``cfg`` (a validated config: ``so8t.config.validate.validate``
    of the composed one) in ``run_dir``; returns the process exit code."""
    recipe = TrainingRecipe(cfg, run_dir)
    try:
        if recipe.setup():
            recipe.train()
    finally:
        # Also on a second Ctrl+C (KeyboardInterrupt): the attempt is closed, the run dir unlocked.
        code = recipe.cleanup()
    return code


class TrainingRecipe:
    """One attempt at a run, in three phases: :meth:`setup`, :meth:`train`, :meth:`cleanup`.

    Every phase turns the errors that end the run into the exit code :meth:`cleanup` returns
    (a refusal: 2, an unexpected exception: 1 with its traceback in train.log, a checkpoint
    failure: 74, a takeover of the run dir: 3), so the caller only calls the three in order.
    """

    def __init__(self, cfg: TrainConfig, run_dir: Path | None = None):
        self.cfg = cfg
        # Taken first: max_wall_seconds counts from the process start, not from here.
        self.started = process_started()
        self.run_dir = Path(run_dir) if run_dir is not None else run_dir_of_job()
        self.group = None
        self.lock = None
        self.stop = None
        self.session = None
        self.deadline = None
        self.components = None
        self.trainer = None
        self.checkpoints = None
        self.trackers = None
        self.samples = None
        self.start_step = 0
        self.code: int = ExitCode.FAILED  # the process exit code
        # How the attempt ends in session.json: status, end reason, exit code (a refusal raised
        # during training is exit code 2 but an attempt that failed with an exception).
        self.outcome: tuple[str, str, int] = ("failed", "exception", ExitCode.FAILED)
        self.attempt_open = False  # an attempt with its trackers and checkpoints is open
        self.loop_ended = False  # the update loop came to a verdict (completed, stopped, failed saving)
        self.taken_over = False  # another process owns the run dir now: write nothing more

    # ------------------------------------------------------------------ setup

    def setup(self) -> bool:
        """Join the process group, lock the run dir, skip a completed run, archive Hydra's
        config, build the components, resume and open the attempt. True when there are
        updates to train; otherwise :meth:`cleanup` returns how the run ended."""
        from so8t import distributed
        from so8t.errors import SetupError
        from so8t.run.attempts import adopt_hydra_files, discard_hydra_files
        from so8t.run.lock import RunLock, RunLockedError, RunLockUnavailableError
        from so8t.run.run_log import discard_run_log, open_run_log
        from so8t.run.session import SessionFile
        from so8t.run.signals import StopSignal

        cfg, run_dir = self.cfg, self.run_dir
        # Distributed hook (so8t.distributed): join the launcher's process group (a lone process
        # is a group of one); rank 0 holds the lock, and its outcome is every rank's.
        try:
            group = distributed.join_group(cfg.hardware)
            distributed.check_batch_sizes(cfg.ppo, cfg.hardware, group)
        except SetupError as exc:
            open_run_log()
            log.error("%s", exc)
            self.code = ExitCode.REFUSED
            return False
        self.group = group
        distributed.redirect_rank_log(run_dir, group)
        incoming = _hydra_output_subdir()
        lock = RunLock(run_dir)
        refusal = None
        if group.is_main:
            try:
                lock.acquire()
            except RunLockedError as exc:
                refusal = (ExitCode.LOCKED, str(exc))
            except RunLockUnavailableError as exc:
                refusal = (ExitCode.REFUSED, str(exc))
        refusal = group.broadcast(refusal)
        if refusal is not None:
            code, message = refusal
            if code == ExitCode.LOCKED:
                # The run is another live process's: leave its train.log and .hydra/ alone.
                discard_run_log()
                discard_hydra_files(run_dir, incoming)
            else:
                open_run_log()
            log.error("%s", message)
            self.code = code
            return False
        self.lock = lock
        open_run_log()
        if group.is_main:
            adopt_hydra_files(run_dir, incoming)
        self.stop = distributed.GroupStop(StopSignal(), group).install()
        self.session = SessionFile(run_dir) if group.is_main else distributed.NullSession()
        with self._failures():
            return self._prepare()
        return False

    def _prepare(self) -> bool:
        from so8t import distributed
        from so8t.build import build_components
        from so8t.checkpoint import DEFAULT_SHAPE_KEYS, CheckpointService
        from so8t.config.identity import config_identity
        from so8t.errors import SetupError
        from so8t.resume_config import (
            RESUME_SHAPE_KEYS,
            capture_hyperparameters,
            earlier_layout_refusal,
            reapply_hyperparameters,
        )
        from so8t.run.attempts import archive_hydra_config
        from so8t.run.folder_manifest import verify_folder
        from so8t.run.metrics import MetricsWriter
        from so8t.run.trackers import open_trackers

        cfg, run_dir, group, session = self.cfg, self.run_dir, self.group, self.session
        if group.broadcast(_completed_already(cfg, run_dir, session) if group.is_main else None):
            self.code = ExitCode.OK
            return False
        if group.is_main:
            archive_hydra_config(run_dir)
        session.load()
        self.deadline = distributed.AgreedDeadline(Deadline(cfg.max_wall_seconds, self.started), group)

        log.info("run dir: %s", run_dir.resolve())
        if os.environ.get("SO8T_DETERMINISTIC") == "1":
            _use_deterministic_algorithms()
        self.components = components = build_components(cfg, group)
        self.trainer = trainer = components.trainer
        identity = config_identity(cfg)
        # Checkpoints also record which base weights they were trained on (session.json keeps the
        # config identity alone, so a completed run is recognised without loading the model).
        checkpoint_identity = {**identity, **components.base_fingerprint}
        self.checkpoints = checkpoints = CheckpointService(
            run_dir, cfg.checkpoint, trainer.stateful_parts(), checkpoint_identity,
            shape_keys=(*DEFAULT_SHAPE_KEYS, *RESUME_SHAPE_KEYS), fence=self.lock.check_owner,
            ranks=distributed.RankParts(group), refuse_identity=earlier_layout_refusal)
        fresh = capture_hyperparameters(trainer)
        resumed = distributed.resume_group(checkpoints, cfg.resume, checkpoint_identity, group)
        if resumed is not None:
            reapply_hyperparameters(trainer, fresh, cfg.ppo.kl.kind, resumed.changed_keys)
            log.info("resumed from step %d (checkpoint %s, reason %s)", resumed.step, resumed.path, resumed.reason)
        else:
            log.info("starting fresh at step 0")
        self.start_step = step = trainer.counters.step
        if step >= cfg.max_steps:
            log.info("run already completed: step %d of max_steps=%d; nothing to do", step, cfg.max_steps)
            problems = verify_folder(run_dir / "final")
            if problems:
                log.info("exporting final/ again: %s", "; ".join(problems[:3]))
                self._export_final()
            checkpoints.close()
            if session.data.get("status") != "completed":
                # The attempt that reached max_steps died before closing session.json (killed between
                # its end checkpoint and the export): this attempt finished the run; record it.
                session.start_attempt(cfg.max_steps, identity, step)
                session.update(step, trainer.counters.training_time)
                session.end_attempt("completed", "end", ExitCode.OK)
            self.code = ExitCode.OK
            return False

        session.start_attempt(cfg.max_steps, identity, step if resumed is not None else None)
        # Distributed hook: rank 0 writes the run's metrics, trackers and samples.
        try:
            self.trackers = open_trackers(cfg, run_dir, session, step) if group.is_main else distributed.NullWriter()
        except SetupError:
            checkpoints.close()
            session.end_attempt("failed", "refused", ExitCode.REFUSED)
            raise
        self.samples = (MetricsWriter(run_dir / cfg.output.samples_file) if group.is_main
                        else distributed.NullWriter())
        self.attempt_open = True
        return True

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """PPO updates until max_steps, a stop signal or the deadline; after each, the metrics
        row, samples, progress bars, the checkpoint cadence and session.json."""
        with self._failures():
            with self._checkpoint_failures():
                self._set_outcome(*self._loop())
            self.loop_ended = not self.taken_over

    def _loop(self) -> tuple[str, str, int]:
        """Returns (status, reason, code) of the attempt."""
        from so8t.run.console import bar_postfix, log_update, progress_bars

        cfg, trainer, checkpoints, stop, deadline = self.cfg, self.trainer, self.checkpoints, self.stop, self.deadline
        show = cfg.output.progress_bars if trainer.group.is_main else False  # distributed hook: rank 0's bars
        with progress_bars(show, cfg.max_steps, trainer.counters.step, cfg.ppo.ppo_epochs) as (steps, epochs):
            while trainer.counters.step < cfg.max_steps:
                stop.agree(deadline)  # distributed hook: one collective for the stop and the deadline
                if stop.requested:
                    break
                if deadline.next_step_would_overrun():
                    log.warning("stopping before max_wall_seconds=%s: the next update and a save might not fit",
                                cfg.max_wall_seconds)
                    self._stop_save("deadline")
                    return "interrupted", "deadline", ExitCode.DEADLINE
                epochs.reset()
                row = trainer.train_step(on_epoch=lambda _epoch: epochs.update(1))
                deadline.observe_step(row["time/step"])
                self.trackers.log(row)
                self._write_samples()
                steps.set_postfix(bar_postfix(row), refresh=False)
                steps.update(1)
                log_update(row)
                # Distributed hook: one collective for the stop, the save decision and the RNG hand-over.
                stop.agree(checkpoints=checkpoints, step=trainer.counters.step)
                if stop.requested:
                    break
                began = time.monotonic()
                if checkpoints.maybe_save(trainer.counters.step) is not None:
                    deadline.observe_save(time.monotonic() - began)
                self._record_progress()
        if stop.requested:
            log.warning("stop requested by %s: saving at step %d, then exiting with code %d "
                        "(a second Ctrl+C aborts at once)", stop.name, trainer.counters.step, stop.exit_code)
            self._stop_save("signal")
            return "interrupted", stop.name or "signal", stop.exit_code
        return "completed", "end", ExitCode.OK

    def _write_samples(self) -> None:
        """A few episodes of this update, raw text included, at the first update and every
        ``output.samples_every`` updates: where a user checks what the model was given and said."""
        trainer = self.trainer
        step, every = trainer.counters.step, self.cfg.output.samples_every
        if every and (step == 1 or step % every == 0):
            for sample in trainer.samples:
                self.samples.write({"step": step, **sample})

    def _save(self, reason: str) -> None:
        trainer = self.trainer
        began = time.monotonic()
        path = self.checkpoints.save_now(trainer.counters.step, reason)
        self.deadline.observe_save(time.monotonic() - began)
        self.session.update(trainer.counters.step, trainer.counters.training_time,
                            last_checkpoint={"step": trainer.counters.step, "path": str(path), "reason": reason})
        log.info("checkpoint at step %d (%s): %s", trainer.counters.step, reason, path)

    def _already_saved(self) -> bool:
        """True when the cadence already committed a checkpoint of this very step."""
        self.checkpoints.wait()
        saved = self.checkpoints.last_saved
        return saved is not None and saved.step == self.trainer.counters.step

    def _record_progress(self) -> None:
        """Progress into session.json; a checkpoint only once committed (a background write
        that is still running, or that failed, is not named there)."""
        saved = self.checkpoints.last_saved
        last = None if saved is None else {"step": saved.step, "path": str(saved.path), "reason": saved.reason}
        self.session.set_checkpoint_stats(self.checkpoints.stats)
        self.session.update(self.trainer.counters.step, self.trainer.counters.training_time, last_checkpoint=last)

    def _stop_save(self, reason: str) -> None:
        """The checkpoint of a stop (signal, deadline): once per step, and a failure is reported
        without turning the stop into another exit code — the caller exits as the stop asks,
        so a job script or sweep stops too; the older checkpoints are intact."""
        from so8t.checkpoint.errors import CheckpointError, OwnershipLostError

        if self._already_saved():  # the cadence just committed this step
            self._record_progress()
            return
        try:
            self._save(reason)
        except OwnershipLostError:
            raise
        except CheckpointError as exc:
            newest = self.checkpoints.newest_verified
            log.error("%s; stopping anyway: a re-run resumes from %s", exc,
                      f"step {newest.step}" if newest else "the start")
            self._record_progress()

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> int:
        """The end checkpoint, ``final/``, the end summary, the attempt closed in session.json,
        the signal handlers put back and the run dir unlocked; returns the process exit code."""
        try:
            if self.attempt_open:
                with self._failures():
                    try:
                        if self.loop_ended:
                            self._finish()
                    finally:
                        self._close_attempt()
        finally:
            if self.stop is not None:
                self.stop.restore()
            if self.lock is not None:
                self.lock.release()
        return self.code

    def _finish(self) -> None:
        from so8t.run.console import run_summary

        cfg, trainer = self.cfg, self.trainer
        with self._checkpoint_failures():
            if self.outcome[0] == "completed" and cfg.checkpoint.save_on_end:
                if trainer.group.broadcast(self._already_saved()):
                    self._record_progress()
                else:
                    self._save("end")
        if self.taken_over:
            return
        if self.outcome[0] == "completed":
            try:
                self._export_final()
            except OSError as exc:  # a full disk: the end checkpoint holds the result
                log.error("could not write final/: %s; the run is not completed (its end checkpoint is "
                          "intact): run the same command again once there is room", exc)
                self._set_outcome("failed", "export", ExitCode.CHECKPOINTING)
                return
        log.info("%s", run_summary(self.run_dir, self.outcome[0], trainer.counters.step, cfg.max_steps,
                                   self.start_step, trainer.counters.training_time, cfg.output.metrics_file))

    def _close_attempt(self) -> None:
        from so8t.errors import CheckpointError

        trainer, checkpoints, session = self.trainer, self.checkpoints, self.session
        status, reason, code = self.outcome
        self.trackers.close(status)
        self.samples.close()
        try:
            checkpoints.close()
        except CheckpointError as exc:  # logged when it happened; said once more, without a traceback
            log.error("%s", exc)
        session.set_checkpoint_stats(checkpoints.stats)
        session.update(trainer.counters.step, trainer.counters.training_time)
        session.end_attempt(status, reason, code)

    def _export_final(self) -> None:
        from so8t.config.typed import config_record
        from so8t.final_policy import save_final

        cfg, components, trainer = self.cfg, self.components, self.trainer
        if not trainer.group.is_main:  # distributed hook: rank 0 writes final/
            return
        gate = trainer.gate_schedule.value(trainer.counters.step) if trainer.gate_schedule is not None else None
        save_final(
            components.policy,
            components.tokenizer,
            config_record(cfg.model),
            config_record(cfg.adapter),
            gate,
            self.run_dir / "final",
            extra={
                "step": trainer.counters.step,
                # How the policy was asked and when it stopped, so load_policy(...).generate asks
                # and stops the same way.
                "stop_token_ids": list(trainer.stop_ids),
                "prompting": {key: getattr(cfg.data, key) for key in ("chat_template", "system_prompt", "instruction")},
            },
        )

    # ------------------------------------------------------------------ errors

    def _set_outcome(self, status: str, reason: str, code: int) -> None:
        self.outcome = (status, reason, code)
        self.code = code

    @contextmanager
    def _checkpoint_failures(self) -> Iterator[None]:
        """Checkpoint errors of the update loop and the end checkpoint, as the attempt's outcome."""
        from so8t.checkpoint.errors import CheckpointError, CheckpointingStalledError, OwnershipLostError

        try:
            yield
        except OwnershipLostError as exc:
            # Nothing more is written: the folder, session.json included, is the new owner's.
            log.error("%s", exc)
            self.session.detach()
            self.taken_over = True
            self._set_outcome("failed", "taken over", ExitCode.LOCKED)
        except CheckpointingStalledError as exc:
            log.error("%s", exc)
            self._set_outcome("failed", "checkpointing", ExitCode.CHECKPOINTING)
        except CheckpointError as exc:  # the end checkpoint: the run must not be called completed
            log.error("%s; the run is not completed: run the same command again once saving works", exc)
            self._set_outcome("failed", "checkpointing", ExitCode.CHECKPOINTING)

    @contextmanager
    def _failures(self) -> Iterator[None]:
        """An error that ends the run, as its exit code: a refusal (2) in one line, anything else
        (1) with its traceback in train.log."""
        from so8t import distributed
        from so8t.errors import CheckpointError, ModelNotAvailableError, SetupError

        try:
            yield
        except (CheckpointError, ModelNotAvailableError, SetupError) as exc:
            log.error("%s", exc)
            self.code = ExitCode.REFUSED
        except Exception:
            log.exception("the run failed")
            hint = distributed.failure_hint(self.group)  # distributed hook: say why a collective failed
            if hint:
                log.error("%s", hint)
            if self.session.attempt_index is None:  # setup failed before the attempt was opened
                self.session.start_attempt(self.cfg.max_steps, None, None)
                self.session.end_attempt("failed", "exception", ExitCode.FAILED)
            self.code = ExitCode.FAILED


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
