"""One run, start to end: setup → train → cleanup (the torchtune recipe shape).

Setup builds the components from the config; train runs PPO updates with progress bars
and a metrics row per update; cleanup exports ``final/``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)


def run_dir_of_job() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _postfix(row: dict) -> dict:
    return {
        "reward": f"{row['reward/mean']:.3f}",
        "loss": f"{row['loss/total']:.3f}",
        "kl": f"{row['kl/mean']:.4f}",
        "s/step": f"{row['time/step']:.2f}",
    }


def run_training(cfg: DictConfig, run_dir: Path | None = None) -> int:
    """Train the run described by ``cfg`` in ``run_dir``; returns the process exit code."""
    from so8t.build import build_components
    from so8t.model.export import save_final
    from so8t.run.metrics import MetricsWriter

    run_dir = Path(run_dir) if run_dir is not None else run_dir_of_job()
    logging.getLogger("so8t").setLevel(cfg.logger.level)
    log.info("run dir: %s", run_dir.resolve())
    parts = build_components(cfg)
    trainer = parts.trainer
    metrics = MetricsWriter(run_dir / cfg.logger.metrics_file)

    show = cfg.logger.progress_bars
    start = trainer.counters.step
    with logging_redirect_tqdm():
        steps = tqdm(total=cfg.max_steps, initial=start, desc="updates", unit="update", disable=not show,
                     dynamic_ncols=True)
        epochs = tqdm(total=cfg.ppo.ppo_epochs, desc="ppo epochs", unit="epoch", leave=False,
                      disable=not show, dynamic_ncols=True)
        try:
            while trainer.counters.step < cfg.max_steps:
                epochs.reset()
                row = trainer.train_step(on_epoch=lambda _epoch: epochs.update(1))
                metrics.write(row)
                steps.set_postfix(_postfix(row), refresh=False)
                steps.update(1)
                log.info(
                    "step %d: reward %.3f loss %.4f kl %.4f entropy %.3f clip %.3f (%.2fs)",
                    row["step"], row["reward/mean"], row["loss/total"], row["kl/mean"], row["entropy"],
                    row["clip_fraction"], row["time/step"],
                )
        finally:
            epochs.close()
            steps.close()
            metrics.close()

    gate = trainer.gate_schedule.value(trainer.counters.step) if trainer.gate_schedule is not None else None
    save_final(
        parts.policy,
        parts.tokenizer,
        OmegaConf.to_container(cfg.model, resolve=True),
        OmegaConf.to_container(cfg.adapter, resolve=True),
        gate,
        run_dir / "final",
        extra={"step": trainer.counters.step},
    )
    log.info("done: %d updates, %.1f s of training", trainer.counters.step, trainer.counters.training_time)
    return 0
