"""The on-policy student loop: sample, collect, loss, step.

    prompts  = sampler.next_batch()                           # P prompts
    batch    = rollout.sample(prompts, G)                     # the student answers, P*G rows (each rank its share)
    feedback = collect(collectors, batch)                     # one Feedback per prompt group (rank 0 for all)
                         # (both through `opd_sdk.train.pipeline`: now, or k steps ahead with max_staleness k)
    result   = batch_loss(objective, model, batch, feedback)  # targets once; per micro-batch one
                                                              # policy forward, every term's loss, backward
    if result.signal: parallel.step() (sync, clip, optimizer); scheduler.step(); teachers and rollout follow
    else:             no weight moves (optim/skipped); failures for max_no_signal_steps steps stop the run

The layers: `rollout` (RolloutBatch) -> `targets` (Feedback -> tensors, once
per batch) -> `forward` (one policy pass per micro-batch, plus the frozen
models an objective declares) -> `losses` (pure functions) -> the step. How the
step runs over the launch's processes (one, data parallel, FSDP, ZeRO) is the
`opd_sdk.parallel.strategy` the trainer calls; the micro-batch engine is
`opd_sdk.train.microbatch`.
"""

from __future__ import annotations

import collections
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from opd_sdk.config.settings import LoopSettings, OptimizerSettings, RolloutSettings, settings_from_kwargs
from opd_sdk.constants import DEFAULT_TIS_CAP
from opd_sdk.data import PromptItem, PromptSampler, load_prompts
from opd_sdk.errors import ConfigError, TrainingStopped
from opd_sdk.models import ensure_pad_token
from opd_sdk.feedback.local import LocalRunner
from opd_sdk.feedback.teacher import notify_optimizer_step, stateful, tokenizer_fingerprint
from opd_sdk.objectives.base import Composite, Objective
from opd_sdk.parallel.distributed import Distributed
from opd_sdk.parallel.strategy import make_strategy
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.build import build_rollout_engine
from opd_sdk.rollout.engine import RolloutEngine
from opd_sdk.train.checkpoint import (checkpoint_dir, prune_checkpoints, refuse_an_earlier_run, resume_checkpoint,
                                      rng_state, save_checkpoint, save_student)
from opd_sdk.train.checks import check_trainer
from opd_sdk.train.collect import check_prompts, collect, teacher_metrics, usage_total
from opd_sdk.train.metrics import MetricsLogger, StepTimer, step_row
from opd_sdk.train.microbatch import batch_loss
from opd_sdk.train.optim import autocast, autocast_dtype, make_optimizer, prepare_student, set_seed
from opd_sdk.train.pipeline import Pipeline
from opd_sdk.train.progress import Progress
from opd_sdk.train.run_lock import hold_output_dir
from opd_sdk.train.stop import (did_not_learn, in_flight_notice, must_stop, sigterm_as_interrupt,
                                training_stopped)
from opd_sdk.types import FeedbackFailure


class Trainer:
    """Trains `model` on its own samples with `objective` and teacher feedback from `collector`.

    prompts: list of PromptItem / str / dict, a JSONL path or a datasets split.
    collector: what `opd_sdk.make_collector` returns for a teacher (an
        `opd_sdk.feedback.factory.Collector`); None only for an objective that
        reads no feedback. A list, one per source, for a `Composite` objective with
        several teachers (`Hybrid` with a `source` per term): asked at the same time;
        each prompt's feedback is then a tuple with one Feedback per collector.
    rollout: a RolloutEngine; default the one `sampling.engine` names (`build_rollout_engine`).
    optimizer / sampling / loop: validated `OptimizerSettings` / `RolloutSettings` /
        `LoopSettings` (opd_sdk.config.settings: every default and bound is declared there);
        flat keywords (lr=, group_size=, max_steps=, ...) override single fields.
    micro_batch_prompts: prompts per forward/backward; default P / optimizer.grad_accum.
    precision: "fp32", "bf16" (autocast, on CPU or GPU) or "auto" (bf16 on GPU, fp32 on CPU).
        On this project's 2-core CPU, bf16 autocast measured far slower than fp32 for SmolLM2
        (fwd+bwd 352 s vs 23 s a batch, generation 39 s vs 15-27 s, under load), hence the CPU default.
    lora: None, a peft LoraConfig, or a dict of LoraConfig arguments.
    output_dir: metrics.jsonl, checkpoints step-N/ every `loop.save_every` steps, final/ model.
    eval_fn, eval_every: every `eval_every` steps, eval_fn(model) -> {name: number} (held-out
        accuracy, say) is logged in that step's row as eval/<name>; its time is not in time/step_s.
    distributed: this process's place in a launched job (`opd_sdk.parallel.distributed`); default
        from the environment, so a script runs unchanged under `accelerate launch` / `torchrun`:
        each rank samples prompts_per_step / world_size prompts, rank 0's collector serves
        all ranks, gradients are summed, and rank 0 alone logs, shows progress and saves.

    Raises ConfigError for bad settings; `train_step` raises TrainingStopped when
    `loop.max_no_signal_steps` steps in a row had no usable feedback because teacher
    calls failed, or when the teacher budget is spent.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        objective: Objective | Composite,
        collector: Any,
        prompts: Any,
        *,
        rollout: RolloutEngine | None = None,
        optimizer: OptimizerSettings | None = None,
        sampling: RolloutSettings | None = None,
        loop: LoopSettings | None = None,
        micro_batch_prompts: int | None = None,
        precision: str = "auto",
        lora: Any = None,
        gradient_checkpointing: bool = False,
        output_dir: str | Path | None = None,
        eval_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
        eval_every: int = 0,
        tensorboard: bool | str = "auto",
        wandb_project: str | None = None,
        progress: bool | None = None,
        distributed: Distributed | None = None,
        **settings: Any,
    ) -> None:
        self.optimizer_settings, self.sampling, self.loop = settings_from_kwargs(optimizer, sampling, loop, **settings)
        self.dist = distributed or Distributed.from_environment()
        self._owns_dist = distributed is None
        self.parallel = make_strategy(self.dist, max_grad_norm=self.optimizer_settings.max_grad_norm)
        self.objective = objective
        self.collectors = [] if collector is None else list(collector) if isinstance(collector, (list, tuple)) else [collector]
        check_trainer(model, objective, self.collectors, dist=self.dist, parallel=self.parallel, sampling=self.sampling,
                      precision=precision, micro_batch_prompts=micro_batch_prompts, eval_fn=eval_fn, eval_every=eval_every)
        set_seed(self.loop.seed)
        self.model = prepare_student(model, self.parallel, lora=lora, gradient_checkpointing=gradient_checkpointing)
        self.device = next(self.model.parameters()).device
        self.precision, self.autocast_dtype = autocast_dtype(precision, self.device)
        tokenizer = ensure_pad_token(tokenizer)  # EOS as pad when it has none, as `opd train` does (said once)
        self.tokenizer, self.tokenizer_id = tokenizer, tokenizer_fingerprint(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        items = prompts if isinstance(prompts, list) and all(isinstance(p, PromptItem) for p in prompts) else None
        self.sampler = PromptSampler(items or load_prompts(prompts), self.sampling.prompts_per_step,
                                     seed=self.loop.seed, shuffle=self.loop.shuffle)
        self.rollout = rollout or build_rollout_engine(
            # bf16 autocast slows CPU generation down (measured: 39 s vs 15-27 s a batch), so CPU samples in fp32
            self.sampling, self.model, tokenizer, autocast_dtype=self.autocast_dtype if self.device.type == "cuda" else None,
            seed=self.loop.seed + self.dist.rank, synced=self.parallel.synced_generation,
        )
        self._take_settings(micro_batch_prompts)
        self.pipeline = self._make_pipeline()
        self.params, self.optimizer, self.scheduler = make_optimizer(self.model, self.optimizer_settings, self.loop.steps)
        self._make_outputs(output_dir, eval_fn, eval_every, tensorboard, wandb_project, progress)
        objective.setup(self.model)  # (a frozen copy is taken here, before DeepSpeed hooks into the student)
        self.parallel.prepare_optimizer(self.model, self.optimizer)
        if self.dist.enabled:
            set_seed(self.loop.seed + self.dist.rank)  # same initial weights everywhere, a sampling stream per rank

    # ---- building it ----------------------------------------------------------------------

    def _take_settings(self, micro_batch_prompts: int | None) -> None:
        """The loop's numbers, from the settings (and the rollout engine, for the TIS cap)."""
        opt, samp, loop = self.optimizer_settings, self.sampling, self.loop
        self.group_size = samp.group_size
        self.micro_batch_prompts = micro_batch_prompts or max(1, math.ceil(samp.prompts_per_step / opt.grad_accum))
        self.max_steps = loop.steps
        self.flat_tolerance = loop.flat_group_tolerance
        self.max_no_signal_steps = loop.max_no_signal_steps
        exact = self.rollout.exact_logprobs and samp.max_staleness == 0
        self.tis_cap = (None if exact else DEFAULT_TIS_CAP) if samp.tis_cap is None else (samp.tis_cap or None)

    def _make_pipeline(self) -> Pipeline:
        """Each step's batch and feedback: sampled now (max_staleness 0) or in flight ahead of the
        update (max_staleness >= 1); rank 0 asks for every rank."""
        ahead = self.sampling.max_staleness >= 1
        for c in self.collectors if ahead else ():
            c.collect_sync([])  # starts each collector's event loop here, before worker threads share it
        return Pipeline(
            self.sampling.max_staleness,
            sample=lambda: self._sample(self.sampler.next_batch()),
            collect=self.dist.main_only(lambda batch: collect(self.collectors, batch, self.tokenizer_id)),
            overlap=ahead and any(not isinstance(c, LocalRunner) for c in self.collectors),  # a remote teacher
        )

    def _make_outputs(self, output_dir: str | Path | None, eval_fn: Callable | None, eval_every: int,
                      tensorboard: bool | str, wandb_project: str | None, progress: bool | None) -> None:
        """Where the run writes (rank 0 alone logs), evaluation, and the counters a resume restores."""
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.save_every = self.loop.save_every or 0
        self.eval_fn, self.eval_every = eval_fn, eval_every
        self.metrics = MetricsLogger.for_run(self.output_dir, self.dist.is_main, tensorboard=tensorboard,
                                             wandb_project=wandb_project)
        self.progress = sys.stderr.isatty() if progress is None else progress
        if self.output_dir is not None and self.dist.is_main:  # every paid call, journalled as it is counted
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for i, c in enumerate(self.collectors):
                c.usage.journal = self.output_dir / f"teacher_spend-{i}.jsonl"
        self.step = 0
        self.saved_step = 0  # the step of the newest checkpoint this run wrote or resumed from
        self.no_signal_streak = 0  # consecutive steps without signal because teacher calls failed
        self.failed_steps = 0  # steps of this training (resumed runs included) failures left without signal
        self.failure_kinds: collections.Counter = collections.Counter()  # failed calls of this process, by kind
        self._announced = False  # the Ctrl-C notice about answers in flight was printed
        self.teacher_cost_before = 0.0  # cost spent by earlier runs of a resumed training

    # ---- the loop -------------------------------------------------------------------------

    def _sample(self, prompts: list[PromptItem]) -> RolloutBatch:
        """The step's rollouts: this rank samples its share of `prompts`; every rank gets the whole batch."""
        return self.dist.sample_share(prompts, lambda share: self.rollout.sample(share, self.group_size),
                                      lambda shares: RolloutBatch.concat(shares, self.pad_id))

    def usage_total(self, field: str) -> Any:
        """A usage field (requests_sent, cache_hits, cost_usd) summed over the collectors; None without them."""
        return usage_total(self.collectors, field)

    def teacher_cost_usd(self) -> float:
        """Teacher spend of this training, earlier runs of a resumed one included."""
        return self.teacher_cost_before + float(self.usage_total("cost_usd") or 0.0)

    def close(self) -> None:
        """Free the rollout engine (a vLLM engine, its temporary folders) and the pipeline's threads;
        leave the process group when this trainer joined it."""
        self.rollout.close()
        self.pipeline.close()
        if self._owns_dist:
            self.dist.close()

    def _follow_student(self) -> None:
        """After an optimizer step: teachers that track the student's weights, and the rollout engine."""
        for c in self.collectors:
            notify_optimizer_step(c.teacher, self.step)
        self.rollout.sync_weights(self.model)

    def train_step(self) -> dict[str, Any]:
        """One step: sample, collect, loss; an optimizer step unless nothing carries a signal.

        Returns the metrics it logged. Raises TrainingStopped (after logging the
        step) when the budget is spent or failures left no signal for too long.
        """
        timer = StepTimer()
        self.pipeline.top_up(self.step, self.max_steps - self.step)  # this step's batch (and, k >= 1, the next k)
        timer.lap("sample")
        batch, staleness, answer = self.pipeline.pop(self.step)  # each rank its own share of the oldest batch
        feedback = self.dist.from_main(answer)  # rank 0's feedback for it, sent to every rank
        timer.lap("feedback")
        try:
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            result = batch_loss(
                self.objective, self.model, batch, feedback, micro_batch_prompts=self.micro_batch_prompts,
                flat_tolerance=self.flat_tolerance, backward=True, tis_cap=self.tis_cap, pad_id=self.pad_id,
                autocast=autocast(self.device, self.autocast_dtype), parallel=self.parallel,
            )
            timer.lap("forward_backward")
            skipped = result.signal == 0
            grad_norm, lr = None, self.scheduler.get_last_lr()[0]
            if not skipped:
                grad_norm = self.parallel.step()  # gradient sync, clipping (max_grad_norm), optimizer step
                self.scheduler.step()
            self.step += 1
            self.objective.after_step(self.step, self.model)
            timer.lap("optimizer")
            if not skipped:
                self._follow_student()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self._announce_in_flight()
            self.pipeline.drain()  # answers in flight land in the cache: a resume does not pay for them again
            raise

        flat = [fb for entry in feedback for fb in (entry if isinstance(entry, tuple) else (entry,))]
        failures = collections.Counter(fb.error_type for fb in flat if isinstance(fb, FeedbackFailure))
        self.no_signal_streak = self.no_signal_streak + 1 if skipped and failures else 0
        self.failed_steps += bool(skipped and failures)
        self.failure_kinds.update(failures)
        timer.lap("sync")
        teacher = {"requests": self.usage_total("requests_sent"), "cache_hits": self.usage_total("cache_hits"),
                   "cost_usd": self.teacher_cost_usd()}
        row = step_row(result.metrics, flat, failures, batch, timer, teacher=teacher, staleness=staleness,
                       skipped=skipped, grad_norm=grad_norm, lr=lr)
        row.update(teacher_metrics(self.collectors))  # a learning teacher's own (gad/accuracy...)
        if self.eval_every and self.step % self.eval_every == 0:
            evals = self.dist.on_main(lambda: self.eval_fn(self.model))  # rank 0 evaluates
            row.update({f"eval/{k}": v for k, v in (evals or {}).items()})
        logged = self.metrics.log(self.step, row)
        if must_stop(failures, no_signal_streak=self.no_signal_streak, max_no_signal_steps=self.max_no_signal_steps):
            self.pipeline.drain()  # answers already paid for land in the cache before the stop
            raise training_stopped(
                failures, no_signal_streak=self.no_signal_streak, step=self.step, max_steps=self.max_steps,
                teachers=", ".join(c.teacher.id for c in self.collectors) or "none",
                cost_usd=self.teacher_cost_usd(), output_dir=self.output_dir,
            )
        return logged

    def train(self, resume_from: str | Path | None = None) -> list[dict[str, Any]]:
        """Run until max_steps; resume_from: a checkpoint folder or "latest" (in output_dir).

        With an output_dir, a checkpoint is written every `save_every` steps, at
        the end, and before re-raising on Ctrl-C / SIGTERM (KeyboardInterrupt)
        or TrainingStopped; only the newest `keep_checkpoints` are kept. The run holds a lock on
        output_dir meanwhile: ConfigError, naming the holder's PID, while another process trains there.
        """
        with hold_output_dir(self.output_dir, self.dist):
            return self._train_holding_output_dir(resume_from)

    def _train_holding_output_dir(self, resume_from: str | Path | None) -> list[dict[str, Any]]:
        if resume_from is not None:
            self.resume(resume_from)
            self._refuse_a_finished_run()
        elif self.step == 0:
            refuse_an_earlier_run(self.output_dir)
            for c in self.collectors:  # a new run: an earlier run's spend journal is not this run's
                if c.usage.journal is not None:
                    c.usage.journal.unlink(missing_ok=True)
        check_prompts(self.collectors, self.sampler.items)  # after a resume: teachers' saved answers count
        progress = Progress(self.max_steps, self.step, bar=self.progress, shown=self.dist.is_main)
        step_start = None  # sampler + RNG state while a step is under way
        try:
            with sigterm_as_interrupt():
                while self.step < self.max_steps:
                    step_start = self._resumable_state()
                    row = self.train_step()
                    step_start = None
                    progress.update(self.step, row)
                    if self.save_every and self.step % self.save_every == 0:
                        self._checkpoint()
        except KeyboardInterrupt:
            self._announce_in_flight()
            if not self.dist.enabled:  # in a launched job a peer may be gone: the last scheduled checkpoint stands
                self._checkpoint(at_step_start=step_start)
            raise
        except TrainingStopped:
            self._checkpoint()
            raise
        finally:
            progress.close()
        self._checkpoint()
        failed = did_not_learn(self.failure_kinds, failed_steps=self.failed_steps, steps=self.step,
                               max_share=self.loop.max_failed_step_share, output_dir=self.output_dir,
                               teachers=", ".join(c.teacher.id for c in self.collectors) or "none")
        if failed is not None:  # no final/: an untrained student is never presented as the result
            raise failed
        if self.output_dir is not None:
            self.save_pretrained(self.output_dir / "final")
        return self.metrics.history

    def _announce_in_flight(self) -> None:
        """On Ctrl-C / SIGTERM, once: say that the teacher answers in flight are being kept and that a
        second Ctrl-C drops them (`in_flight_notice`); rank 0 alone."""
        notice = in_flight_notice(self.collectors) if self.dist.is_main and not self._announced else None
        if notice:
            print(notice, file=sys.stderr, flush=True)
            self._announced = True

    def _refuse_a_finished_run(self) -> None:
        """After a resume: ConfigError when no step is left to train and final/ is saved (or there is no
        output_dir to save it in), as `opd train --resume` says."""
        if self.step < self.max_steps or (self.output_dir is not None and not (self.output_dir / "final").exists()):
            return
        where = f"the run in {self.output_dir} is finished (final/ saved)" if self.output_dir is not None else \
            "the checkpoint is the run's last step"
        raise ConfigError(
            f"resume: {where}: step {self.step} of steps {self.max_steps}, nothing is left to train; to train further, "
            f"raise steps (Trainer(..., steps=N), N > {self.step}) and resume, or start a new run from the saved student"
        )

    # ---- saving ---------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path, *, merge_lora: bool = False) -> Path:
        """The student (or its LoRA adapter; merged into the base with merge_lora=True) and tokenizer,
        never with an absolute path of this machine (`opd_sdk.train.checkpoint.save_student`: under
        FSDP every rank must call). Raises ConfigError for merge_lora under FSDP."""
        return save_student(path, parallel=self.parallel, model=self.model, tokenizer=self.tokenizer,
                            merge_lora=merge_lora)

    def save_checkpoint(self, path: str | Path | None = None, *, at_step_start: dict[str, Any] | None = None) -> Path:
        """Write step-N/ (or `path`). at_step_start: the sampler and RNG state saved before an
        interrupted step, so the resumed run redraws that step's batch (and hits the cache).
        In a launched job every rank must call it (each sends its RNG state); rank 0 writes."""
        if path is None:
            if self.output_dir is None:
                raise ConfigError("save_checkpoint needs a path or the trainer's output_dir")
            path = checkpoint_dir(self.output_dir, self.step)
        here = {**self._resumable_state(), **(at_step_start or {})}
        state = {"step": self.step, "data": here["data"], "teacher_cost_usd": self.teacher_cost_usd(),
                 "in_flight": here["in_flight"], "failed_steps": self.failed_steps,
                 # the collectors' counters (cost, tokens, calls) and where their spend journals stood
                 "teacher_usage": [c.usage.as_dict() for c in self.collectors],
                 "teacher_journal": [c.usage.journal_offset() for c in self.collectors]}
        return save_checkpoint(
            path, parallel=self.parallel, model=self.model, scheduler=self.scheduler, state=state,
            rngs=self.dist.all_gather(here["rng"]), objective=self.objective, tokenizer=self.tokenizer,
            teachers=stateful([c.teacher for c in self.collectors]),
        )

    def resume(self, path: str | Path) -> int:
        """Load a checkpoint (or "latest" under output_dir); returns the step it continues from.

        Raises ConfigError when there is nothing to resume from. A damaged newest checkpoint is set
        aside, with a warning, for the newest intact one (`opd_sdk.train.checkpoint.resume_checkpoint`).
        """
        state = resume_checkpoint(path, self.output_dir, parallel=self.parallel, model=self.model,
                                  scheduler=self.scheduler, objective=self.objective,
                                  teachers=stateful([c.teacher for c in self.collectors]))
        self.step = self.saved_step = int(state["step"])
        self.sampler.load_state_dict(state["data"])
        self._restore_usage(state)
        self.failed_steps = int(state.get("failed_steps", 0))
        self.pipeline.load_state(state.get("in_flight", []), self.device)
        self.metrics.truncate_after(self.step)
        self.rollout.sync_weights(self.model)
        return self.step

    def _restore_usage(self, state: dict[str, Any]) -> None:
        """The budget and the counters are the run's, not the process's: each collector continues from
        the checkpoint's counters plus the calls its spend journal recorded after that checkpoint (paid in
        a step that was killed). A checkpoint from before the counters were saved carries only its cost."""
        saved = state.get("teacher_usage")
        if not isinstance(saved, list) or len(saved) != len(self.collectors):
            self.teacher_cost_before = float(state.get("teacher_cost_usd", 0.0))
            return
        offsets = state.get("teacher_journal") or [0] * len(saved)
        for c, counters, offset in zip(self.collectors, saved, offsets, strict=True):
            c.usage.restore(counters, journal_offset=int(offset))
        self.teacher_cost_before = 0.0

    # ---- checkpoints on schedule and on a stop ----------------------------------------------

    def _resumable_state(self) -> dict[str, Any]:
        """The sampler's position, the RNG state and the batches in flight: taken before a step, what a
        checkpoint written during that step holds instead of the step's half-done state."""
        return {"data": self.sampler.state_dict(), "rng": rng_state(), "in_flight": self.pipeline.state()}

    def _checkpoint(self, at_step_start: dict[str, Any] | None = None) -> Path | None:
        """Save step-N/ (N = completed steps) unless there is no output_dir or step-N/ is already saved; prune old ones."""
        if self.output_dir is None or self.step == 0:
            return None
        path = checkpoint_dir(self.output_dir, self.step)
        if self.saved_step == self.step:
            return path
        self.save_checkpoint(path, at_step_start=at_step_start)
        self.saved_step = self.step
        self.dist.on_main(lambda: prune_checkpoints(self.output_dir, keep=self.loop.keep_checkpoints))
        return path

