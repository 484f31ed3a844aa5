"""What a Trainer refuses before it builds anything: ConfigError, each problem with its fix.

The launch (`opd_sdk.parallel.distributed.launch_problems`: the processes, FSDP), the
collectors (`opd_sdk.train.collect.check_collectors`, asked on rank 0) and the Trainer's
own arguments, in that order.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from opd_sdk.config.settings import RolloutSettings
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.factory import Collector
from opd_sdk.objectives.base import missing_members
from opd_sdk.parallel.distributed import Distributed, launch_problems
from opd_sdk.parallel.strategy import ParallelStrategy
from opd_sdk.train.collect import check_collectors

PRECISIONS = ("auto", "fp32", "bf16")


def check_trainer(model: torch.nn.Module, objective: Any, collectors: list[Collector], *, dist: Distributed,
                  parallel: ParallelStrategy, sampling: RolloutSettings, precision: str,
                  micro_batch_prompts: int | None, eval_fn: Callable | None, eval_every: int) -> None:
    """Raises ConfigError for what this launch cannot train (the first problem found; the launch's all at once)."""
    missing = missing_members(objective)
    if missing:
        raise ConfigError(
            f"{type(objective).__name__} is not a complete objective: it lacks {', '.join(missing)}; "
            "implement the protocol in opd_sdk.objectives.base (SingleObjective, or Composite for weighted terms)"
        )
    problems = launch_problems(
        world_size=dist.world_size, fsdp=dist.fsdp, prompts_per_step=sampling.prompts_per_step,
        max_staleness=sampling.max_staleness, eval_every=eval_every, engine=sampling.engine, objective=objective,
    )
    if problems:
        raise ConfigError("; ".join(problems))
    sharded = model if parallel.shards_student else None  # a teacher may not run a sharded student
    dist.on_main(lambda: check_collectors(objective, collectors, sharded, max_staleness=sampling.max_staleness))
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if micro_batch_prompts is not None and micro_batch_prompts < 1:
        raise ConfigError(f"micro_batch_prompts must be >= 1, got {micro_batch_prompts}")
    if eval_every and eval_fn is None:
        raise ConfigError("eval_every needs eval_fn (a function model -> {name: number})")
