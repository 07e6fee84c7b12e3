"""Prompt datasets: synthetic arithmetic and JSON-lines files, rendered for the model.

``build_prompts(data_cfg, tokenizer)`` returns the whole prompt list up front; prompt sets
for PPO are small, and a fixed list is what makes the sampler's position (an index into
it) enough to resume exactly.

Every source first becomes chat messages (an optional system turn and the user turn), the
shape instruct models are trained on and reward models read. They are then rendered once,
here, into exactly what the policy is given:

* with the tokenizer's chat template (``data.chat_template``: true, false, or null = when the
  tokenizer has one), ending with the template's generation prompt; the rendered text
  already holds the template's special tokens, so encoding adds none;
* without one, as plain text (system prompt, a newline, the user text), encoded with the
  special tokens the tokenizer adds (a BOS for most base models), as base models were
  trained.

``data.system_prompt`` and ``data.instruction`` (prepended to the user's text) are how a
config asks the model for the answer format the reward scores.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from so8t.config.schema import ArithmeticDataConfig, JsonlDataConfig

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Prompt:
    """One prompt, rendered for the model, with the reference answer reward terms compare to.

    ``text`` is exactly what the model is given (after the chat template, if any);
    ``messages`` the chat turns it was rendered from (reward models re-render them with
    their own template); ``input_ids`` its token ids (None when built without a tokenizer).
    """

    text: str
    reference: str | None
    messages: tuple[tuple[tuple[str, str], ...], ...] | None = None
    input_ids: tuple[int, ...] | None = None

    def chat(self) -> list[dict[str, str]] | None:
        """The messages as the usual list of ``{"role", "content"}`` dicts."""
        return None if self.messages is None else [dict(m) for m in self.messages]


def build_prompts(data_cfg: ArithmeticDataConfig | JsonlDataConfig, tokenizer: Any = None) -> list[Prompt]:
    """Build the prompt list described by ``data_cfg`` (a validated config's ``data``; for one
    group alone, ``so8t.config.typed.option_config("data", "arithmetic", ...)``)."""
    use_template = _use_chat_template(data_cfg.chat_template, tokenizer)
    renderer = _Renderer(tokenizer, use_template, data_cfg.max_prompt_tokens)
    rows = arithmetic_questions(data_cfg) if data_cfg.kind == "arithmetic" else jsonl_rows(data_cfg)
    prompts = []
    for where, messages, reference in rows:
        messages = _with_defaults(messages, data_cfg.system_prompt, data_cfg.instruction)
        prompts.append(renderer.render(messages, reference, where))
    log.info("data: %d prompts from source %r (%s)", len(prompts), str(data_cfg.kind),
             "chat template" if use_template else "plain text")
    return prompts


def render_user_prompts(texts: list[str], tokenizer: Any, chat_template: bool | None = None,
                        system_prompt: str | None = None, instruction: str | None = None) -> list[Prompt]:
    """Render user texts exactly as a run with these prompt settings renders its prompts
    (``so8t.load_policy(...).generate`` asks a trained policy in the words it was trained on)."""
    renderer = _Renderer(tokenizer, _use_chat_template(chat_template, tokenizer), None)
    return [renderer.render(_with_defaults([{"role": "user", "content": text}], system_prompt, instruction),
                            None, f"prompt {i}") for i, text in enumerate(texts)]


def _use_chat_template(value: Any, tokenizer: Any) -> bool:
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if value is None:
        return has_template
    if not isinstance(value, bool):
        raise ValueError(f"data.chat_template must be true, false or null, got {value!r}")
    if value and not has_template:
        what = "no tokenizer was given" if tokenizer is None else "the tokenizer has no chat template"
        raise ValueError(f"data.chat_template=true but {what}; use null (when it has one) or false")
    return value


def _with_defaults(messages: list[dict[str, str]], system_prompt: str | None,
                   instruction: str | None) -> list[dict[str, str]]:
    """Add the configured system prompt (unless the prompt brings its own) and put the
    instruction before the text of the last user turn."""
    messages = [dict(m) for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    if instruction:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = f"{instruction} {messages[last_user]['content']}"
    return messages


class _Renderer:
    def __init__(self, tokenizer: Any, use_template: bool, max_prompt_tokens: int | None):
        self.tokenizer = tokenizer
        self.use_template = use_template
        self.max_prompt_tokens = max_prompt_tokens

    def render(self, messages: list[dict[str, str]], reference: str | None, where: str) -> Prompt:
        if self.use_template:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages)
        ids = None
        if self.tokenizer is not None:
            # A rendered template already holds its special tokens (BOS included, where the
            # template writes one); plain text gets those the tokenizer adds.
            ids = tuple(self.tokenizer(text, add_special_tokens=not self.use_template)["input_ids"])
            if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
                raise ValueError(f"{where}: prompt is {len(ids)} tokens, "
                                 f"longer than data.max_prompt_tokens={self.max_prompt_tokens}")
        frozen = tuple(tuple(sorted(m.items())) for m in messages)
        return Prompt(text=text, reference=reference, messages=frozen, input_ids=ids)


# --------------------------------------------------------------------------- arithmetic


def arithmetic_questions(data_cfg: ArithmeticDataConfig) -> list[tuple[str, list[dict[str, str]], str]]:
    """``num_prompts`` distinct questions ``"a+b="`` with reference ``str(a + b)``.

    Pairs are ordered, so ``3+4=`` and ``4+3=`` are different prompts. When ``num_prompts``
    is at least the number of pairs, every pair is used once, in a seeded shuffled order.
    The operands' range was checked with the config (so8t.config.validate).
    """
    low, high, num_prompts, seed = data_cfg.min_operand, data_cfg.max_operand, data_cfg.num_prompts, data_cfg.seed

    width = high - low + 1
    num_pairs = width * width
    if num_prompts > num_pairs:
        log.info("data.num_prompts=%d exceeds the %d distinct pairs of operands %d..%d; using all pairs",
                 num_prompts, num_pairs, low, high)
    # A private Random keeps the global RNG untouched. ``sample`` over a range draws distinct
    # pair numbers without building the full pair list, and with k == len it is a shuffle.
    rng = random.Random(seed)
    picks = rng.sample(range(num_pairs), min(num_prompts, num_pairs))
    rows = []
    for pick in picks:
        a, b = low + pick // width, low + pick % width
        rows.append((f"arithmetic {a}+{b}", [{"role": "user", "content": f"{a}+{b}="}], str(a + b)))
    return rows


# --------------------------------------------------------------------------- jsonl


def jsonl_rows(data_cfg: JsonlDataConfig) -> list[tuple[str, list[dict[str, str]], str | None]]:
    """Read prompts from a UTF-8 JSON-lines file, one object per line (blank lines skipped).

    A row holds either chat messages (``data.messages_field``, a list of ``{role, content}``
    as HF chat datasets store it, ending with a user turn) or a prompt text
    (``data.prompt_field``, with an optional system text in ``data.system_field``).
    """
    if not data_cfg.path:
        raise ValueError("data.path: set the path of the JSON-lines prompt file")
    path = Path(data_cfg.path).expanduser()
    prompt_field, messages_field = data_cfg.prompt_field, data_cfg.messages_field
    reference_field, system_field = data_cfg.reference_field, data_cfg.system_field
    if not path.is_file():
        raise FileNotFoundError(f"data.path: prompt file not found: {path}")

    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            lines = list(enumerate(handle, start=1))
    except UnicodeDecodeError as exc:
        raise ValueError(f"data.path: {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    for line_number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
        if messages_field and messages_field in row:
            messages = _messages_field(row[messages_field], where, messages_field)
        elif prompt_field in row:
            prompt = _text_field(row, prompt_field, where, "data.prompt_field")
            if prompt is None:
                raise ValueError(f"{where}: prompt field {prompt_field!r} (data.prompt_field) is null")
            system = _text_field(row, system_field, where, "data.system_field")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}]
        else:
            wanted = f"prompt field {prompt_field!r} (data.prompt_field)"
            if messages_field:
                wanted += f" or messages field {messages_field!r} (data.messages_field)"
            raise ValueError(f"{where}: missing {wanted}; fields present: {', '.join(sorted(row)) or 'none'}")
        rows.append((where, messages, _text_field(row, reference_field, where, "data.reference_field")))
    if not rows:
        raise ValueError(f"data.path: {path} holds no prompts")
    return rows


def _messages_field(value: Any, where: str, name: str) -> list[dict[str, str]]:
    key = f"field {name!r} (data.messages_field)"
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key} must be a non-empty list of {{role, content}} objects")
    messages = []
    for i, message in enumerate(value):
        if (not isinstance(message, dict) or set(message) - {"role", "content"}
                or message.get("role") not in ROLES or not isinstance(message.get("content"), str)):
            raise ValueError(f"{where}: {key}[{i}] must be {{\"role\": one of {', '.join(ROLES)}, "
                             f"\"content\": text}}, got {json.dumps(message)[:80]}")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise ValueError(f"{where}: {key} must end with a user turn (the policy writes the assistant's "
                         f"answer), but it ends with {messages[-1]['role']!r}")
    return messages


def _text_field(row: dict, field_name: str | None, where: str, key: str) -> str | None:
    """The row's value for an optional field: None when unset, missing or null.

    Numbers become strings because answers such as ``42`` are natural to write as JSON
    numbers; anything else that is not a string is an error.
    """
    if not field_name:
        return None
    value = row.get(field_name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: field {field_name!r} ({key}) must be a string, got {type(value).__name__}")
