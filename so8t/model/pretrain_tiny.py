"""Pre-train the embedded tiny instruct model on ``a+b=`` chat turns, stopping while it is only partly right.

Run ``python -m so8t.model.pretrain_tiny`` to regenerate ``so8t/model/assets/tiny``.

Every training example is a chat turn exactly as the default run renders it (Phi-3.5's
template around the default system prompt, which asks for the SO8T answer format, the
instruction and the question), followed by the answer and the end-of-turn token ``<|end|>``.
The shipped model is a *starting point for PPO*, with visible room to improve in two ways:

* it follows the system prompt's format (``<think></think><final>N</final>``) for only a
  minority of its training targets (``1 - plain_fraction``, 30 %); the rest are the bare
  ``<final>N</final>`` that the strict format reward rejects, so its greedy answers are
  bare. Choosing the format is a global behaviour that the SO(8) adapters
  (input-independent rotations of the residual stream) can learn quickly, which is why the
  tiny default task is built this way;
* it gets only some sums right. Training stops on a criterion (greedy answer accuracy on
  operands 0-9 reaching a target, with a well-formed answer nearly always) rather than
  after a fixed number of steps. Everything is seeded; on the same torch build and thread
  count the result is reproducible.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import Phi3ForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from so8t.config.typed import option_config
from so8t.data.prompts import Prompt, build_prompts
from so8t.model.policy import positions_from_mask
from so8t.model.tiny import (
    END,
    TINY_DIR,
    build_tiny_config,
    build_tiny_generation_config,
    build_tiny_tokenizer,
    stop_token_ids,
)

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<think>.*?</think><final>(\d+)</final>")
_PLAIN = re.compile(r"<final>(\d+)</final>")


def chat_prompts(tokenizer: PreTrainedTokenizerBase, max_operand: int) -> list[Prompt]:
    """Every ``a+b=`` with 0 <= a, b <= max_operand, as the default run renders it: the
    chat template around the default system prompt, instruction and question."""
    width = max_operand + 1
    data = option_config("data", "arithmetic", min_operand=0, max_operand=max_operand, num_prompts=width * width,
                         seed=0)
    prompts = build_prompts(data, tokenizer)
    return sorted(prompts, key=lambda p: _operands(p))


def _operands(prompt: Prompt) -> tuple[int, int]:
    question = prompt.chat()[-1]["content"].rsplit(" ", 1)[-1]
    a, b = question.removesuffix("=").split("+")
    return int(a), int(b)


def target_text(reference: str) -> str:
    """The response the model should write (the end-of-turn token follows it)."""
    return f"<think></think><final>{reference}</final>"


def plain_target_text(reference: str) -> str:
    """The bare answer style the pre-training mixes in (no think block: the reward rejects it)."""
    return f"<final>{reference}</final>"


def build_sft_batch(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], plain: list[bool] | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded ``prompt + target + <|end|>`` sequences; labels only on the response.

    ``plain[i]`` picks the bare answer style for row i (default: the SO8T format everywhere)."""
    rows = []
    plain = plain or [False] * len(prompts)
    end_id = tokenizer.convert_tokens_to_ids(END)
    for prompt, bare in zip(prompts, plain):
        target = plain_target_text(prompt.reference) if bare else target_text(prompt.reference)
        response = tokenizer(target, add_special_tokens=False).input_ids
        rows.append((list(prompt.input_ids), response + [end_id]))
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        seq = prompt + response
        start = width - len(seq)
        input_ids[i, start:] = torch.tensor(seq)
        attention_mask[i, start:] = 1
        labels[i, width - len(response) :] = torch.tensor(response)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": positions_from_mask(attention_mask),
        "labels": labels,
    }


@torch.no_grad()
def evaluate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    max_new_tokens: int = 12,
) -> dict[str, float]:
    """Greedy-decode each prompt and score it.

    ``format_rate``: the response (up to a stop token) has the answer format and ends with
    a stop token. ``accuracy``: the response is exactly the target followed by a stop.
    ``answer_accuracy``: the sum is right in either style; ``well_formed``: either style.
    """
    was_training = model.training
    model.eval()
    stops = stop_token_ids(tokenizer)
    enc = tokenizer.pad({"input_ids": [list(p.input_ids) for p in prompts]}, return_tensors="pt").to(model.device)
    out = model.generate(
        **enc,
        position_ids=positions_from_mask(enc.attention_mask),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stops,
    )
    responses = out[:, enc.input_ids.shape[1] :].tolist()
    formatted = correct = answered = well_formed = 0
    for prompt, ids in zip(prompts, responses):
        ended = [i for i, t in enumerate(ids) if t in stops]
        if not ended:
            continue  # never finished: neither formatted nor correct
        text = tokenizer.decode(ids[: ended[0]])
        if _ANSWER.fullmatch(text):
            formatted += 1
        if text == target_text(prompt.reference):
            correct += 1
        if _ANSWER.fullmatch(text) or _PLAIN.fullmatch(text):
            well_formed += 1
        if text in (target_text(prompt.reference), plain_target_text(prompt.reference)):
            answered += 1
    model.train(was_training)
    n = len(prompts)
    return {"format_rate": formatted / n, "accuracy": correct / n, "answer_accuracy": answered / n,
            "well_formed": well_formed / n}


@dataclass
class PretrainSettings:
    seed: int = 0
    max_operand: int = 19  # training operands 0..max_operand
    eval_max_operand: int = 9  # the stopping criterion looks at operands 0..this
    target_accuracy: float = 0.8  # stop once greedy answer accuracy on the eval pairs exceeds this
    min_format_rate: float = 0.9  # ... and the answer is (nearly) always well formed, either style
    plain_fraction: float = 0.7  # share of training targets in the bare style
    max_steps: int = 3000  # safety net; reaching it means the criterion was never met
    batch_size: int = 64
    lr: float = 3e-3
    eval_every: int = 5


def pretrain(settings: PretrainSettings) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict]:
    """Train a fresh tiny model until the stopping criterion holds; return it and a report."""
    torch.manual_seed(settings.seed)
    tokenizer = build_tiny_tokenizer()
    model = Phi3ForCausalLM(build_tiny_config(tokenizer=tokenizer))
    model.train()

    prompts = chat_prompts(tokenizer, settings.max_operand)
    # Every question appears in both styles; the bare style is drawn with ``plain_fraction``.
    train = build_sft_batch(tokenizer, prompts + prompts, [False] * len(prompts) + [True] * len(prompts))
    style_weights = torch.tensor(
        [1.0 - settings.plain_fraction] * len(prompts) + [settings.plain_fraction] * len(prompts))
    eval_prompts = chat_prompts(tokenizer, settings.eval_max_operand)
    # A private generator so the data order depends only on the seed.
    order_rng = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)

    started = time.monotonic()
    step, metrics = 0, {"format_rate": 0.0, "accuracy": 0.0, "answer_accuracy": 0.0, "well_formed": 0.0}
    stopped_on_criterion = False
    while step < settings.max_steps:
        idx = torch.multinomial(style_weights, settings.batch_size, replacement=True, generator=order_rng)
        loss = model(**{k: v[idx] for k, v in train.items()}).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % settings.eval_every == 0:
            metrics = evaluate_greedy(model, tokenizer, eval_prompts)
            log.debug("step %d loss %.4f %s", step, loss.item(), metrics)
            if (
                metrics["answer_accuracy"] > settings.target_accuracy
                and metrics["well_formed"] >= settings.min_format_rate
            ):
                stopped_on_criterion = True
                break
    seconds = time.monotonic() - started
    if not stopped_on_criterion:
        log.warning("stopping criterion not met after %d steps: %s", step, metrics)

    model.eval()
    report = {
        "steps": step,
        "seconds": round(seconds, 2),
        "stopped_on_criterion": stopped_on_criterion,
        "final_loss": round(loss.item(), 4),
        f"eval_operands_0_{settings.eval_max_operand}": metrics,
        f"eval_operands_0_{settings.max_operand}": evaluate_greedy(model, tokenizer, prompts),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, tokenizer, report


def save_tiny(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, note: dict
) -> None:
    """Write weights (safetensors), tokenizer files, the generation config with every stop
    id, and a ``training.json`` note."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = build_tiny_generation_config(tokenizer)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 records its internal class name "TokenizersBackend"; the public alias
    # PreTrainedTokenizerFast names the same class and is also what older versions know.
    cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "training.json").write_text(json.dumps(note, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=TINY_DIR, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--steps", type=int, default=defaults.max_steps, help="max steps")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--target-accuracy", type=float, default=defaults.target_accuracy)
    parser.add_argument("--plain-fraction", type=float, default=defaults.plain_fraction,
                        help="share of training targets in the bare <final>N</final> style")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = PretrainSettings(
        seed=args.seed,
        max_steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        target_accuracy=args.target_accuracy,
        plain_fraction=args.plain_fraction,
    )
    model, tokenizer, report = pretrain(settings)

    import transformers  # only for the version stamp in the note

    note = {
        "command": shlex.join(
            ["python", "-m", "so8t.model.pretrain_tiny"]
            + (sys.argv[1:] if argv is None else argv)
        ),
        "settings": asdict(settings),
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **report,
    }
    save_tiny(model, tokenizer, args.out, note)
    print(json.dumps(report, indent=2))
    print(f"saved to {args.out}")
    return 0 if report["stopped_on_criterion"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
