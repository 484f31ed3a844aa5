"""The run's prompts, read from its `data:` section: (train, held-out), disjoint."""

from __future__ import annotations

from opd_sdk.config.run import DataConfig
from opd_sdk.data import PromptItem, load_prompts
from opd_sdk.errors import ConfigError
from opd_sdk.tasks import get_task

GENERATED_TRAIN_ITEMS = 2000  # a generated task's training set: fixed, independent of the step count


def load_data(cfg: DataConfig, *, seed: int) -> tuple[list[PromptItem], list[PromptItem]]:
    """(train, held-out) prompts, disjoint.

    task: the task's own train / heldout splits (task_params.n_train caps the training set).
    path / hf_dataset: `eval_path` / `eval_split` when given, else the last
    `eval_size` prompts are held out and never trained on.
    """
    fields = dict(prompt_field=cfg.prompt_field, privileged_field=cfg.privileged_field, answer_field=cfg.answer_field)
    if cfg.task is not None:
        task = get_task(cfg.task)
        params = dict(cfg.task_params)
        n = params.pop("n_train", None)
        try:  # enumerated tasks: every training problem (the sampler cycles epochs)
            train = task.items("train", n, seed=seed, **params)
            held = task.items("heldout", None, seed=0, **params)
        except ConfigError:  # generated tasks: a fixed number, independent of the step count
            train = task.items("train", n or GENERATED_TRAIN_ITEMS, seed=seed, **params)
            held = task.items("heldout", cfg.eval_size, seed=0, **params)
        return train, held[: cfg.eval_size]
    if cfg.path is not None:
        items = load_prompts(cfg.path, **fields)
        held = load_prompts(cfg.eval_path, **fields) if cfg.eval_path else None
    else:
        import datasets

        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.split)
        items = load_prompts(ds, **fields)
        held = None
        if cfg.eval_split:
            held = load_prompts(datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.eval_split), **fields)
    if cfg.limit:
        items = items[: cfg.limit + (0 if held is not None else cfg.eval_size)]
    if held is None:
        if len(items) <= cfg.eval_size:
            raise ConfigError(
                f"data: only {len(items)} prompts, and eval_size={cfg.eval_size} are held out; "
                "lower data.eval_size or give data.eval_path / data.eval_split"
            )
        items, held = items[: -cfg.eval_size], items[-cfg.eval_size :]
    return items, held[: cfg.eval_size]
