"""What changed in a run's config between its first run and a `--resume`, and which changes a resume accepts.

A resumed run continues exactly where its checkpoint stopped only when what it trains on
and how it is graded stay the same. Changes to the loop's length and bookkeeping
(`steps`, checkpoints, logging, the collector's limits and budget, the device) are
shown and accepted; any other change (group size, objective, teacher or rubric, data,
learning rate, seed, the student, ...) is refused unless the user asks for it
(`opd train --resume --allow-config-change`), and is then shown too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from opd_sdk.config.run import RunConfig, validate_config
from opd_sdk.errors import ConfigError

# Fields (dotted YAML paths, or a section ending in ".") a resume may change without breaking exactness.
SAFE_TO_CHANGE = (
    "steps", "save_every", "keep_checkpoints", "max_no_signal_steps", "max_failed_step_share", "output_dir",
    "logging.", "collector.", "eval.every", "eval.batch_size", "student.device", "student.gradient_checkpointing",
)
MAX_VALUE_CHARS = 60


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """{"rollout.group_size": 4, "teachers.0.model": "m", ...} from a nested mapping."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, sub in items:
        out |= _flat(sub, f"{prefix}.{key}" if prefix else str(key))
    return out


def config_changes(before: dict[str, Any], after: RunConfig) -> list[tuple[str, Any, Any]]:
    """(YAML path, old value, new value) for each field that differs, in path order. `before` is the
    saved config.yaml's mapping (validated again when it still validates, so defaults compare equal)."""
    try:
        before = validate_config(before).model_dump(mode="json")
    except ConfigError:  # saved by another version: compare as written
        pass
    old, new = _flat(before), _flat(after.model_dump(mode="json"))
    missing = object()
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(old.keys() | new.keys())
            if old.get(k, missing) != new.get(k, missing)]


def safe_to_change(path: str) -> bool:
    return any(path == s or (s.endswith(".") and path.startswith(s)) for s in SAFE_TO_CHANGE)


def _show(value: Any) -> str:
    text = "(absent)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def describe(changes: list[tuple[str, Any, Any]]) -> str:
    return "\n  ".join(f"{path}: {_show(a)} -> {_show(b)}" for path, a, b in changes)


def check_resume_changes(output_dir: str | Path, cfg: RunConfig, *, allow: bool) -> str | None:
    """Compare `cfg` with output_dir/config.yaml before a resume. Returns a note listing the changes
    (None when there are none); raises ConfigError naming the changed fields when one of them breaks
    the resumed run's exactness and `allow` is False."""
    path = Path(output_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        return None
    changes = config_changes(saved, cfg)
    if not changes:
        return None
    breaking = [c for c in changes if not safe_to_change(c[0])]
    if breaking and not allow:
        raise ConfigError(
            f"--resume: the config differs from the run's ({path}) in fields that change what the resumed steps "
            f"train on or how they are graded, so the run would no longer continue exactly:\n  {describe(breaking)}\n"
            "pass --allow-config-change to resume with them anyway (Python: train(..., allow_config_change=True)), "
            "undo them, or start a new run in another output_dir"
        )
    return f"opd: resuming with config changes (from {path}):\n  {describe(changes)}"
