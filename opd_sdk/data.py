"""Prompts for the student: one `PromptItem` per prompt, and where they come from.

A prompt may carry `privileged` context (what a teacher may see and the
student may not) and a reference `answer` (for verifiers, SPIN, SFT).

`load_prompts` reads a JSONL file, a Python list (of str, dict or
PromptItem) or a Hugging Face `datasets` split; the field names are
configurable. `PromptSampler` deals them out in shuffled batches, one epoch
after another, and its position is part of a training checkpoint.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from opd_sdk.errors import ConfigError
from opd_sdk.types import ChatMessage


class PromptItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt: str | list[ChatMessage]
    privileged: str | None = None
    answer: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("answer")
    @classmethod
    def _answer_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("the reference answer is empty or only whitespace; give the expected answer, "
                             "or leave it out (None) for prompts without one")
        return value

    def messages(self) -> list[ChatMessage]:
        """The prompt as chat messages (a text prompt becomes one user turn)."""
        if isinstance(self.prompt, str):
            return [ChatMessage(role="user", content=self.prompt)]
        return list(self.prompt)


def _item_from_record(
    record: Any,
    where: str,
    *,
    prompt_field: str,
    privileged_field: str | None,
    answer_field: str | None,
    metadata_fields: list[str] | None,
) -> PromptItem:
    if isinstance(record, PromptItem):
        return record
    if isinstance(record, str):
        if not record.strip():
            raise ConfigError(f"{where}: the prompt is an empty string; remove the row or give it text")
        return PromptItem(prompt=record)
    if not isinstance(record, dict):
        raise ConfigError(
            f"{where}: expected a string or an object with a {prompt_field!r} field, got {type(record).__name__}"
        )
    value = record.get(prompt_field)
    if prompt_field in record and (value in ("", []) or (isinstance(value, str) and not value.strip())):
        raise ConfigError(f"{where}: the prompt ({prompt_field!r}) is empty; give it text or remove the row")
    if value is None:
        raise ConfigError(
            f"{where}: missing prompt field {prompt_field!r} (fields present: {sorted(record)}). "
            f"Add it, or name the field that holds the prompt: data.prompt_field in a run config, "
            f"prompt_field= in load_prompts()."
        )

    def text_field(name: str | None) -> str | None:
        if name is None or record.get(name) is None:
            return None
        value = record[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # numeric answers: keep their text form
        if not isinstance(value, str):
            raise ConfigError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
        if name == answer_field and not value.strip():
            raise ConfigError(
                f"{where}: the reference answer {name!r} is {value!r} (empty); a verifier would give an empty "
                "completion full marks. Give the expected answer, or remove the field (or set it to null)."
            )
        return value

    if metadata_fields is None:
        used = {prompt_field, privileged_field, answer_field}
        metadata = {k: v for k, v in record.items() if k not in used}
    else:
        metadata = {k: record[k] for k in metadata_fields if k in record}
    nested = metadata.pop("metadata", None)
    if isinstance(nested, dict):
        metadata = {**nested, **metadata}
    try:
        return PromptItem(
            prompt=record[prompt_field],
            privileged=text_field(privileged_field),
            answer=text_field(answer_field),
            metadata=metadata,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            f"{where}: bad prompt ({loc}: {first['msg']}). A prompt is a string or a list of "
            '{"role": "system"|"user"|"assistant", "content": "..."} messages.'
        ) from None


MAX_ROW_PROBLEMS = 10  # bad rows listed in one error; the rest are counted


def _items(rows: list[tuple[Any, str]], kw: dict) -> list[PromptItem]:
    """PromptItems from (record, where) rows; every bad row is reported in one ConfigError (the first
    MAX_ROW_PROBLEMS listed, the rest counted), so a file is fixed in one pass. A record that is already a
    ConfigError (a line that is not JSON) is one of them."""
    items, problems = [], []
    for record, where in rows:
        if isinstance(record, ConfigError):
            problems.append(str(record))
            continue
        try:
            items.append(_item_from_record(record, where, **kw))
        except ConfigError as exc:
            problems.append(str(exc))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        more = len(problems) - MAX_ROW_PROBLEMS
        listed = "\n  ".join(problems[:MAX_ROW_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else "")
        raise ConfigError(f"{len(problems)} bad prompt rows:\n  {listed}")
    return items


def load_prompts(
    source: str | Path | Iterable[Any],
    *,
    prompt_field: str = "prompt",
    privileged_field: str | None = "privileged",
    answer_field: str | None = "answer",
    metadata_fields: list[str] | None = None,
    split: str | None = None,
) -> list[PromptItem]:
    """Prompts from a JSONL file, a list of str/dict/PromptItem, or a `datasets` split.

    Each JSONL line (or dict) holds the prompt under `prompt_field`, and
    optionally privileged context and a reference answer. Other fields go to
    `metadata` (all of them, or only `metadata_fields` when given). A
    `datasets.DatasetDict` needs `split=`. Raises ConfigError naming the file,
    line and missing field, or an empty / whitespace-only reference answer.
    """
    kw = dict(
        prompt_field=prompt_field,
        privileged_field=privileged_field,
        answer_field=answer_field,
        metadata_fields=metadata_fields,
    )
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"prompt file {path} does not exist")
        rows = []
        with path.open(encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((json.loads(line), f"{path}:{line_no}"))
                except json.JSONDecodeError as exc:
                    rows.append((ConfigError(f"{path}:{line_no}: not valid JSON ({exc.msg}); one JSON object a "
                                             "line"), ""))
        items = _items(rows, kw)
        where = str(path)
    else:
        if hasattr(source, "keys") and hasattr(source, "column_names") and not hasattr(source, "features"):
            if split is None:
                raise ConfigError(f"a DatasetDict needs split= (one of {list(source.keys())})")
        if split is not None and hasattr(source, "keys"):
            if split not in source:
                raise ConfigError(f"split {split!r} not found; available: {list(source.keys())}")
            source = source[split]
        where = "dataset" if hasattr(source, "features") else "prompts"
        items = _items([(r, f"{where}[{i}]") for i, r in enumerate(source)], kw)
    if not items:
        raise ConfigError(f"{where}: no prompts found")
    return items


class PromptSampler:
    """Shuffled batches of prompts, epoch after epoch; resumable.

    The order of epoch e is a permutation seeded by (seed, e), so a sampler
    restored from `state_dict()` deals exactly the batches the original
    would have. A batch never straddles two epochs' orders awkwardly: it
    takes the rest of the current epoch and continues in the next.
    """

    def __init__(self, items: list[PromptItem], batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ConfigError(f"prompts per step must be >= 1, got {batch_size}")
        if not items:
            raise ConfigError("no prompts to train on")
        self.items = list(items)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index into the current epoch's order

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.items)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptItem]:
        batch: list[PromptItem] = []
        while len(batch) < self.batch_size:
            order = self._order(self.epoch)
            take = order[self.position : self.position + self.batch_size - len(batch)]
            batch.extend(self.items[i] for i in take)
            self.position += len(take)
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_items": len(self.items)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n_items", len(self.items)) != len(self.items):
            raise ConfigError(
                f"checkpoint was trained on {state['n_items']} prompts, now there are {len(self.items)}; "
                "resume with the same prompt set"
            )
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]
