"""On resume, the config of this command wins over the hyperparameters a checkpoint restored.

Loading an optimizer's or a scheduler's ``state_dict`` brings back its hyperparameters along with
its state: the learning rate, betas, eps and weight decay of every parameter group, the
scheduler's base learning rates, a fixed KL coefficient. A changed value that the checkpoint
check accepted (with a warning) would then be silently undone. So the recipe takes the values a
fresh build from *this* config produced (:func:`capture_hyperparameters`, before the resume) and
puts them back afterwards (:func:`reapply_hyperparameters`); what is genuinely state stays as
restored: Adam moments and step counts, the scheduler's position, an adaptive KL coefficient, the
sampler's position, counters, RNGs.

Every other accepted key is read from the config when the trainer is built (clip ranges, PPO
epochs, batch sizes, reward weights, KL target and horizon …), so it applies by construction.
The ``seed`` is refused on resume (:data:`RESUME_SHAPE_KEYS`): the restored RNGs and sampler
seed would make a new value a no-op, which is worse than a clear refusal. So is another optimizer
class (``ppo.optimizer._target_``), whose state would not fit, and a checkpoint written with the
earlier config layout (:func:`earlier_layout_refusal`).

``max_steps`` is the horizon of a decaying LR schedule (linear, cosine: transformers'
``num_training_steps``). The schedule is a function of (step, max_steps), so after a resume with
another ``max_steps`` the LR follows the curve of a run started with the new value: a longer
``max_steps`` raises the LR at the resume point to that curve's value there (linear, 60 → 120 at
step 60: from 0 to half the peak) and decays it to zero at the new end. Bit-exact against an
uninterrupted run of the new length.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

log = logging.getLogger(__name__)

__all__ = ["RESUME_SHAPE_KEYS", "capture_hyperparameters", "earlier_layout_refusal", "reapply_hyperparameters"]

# Keys refused on resume in addition to the checkpoint's shape keys (model.*, adapter.*). Another
# optimizer class keeps other state (SGD's momentum buffer, not Adam's moments): loading one into
# the other would silently drop it.
RESUME_SHAPE_KEYS = ("seed", "ppo.optimizer._target_")

# Identity keys that only the earlier config layout had: the optimizer's own learning_rate and the
# schedule under ppo.optimizer (now torch's `lr` and ppo.scheduler), reward options under `kwargs`.
_EARLIER_OPTIMIZER_KEYS = ("ppo.optimizer.learning_rate", "ppo.optimizer.lr_schedule", "ppo.optimizer.warmup_steps")
_EARLIER_REWARD_KEY = re.compile(r"reward\.terms\.[^.]+\.kwargs\.")

_STATE_KEYS = ("params",)  # what a param group holds that is not a hyperparameter


def earlier_layout_refusal(saved_identity: Mapping[str, Any]) -> str | None:
    """Why a checkpoint written with the earlier config layout is not resumed, or None.

    Mapping it would not continue the same run: its warm-up followed (step + 1) / warmup_steps,
    transformers' schedules follow step / num_warmup_steps, so a mapped run would take other
    learning rates than it started with. A clear refusal keeps the run intact for the version that
    wrote it.
    """
    earlier = [key for key in saved_identity if key in _EARLIER_OPTIMIZER_KEYS or _EARLIER_REWARD_KEY.match(key)]
    if not earlier:
        return None
    return (
        f"it was written with the earlier config layout ({', '.join(sorted(earlier)[:4])}), which this "
        "version replaced: the optimizer is ppo.optimizer._target_ with torch's argument names "
        "(ppo.optimizer.lr, not learning_rate), the LR schedule is ppo.scheduler (a transformers "
        "schedule: name, num_warmup_steps), and a reward term's options sit beside its weight "
        "(reward.terms.NAME.OPTION, not reward.terms.NAME.kwargs.OPTION); a warm-up now runs at "
        "step / num_warmup_steps of the peak, not (step + 1) / warmup_steps, so the run cannot be continued "
        "as it started. Finish the run with the so8t version that "
        "started it, or start it again under another run_name with the new keys (its checkpoints and "
        "final/ stay where they are)"
    )


def capture_hyperparameters(trainer) -> dict[str, Any]:
    """The hyperparameters a fresh build from the config gave the trainer (call before resume)."""
    scheduler = trainer.lr_scheduler
    return {
        "groups": [{k: v for k, v in g.items() if k not in _STATE_KEYS and k != "lr"}
                   for g in trainer.optimizer.param_groups],
        "base_lrs": list(getattr(scheduler, "base_lrs", []) or []),
        "kl_value": getattr(trainer.kl_controller, "value", None),
    }


def reapply_hyperparameters(trainer, fresh: dict[str, Any], kl_kind: str, changed_keys: list[str]) -> None:
    """Put back what :func:`capture_hyperparameters` took, over the state a resume loaded."""
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    if len(fresh["groups"]) != len(optimizer.param_groups):
        # load_state_dict would already have refused this; say so rather than guess.
        raise ValueError("the optimizer's parameter groups changed since the checkpoint")
    for group, values in zip(optimizer.param_groups, fresh["groups"]):
        group.update(values)
    if fresh["base_lrs"]:
        scheduler.base_lrs = list(fresh["base_lrs"])
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None:
        # The LR of the next update, from this config's schedule at the restored position: the
        # same expression LambdaLR.step() evaluates, so an unchanged config gives the same bits.
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    elif fresh["base_lrs"]:
        log.warning("the LR scheduler %s cannot be re-evaluated; a changed learning rate applies from its "
                    "next step", type(scheduler).__name__)
    kl = trainer.kl_controller
    if fresh["kl_value"] is not None and hasattr(kl, "value"):
        # A fixed coefficient is configuration; an adaptive one is state, reset only when the
        # user changed where it starts or the kind of controller.
        if kl_kind == "fixed" or {"ppo.kl.init_coef", "ppo.kl.kind"} & set(changed_keys):
            kl.value = fresh["kl_value"]
