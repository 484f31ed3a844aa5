"""The on-policy student loop: sample, collect feedback, loss, optimizer step.

    prompts  = sampler.next_batch()                      # P prompts
    batch    = rollout.sample(prompts, G)                # the student answers, P*G rows
    feedback = collector.collect_sync(requests(batch))   # one Feedback per prompt group
    loss     = objective.loss(model, micro_batch, its feedback)   # per micro-batch
    loss.backward(); clip; optimizer.step(); scheduler.step()
    objective.after_step(step, model); rollout.sync_weights(model)

The objective holds the loss math (see `opd_sdk.objectives`); the collector
holds retries, rate limits, the cache and the budget; this module only wires
them together, keeps time, and checkpoints. Micro-batches are whole prompt
groups, so group-relative advantages are exact under gradient accumulation;
each micro-batch's loss is weighted by its share of the prompts (for a
token-normalised loss this is a per-micro-batch token mean, a small
departure from one token mean over the whole batch).
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from opd_sdk.batch import RolloutBatch
from opd_sdk.checkpoint import checkpoint_dir, is_peft, latest_checkpoint, load_checkpoint, save_checkpoint
from opd_sdk.data import PromptItem, PromptSampler, load_prompts
from opd_sdk.errors import ConfigError
from opd_sdk.metrics import MetricsLogger
from opd_sdk.rollout import RolloutEngine, TransformersRollout
from opd_sdk.types import Feedback, FeedbackFailure, FeedbackRequest, Score


def build_requests(batch: RolloutBatch) -> list[FeedbackRequest]:
    """One FeedbackRequest per prompt group: the prompt, its G completions, privileged context.

    metadata = the prompt's metadata plus {"answer": ...} when the prompt has
    a reference answer (a verifier reads it there).
    """
    requests = []
    for p, item in enumerate(batch.prompts):
        metadata = dict(item.metadata)
        if item.answer is not None:
            metadata["answer"] = item.answer
        requests.append(
            FeedbackRequest(
                prompt=item.prompt,
                completions=batch.completions_of(p),
                privileged=item.privileged,
                metadata=metadata,
            )
        )
    return requests


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int):
    """Linear warmup, then constant / linear decay to 0 / cosine decay to 0."""
    import math

    if kind not in ("constant", "linear", "cosine"):
        raise ConfigError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _adamw(params: list[torch.nn.Parameter], **kw: Any) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (CPU and CUDA): ~10x faster than foreach on CPU."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kw)


def _wrap_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lora= needs peft: pip install 'opd-sdk[peft]'") from None
    config = lora if isinstance(lora, LoraConfig) else LoraConfig(task_type="CAUSAL_LM", **dict(lora))
    return get_peft_model(model, config)


def _score_stats(feedback: Sequence[Feedback]) -> tuple[float | None, float | None]:
    values = [s for fb in feedback if isinstance(fb, Score) for s in fb.scores]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    return mean, std


class Trainer:
    """Trains `model` on its own samples with `objective` and teacher feedback from `collector`.

    prompts: list of PromptItem / str / dict, a JSONL path or a datasets split.
    collector: a FeedbackCollector (anything with collect_sync(requests)); may
        be None only for an objective that reads no feedback (feedback_kinds == ()).
        A list of collectors, one per teacher, for an objective with several
        feedback sources (`Hybrid` with a `source` per term): they are asked
        at the same time, and each prompt's feedback is a tuple with one
        Feedback per collector.
    group_size: samples per prompt (G); prompts_per_step: P;
    micro_batch_prompts: prompts per forward/backward (gradient accumulation), default P.
    precision: "fp32", "bf16" (autocast, on CPU or GPU) or "auto" (bf16 on GPU, fp32 on CPU).
        On this project's 2-core CPU, bf16 autocast measured far slower than fp32 for SmolLM2
        (fwd+bwd 352 s vs 23 s a batch, generation 39 s vs 15-27 s, under load), hence the CPU default.
    lora: None, a peft LoraConfig, or a dict of LoraConfig arguments.
    output_dir: metrics.jsonl, checkpoints step-N/ every `save_every` steps, final/ model.
    eval_fn, eval_every: every `eval_every` steps, eval_fn(model) -> {name: number} (held-out
        accuracy, say) is logged in that step's row as eval/<name>; its time is not in time_step_s.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        objective: Any,
        collector: Any,
        prompts: Any,
        *,
        rollout: RolloutEngine | None = None,
        group_size: int = 4,
        prompts_per_step: int = 8,
        micro_batch_prompts: int | None = None,
        max_steps: int = 100,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: str = "constant",
        max_grad_norm: float | None = 1.0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_new_tokens: int = 128,
        precision: str = "auto",
        lora: Any = None,
        gradient_checkpointing: bool = False,
        output_dir: str | Path | None = None,
        save_every: int = 0,
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        tensorboard: bool | str = "auto",
        wandb_project: str | None = None,
        progress: bool | None = None,
    ) -> None:
        if group_size < 1 or prompts_per_step < 1 or max_steps < 0:
            raise ConfigError("group_size and prompts_per_step must be >= 1, max_steps >= 0")
        if collector is None and getattr(objective, "feedback_kinds", ("?",)):
            raise ConfigError(f"{type(objective).__name__} reads teacher feedback; pass a FeedbackCollector")
        collectors = [] if collector is None else list(collector) if isinstance(collector, (list, tuple)) else [collector]
        sources = getattr(objective, "feedback_sources", 1)
        if collectors and len(collectors) != sources:
            raise ConfigError(
                f"{type(objective).__name__} reads {sources} feedback source(s) but {len(collectors)} collector(s) "
                "were given; pass one FeedbackCollector per source, in source order"
            )
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        set_seed(seed)
        self.device = next(model.parameters()).device
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
        if lora is not None:
            model = _wrap_lora(model, lora)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.tokenizer = tokenizer
        self.objective = objective
        self.collectors = collectors
        items = prompts if isinstance(prompts, list) and all(isinstance(p, PromptItem) for p in prompts) else None
        self.sampler = PromptSampler(items or load_prompts(prompts), prompts_per_step, seed=seed, shuffle=shuffle)
        self.rollout = rollout or TransformersRollout(
            model,
            tokenizer,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_new_tokens=max_new_tokens,
            # bf16 autocast slows CPU generation down (measured: 39 s vs 15-27 s a batch), so CPU samples in fp32.
            autocast_dtype=self.autocast_dtype if self.device.type == "cuda" else None,
        )
        self.group_size = group_size
        self.micro_batch_prompts = micro_batch_prompts or prompts_per_step
        self.max_steps = max_steps
        self.max_grad_norm = max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters")
        self.optimizer = _adamw(self.params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.scheduler = make_scheduler(self.optimizer, lr_schedule, warmup_steps, max_steps)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.save_every = save_every
        if eval_every and eval_fn is None:
            raise ConfigError("eval_every needs eval_fn (a function model -> {name: number})")
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.metrics = MetricsLogger(
            self.output_dir / "metrics.jsonl" if self.output_dir else None,
            tb_dir=self.output_dir / "tb" if self.output_dir else None,
            tensorboard=tensorboard,
            wandb_project=wandb_project,
        )
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.step = 0
        self.teacher_cost_before = 0.0  # cost spent by earlier runs of a resumed training
        if hasattr(objective, "setup"):
            objective.setup(model)

    # ---- the loop -------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _collect(self, batch: RolloutBatch) -> list[Any]:
        """One Feedback per prompt; with several collectors, one tuple (a Feedback per collector) per prompt."""
        if not self.collectors:
            return []
        requests = build_requests(batch)
        if len(self.collectors) == 1:
            return self._collect_one(self.collectors[0], requests)
        with ThreadPoolExecutor(len(self.collectors)) as pool:  # each collector runs its own event loop
            per_source = list(pool.map(lambda c: self._collect_one(c, requests), self.collectors))
        return list(zip(*per_source))

    @staticmethod
    def _collect_one(collector: Any, requests: list[FeedbackRequest]) -> list[Feedback]:
        feedback = list(collector.collect_sync(requests))
        if len(feedback) != len(requests):
            raise RuntimeError(f"collector returned {len(feedback)} feedback values for {len(requests)} requests")
        return feedback

    def usage_total(self, field: str) -> Any:
        """A usage field (requests_sent, cache_hits, cost_usd) summed over the collectors; None without them."""
        values = [getattr(getattr(c, "usage", None), field, None) for c in self.collectors]
        return sum(values) if values and None not in values else None

    def teacher_cost_usd(self) -> float:
        """Teacher spend of this training, earlier runs of a resumed one included."""
        return self.teacher_cost_before + float(self.usage_total("cost_usd") or 0.0)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step; returns the metrics it logged."""
        t_start = time.perf_counter()
        prompts = self.sampler.next_batch()
        batch = self.rollout.sample(prompts, self.group_size)
        t_sampled = time.perf_counter()

        feedback = self._collect(batch)
        t_feedback = time.perf_counter()

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, objective_metrics = 0.0, {}
        for first, micro in batch.micro_batches(self.micro_batch_prompts):
            micro_feedback = feedback[first : first + micro.num_prompts] if feedback else []
            with self._autocast():
                out = self.objective.loss(self.model, micro, micro_feedback)
            share = micro.num_prompts / batch.num_prompts
            if out.loss.requires_grad:
                (out.loss * share).backward()
            loss_total += float(out.loss.detach()) * share
            for k, v in out.metrics.items():
                objective_metrics[k] = objective_metrics.get(k, 0.0) + float(v) * share
        t_backward = time.perf_counter()

        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        if hasattr(self.objective, "after_step"):
            self.objective.after_step(self.step, self.model)
        self.rollout.sync_weights(self.model)
        t_end = time.perf_counter()

        flat = [fb for entry in feedback for fb in (entry if isinstance(entry, tuple) else (entry,))]
        reward_mean, reward_std = _score_stats(flat)
        sampled_tokens = batch.completion_tokens()
        row = {
            **objective_metrics,  # the objective's view first; the trainer's own numbers below win
            "reward_mean": reward_mean,
            "reward_std": reward_std,
            "loss": loss_total,
            "feedback_failures": sum(isinstance(fb, FeedbackFailure) for fb in flat),
            "grad_norm": grad_norm,
            "lr": lr,
            "completion_tokens": sampled_tokens,
            "mean_completion_len": sampled_tokens / batch.size,
            "tokens_per_s": sampled_tokens / (t_end - t_start),
            "sample_tokens_per_s": sampled_tokens / max(t_sampled - t_start, 1e-9),
            "teacher_cost_usd": self.teacher_cost_usd(),
            "teacher_requests": self.usage_total("requests_sent"),
            "cache_hits": self.usage_total("cache_hits"),
            "time_sampling_s": t_sampled - t_start,
            "time_feedback_s": t_feedback - t_sampled,
            "time_forward_backward_s": t_backward - t_feedback,
            "time_optimizer_s": t_end - t_backward,
            "time_step_s": t_end - t_start,
        }
        if self.eval_every and self.step % self.eval_every == 0:
            row.update({f"eval/{k}": v for k, v in self.eval_fn(self.model).items()})
        return self.metrics.log(self.step, row)

    def train(self, resume_from: str | Path | None = None) -> list[dict[str, Any]]:
        """Run until max_steps; resume_from: a checkpoint folder or "latest" (in output_dir).

        With an output_dir, a checkpoint is written every `save_every` steps, at
        the end, and before re-raising on Ctrl-C / SIGTERM (KeyboardInterrupt)
        or TrainingStopped; only the newest `keep_checkpoints` are kept.
        """
        from opd_sdk.errors import TrainingStopped  # (imports here keep the lead's header untouched)

        if resume_from is not None:
            self.resume(resume_from)
        from opd_sdk.progress import Progress

        progress = Progress(self.max_steps, self.step, bar=self.progress)
        step_start = None  # sampler + RNG state while a step is under way
        try:
            with _sigterm_as_interrupt():
                while self.step < self.max_steps:
                    step_start = self._state_at_step_start()
                    row = self.train_step()
                    step_start = None
                    progress.update(self.step, row)
                    if self._save_every() and self.step % self._save_every() == 0:
                        self._checkpoint()
        except KeyboardInterrupt:
            self._checkpoint(at_step_start=step_start)
            raise
        except TrainingStopped:
            self._checkpoint()
            raise
        finally:
            progress.close()
        self._checkpoint()
        if self.output_dir is not None:
            self.save_pretrained(self.output_dir / "final")
        return self.metrics.history

    # ---- saving ---------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, *, merge_lora: bool = False) -> Path:
        """The student (or its LoRA adapter; merged into the base with merge_lora=True) and tokenizer.

        A LoRA adapter's `base_model_name_or_path` is written as the base's
        name (or folder name), never an absolute path of this machine.
        """
        path = Path(path)
        model = self.model
        if merge_lora and is_peft(model):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        from opd_sdk.checkpoint import scrub_machine_paths

        scrub_machine_paths(path)
        return path

    def save_checkpoint(self, path: str | Path | None = None, *, at_step_start: dict[str, Any] | None = None) -> Path:
        """Write step-N/ (or `path`). at_step_start: the sampler and RNG state saved before an
        interrupted step, so the resumed run redraws that step's batch (and hits the cache)."""
        if path is None:
            if self.output_dir is None:
                raise ConfigError("save_checkpoint needs a path or the trainer's output_dir")
            path = checkpoint_dir(self.output_dir, self.step)
        state = {
            "step": self.step,
            "data": (at_step_start or {}).get("data", self.sampler.state_dict()),
            "teacher_cost_usd": self.teacher_cost_usd(),
        }
        from opd_sdk.checkpoint import scrub_machine_paths

        saved = save_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, state=state,
            objective=self.objective, tokenizer=self.tokenizer, rng=(at_step_start or {}).get("rng"),
        )
        scrub_machine_paths(saved)
        return saved

    def resume(self, path: str | Path) -> int:
        """Load a checkpoint (or "latest" under output_dir); returns the step it continues from.

        Raises ConfigError when there is nothing to resume from.
        """
        if str(path) == "latest":
            if self.output_dir is None:
                raise ConfigError('resume_from="latest" needs output_dir')
            found = latest_checkpoint(self.output_dir)
            if found is None:
                raise ConfigError(
                    f"nothing to resume: {self.output_dir} holds no step-N/ checkpoint; start without resuming"
                )
            path = found
        state = load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, objective=self.objective
        )
        self.step = int(state["step"])
        self.sampler.load_state_dict(state["data"])
        self.teacher_cost_before = float(state.get("teacher_cost_usd", 0.0))
        self.metrics.truncate_after(self.step)
        self.rollout.sync_weights(self.model)
        return self.step

    # ---- checkpoints on schedule and on a stop ----------------------------------------------

    def _save_every(self) -> int:
        loop = getattr(self, "loop", None)  # the settings object, once __init__ keeps one
        return int((loop.save_every if loop is not None else self.save_every) or 0)

    def _keep_checkpoints(self) -> int:
        loop = getattr(self, "loop", None)
        if loop is not None:
            return int(loop.keep_checkpoints)
        from opd_sdk.settings import LoopSettings

        return LoopSettings().keep_checkpoints

    def _state_at_step_start(self) -> dict[str, Any]:
        from opd_sdk.checkpoint import rng_state

        return {"data": self.sampler.state_dict(), "rng": rng_state()}

    def _checkpoint(self, at_step_start: dict[str, Any] | None = None) -> Path | None:
        """Save step-N/ (N = completed steps) unless there is no output_dir or step-N/ is already saved; prune old ones."""
        if self.output_dir is None or self.step == 0:
            return None
        path = checkpoint_dir(self.output_dir, self.step)
        if latest_checkpoint(self.output_dir) == path:
            return path
        self.save_checkpoint(path, at_step_start=at_step_start)
        from opd_sdk.checkpoint import prune_checkpoints

        prune_checkpoints(self.output_dir, keep=self._keep_checkpoints())
        return path


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (a job scheduler's stop) raises KeyboardInterrupt in the main thread, like Ctrl-C."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
