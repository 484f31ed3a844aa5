"""Prompts that cannot fit the student's context, found before any weights load.

A prompt of P tokens (as the student sees it: chat template and generation prompt) sampled
with N new tokens needs P + N <= the context: the model's `max_position_embeddings`
(config.json, read without the weights) with the transformers engine, and also
`rollout.max_model_len` with vLLM. A longer prompt makes generation run past the
position table (a transformers warning, then memory that grows without bound), so
each is reported with where it came from (`file:line` of a JSONL file, or the task and
its index). `data.too_long: skip` leaves such prompts out instead, and says how many.
Training prompts are checked with `rollout.max_new_tokens`, held-out ones with
`eval.max_new_tokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from opd_sdk.config.run import RunConfig
from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.models import DEFAULT_CACHE

SMOLLM2_NAMES = {"smollm2", "smollm2-135m-instruct", "smollm2-135m"}
SHOWN = 5  # prompts named in the message; the rest are counted
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def local_student_folder(name: str) -> Path | None:
    """The student's folder when it is on this machine already (a folder, the converted SmolLM2, or a
    Hugging Face id in the local cache), else None: nothing is downloaded or converted for a check."""
    if name.lower() in SMOLLM2_NAMES:
        folder = DEFAULT_CACHE / "SmolLM2-135M-Instruct"
        return folder if (folder / "config.json").exists() else None
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name.count("/") == 1:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
        return Path(found).parent if isinstance(found, str) else None
    return None


def student_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def student_context(folder: str | Path) -> int | None:
    """The model's context in tokens, from its config.json (no weights), or None when it names none."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    config = getattr(config, "text_config", None) or config
    return next((int(v) for f in CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int) and v > 0), None)


def prompt_limit(cfg: RunConfig, context: int | None) -> tuple[int | None, str]:
    """(tokens a prompt plus its completion may take, where that number comes from)."""
    if cfg.rollout.engine == "transformers":
        return context, "the student's max_position_embeddings"
    if context is None or cfg.rollout.max_model_len <= context:
        return cfg.rollout.max_model_len, "rollout.max_model_len"
    return context, "the student's max_position_embeddings"


def prompt_lengths(tokenizer: Any, items: list[PromptItem]) -> list[int]:
    """Tokens of each prompt as the rollout engine renders it (chat template, generation prompt)."""
    from opd_sdk.rollout.engine import render_prompts

    try:
        texts = render_prompts(tokenizer, items)
    except ConfigError:  # no chat template: the engine refuses it on its own; measure the raw text
        texts = render_prompts(tokenizer, items, use_chat_template=False)
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _line_numbers(path: str | None) -> list[int]:
    """1-based numbers of the non-blank lines of a JSONL file (one prompt each, in order)."""
    if path is None or not Path(path).is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [n for n, line in enumerate(f, 1) if line.strip()]


def origins(cfg: RunConfig, n_train: int, n_held: int) -> tuple[list[str], list[str]]:
    """Where each training and held-out prompt came from: `file:line`, or the task and its index."""
    d = cfg.data
    if d.path is not None:
        lines = _line_numbers(d.path)
        at = lambda i: f"{d.path}:{lines[i]}" if i < len(lines) else f"{d.path} prompt {i + 1}"
        train = [at(i) for i in range(n_train)]
        if d.eval_path is not None:
            held_lines = _line_numbers(d.eval_path)
            held = [f"{d.eval_path}:{held_lines[j]}" if j < len(held_lines) else f"{d.eval_path} prompt {j + 1}"
                    for j in range(n_held)]
        else:
            held = [at(n_train + j) for j in range(n_held)]
        return train, held
    source = f"task {d.task}" if d.task is not None else f"hf_dataset {d.hf_dataset}"
    return ([f"{source} train prompt {i + 1}" for i in range(n_train)],
            [f"{source} held-out prompt {j + 1}" for j in range(n_held)])


def fit_prompts(cfg: RunConfig, tokenizer: Any, context: int | None,
                data: tuple[list[PromptItem], list[PromptItem]]) -> tuple[list[str], list[PromptItem], list[PromptItem], str | None]:
    """(problems, train, held-out, note). With data.too_long "error", every prompt that does not fit is a
    problem (the lists come back unchanged); with "skip", those prompts are left out and the note
    counts them (a split left empty is a problem)."""
    limit, source = prompt_limit(cfg, context)
    train, held = data
    if limit is None:
        return [], train, held, None
    train_at, held_at = origins(cfg, len(train), len(held))
    too_long: list[tuple[str, int, int]] = []  # (where, prompt tokens, room)
    kept: list[list[PromptItem]] = []
    for items, at, new_tokens in ((train, train_at, cfg.rollout.max_new_tokens), (held, held_at, cfg.eval.max_new_tokens)):
        room = limit - new_tokens
        lengths = prompt_lengths(tokenizer, items)
        too_long += [(at[i], n, room) for i, n in enumerate(lengths) if n > room]
        kept.append([it for it, n in zip(items, lengths, strict=True) if n <= room])
    if not too_long:
        return [], train, held, None
    left_train, left_held = len(train) - len(kept[0]), len(held) - len(kept[1])
    if cfg.data.too_long == "skip":
        problems = [f"data.too_long: skip left no {name} prompt that fits; shorten the prompts or raise the limit"
                    for name, left in (("training", kept[0]), ("held-out", kept[1])) if not left]
        note = (f"opd: data.too_long: skip: left out {left_train} of {len(train)} training and {left_held} of "
                f"{len(held)} held-out prompts that do not fit {limit} tokens ({source}) with their max_new_tokens")
        return problems, kept[0], kept[1], note
    shown = "; ".join(f"{where} ({n} tokens, room for {room})" for where, n, room in too_long[:SHOWN])
    more = f"; and {len(too_long) - SHOWN} more" if len(too_long) > SHOWN else ""
    problem = (
        f"data: {len(too_long)} prompt(s) ({left_train} training, {left_held} held-out) do not fit the student's "
        f"context: {limit} tokens ({source}) minus max_new_tokens (rollout.max_new_tokens "
        f"{cfg.rollout.max_new_tokens}, eval.max_new_tokens {cfg.eval.max_new_tokens}): {shown}{more}; shorten them, "
        "lower max_new_tokens, or set data.too_long: skip to leave them out (counted)"
    )
    return [problem], train, held, None
