"""The training settings, declared once: defaults, bounds and meaning.

The YAML config uses these models as its sections (`optimizer:`,
`rollout:`, and the top-level loop fields), and the `Trainer` receives them
validated; nothing else restates a default. `Trainer(..., lr=3e-6,
group_size=8)` keyword arguments are routed to the model that declares the
field (`settings_from_kwargs`).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from opd_sdk.errors import ConfigError


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerSettings(_Settings):
    """AdamW and its schedule.

    lr: peak learning rate. betas, weight_decay: AdamW's.
    max_grad_norm: clip the global gradient L2 norm to this (None: no clipping).
    warmup_steps: linear warmup from ~0 to lr. schedule: after warmup,
        constant, linear decay to 0, or cosine decay to 0 at the last step.
    grad_accum: micro-batches per optimizer step (prompt groups are split
        evenly; the gradient equals the one big batch's).
    """

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_accum: int = Field(1, gt=0)


class RolloutSettings(_Settings):
    """How the student samples: P prompts a step, G samples each.

    temperature / top_p / top_k: the sampler's (top_k 0: off).
    max_new_tokens: completion length cap (tokens, EOS included).
    tis_cap: truncated importance sampling: policy-gradient terms are
        weighted per token by min(p_trainer / p_sampler, tis_cap), detached
        (corrects samples whose sampler log-probs differ from the trainer's:
        another engine, or stale weights). None: on (2.0) when the engine's
        log-probs are not the trainer's own (`RolloutEngine.exact_logprobs`
        False), else off. 0: off.
    max_staleness: 0 (default): sample, collect, update in turn. k >= 1:
        keep the rollouts and feedback of the next k steps in flight while
        the current step updates (opd_sdk.pipeline); truncated importance
        sampling is then on (tis_cap 2.0 unless set).
    """

    prompts_per_step: int = Field(8, gt=0)
    group_size: int = Field(4, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(0, ge=0)
    tis_cap: float | None = Field(None, ge=0)
    max_staleness: int = Field(0, ge=0)


class LoopSettings(_Settings):
    """The loop around the steps.

    steps: optimizer steps to run. seed: sampling, shuffling and init.
    save_every: checkpoint every N steps (None or 0: only at the end). A checkpoint
        is also written at the end, on Ctrl-C / SIGTERM, and when training
        stops for lack of signal or budget.
    keep_checkpoints: how many of the newest step-N/ checkpoints to keep.
    max_no_signal_steps: after this many consecutive steps in which failed
        teacher calls left no sample with a learning signal, save a
        checkpoint and stop with an error naming the failures.
    flat_group_tolerance: a prompt group whose valid rewards span at most
        this (max - min) is flat: advantage exactly 0, counted as no signal.
    shuffle: shuffle the prompts each epoch.
    """

    steps: int = Field(100, ge=0)
    seed: int = 0
    save_every: int | None = Field(25, ge=0)
    keep_checkpoints: int = Field(3, gt=0)
    max_no_signal_steps: int = Field(3, gt=0)
    flat_group_tolerance: float = Field(1e-6, ge=0)
    shuffle: bool = True


# Older Trainer keyword names, kept working.
ALIASES = {"max_steps": "steps", "lr_schedule": "schedule"}
SETTINGS_MODELS = (OptimizerSettings, RolloutSettings, LoopSettings)


def settings_from_kwargs(
    optimizer: OptimizerSettings | None = None,
    rollout: RolloutSettings | None = None,
    loop: LoopSettings | None = None,
    **kwargs: Any,
) -> tuple[OptimizerSettings, RolloutSettings, LoopSettings]:
    """Validated settings from given models plus flat keyword overrides.

    Raises ConfigError naming an unknown keyword (with the closest valid
    name) or a value out of bounds.
    """
    given = [optimizer or OptimizerSettings(), rollout or RolloutSettings(), loop or LoopSettings()]
    updates: list[dict[str, Any]] = [{}, {}, {}]
    known = [name for m in SETTINGS_MODELS for name in m.model_fields] + list(ALIASES)
    for name, value in kwargs.items():
        field = ALIASES.get(name, name)
        for i, model in enumerate(SETTINGS_MODELS):
            if field in model.model_fields:
                updates[i][field] = value
                break
        else:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Trainer: unknown setting {name!r}{hint}")
    out = []
    for model, current, update in zip(SETTINGS_MODELS, given, updates):
        try:
            out.append(model.model_validate({**current.model_dump(), **update}))
        except ValidationError as exc:
            names = {ALIASES.get(k, k): k for k in kwargs}
            problems = "; ".join(
                f"{names.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors(include_input=False)
            )
            raise ConfigError(f"Trainer: {problems}") from None
    return out[0], out[1], out[2]
