"""Multi-process training under `accelerate launch` or `torchrun` (data parallel).

The design, and why:

    every rank:  prompts = sampler.next_batch()            # the same P prompts on every rank
                 local   = rollout.sample(my share, G)     # rank r samples prompts [r*P/W, (r+1)*P/W)
                 batch   = all_gather(local)               # the global batch, on every rank
    rank 0:      feedback = collector(batch)               # ONE collector asks the teacher for all ranks
    every rank:  feedback = broadcast(feedback)
                 plans from the global batch                # normalisers, advantages, signal: global
                 forward + backward on my share only        # loss = my share of the sum / global count
                 all_reduce(gradients, SUM)                 # = the single-process gradient
                 the same optimizer step everywhere         # weights stay identical

- One collector on rank 0 serves every rank (rather than a limiter shared
  between processes): the RPM, TPM, concurrency and budget a user sets are
  then the job's limits with no coordination protocol, the SQLite cache has
  one writer, each prompt group belongs to one rank so each sample's
  feedback is asked (and paid) once, and all of a step's requests are in
  flight together, so no rank waits longer than the step's slowest request.
  Other ranks never call a collector (the CLI builds none there).
- Plans are built from the global batch on every rank (the batch is token
  ids: small next to activations), so every whole-batch quantity (a
  REINFORCE batch baseline, the token count a loss divides by, the signal
  that decides whether to step) is the single-process one by construction.
- Gradients are summed with one bucketed all-reduce after the micro-batches
  instead of wrapping the student in DDP: the forward layer runs the trunk
  more than once per backward (shared-prompt pass) and the LM head outside
  the model's forward, which DDP's reducer does not allow. The result is
  DDP's gradient; what is lost is DDP's overlap of communication with
  backward (one collective a step instead).

FSDP (`opd_sdk.parallel.fsdp`, FSDP2's `fully_shard`) is chosen the way accelerate
users choose it: `accelerate launch` with an FSDP config (or
ACCELERATE_USE_FSDP=true under torchrun). The same flow holds; FSDP sums
the gradient shards in backward instead of the all-reduce, and since every
forward is then a collective, a rank with nothing to run in a micro-batch
still runs a zero-loss pass (`forward.idle_loss`) and generation keeps all
ranks stepping (`synced_gpus`).

DeepSpeed ZeRO stage 1 or 2 (`opd_sdk.parallel.zero`) is chosen by an accelerate
DeepSpeed config (ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE):
every rank keeps the whole student, as under data parallel, and DeepSpeed
partitions the optimizer state (stage 1) and the gradients (stage 2) over the
ranks; it reduces the gradients in backward (in lockstep, like FSDP) and steps
the optimizer. ZeRO-3 (sharded parameters) is refused: FSDP2 does that here.

Ranks draw their samples from different RNG streams (seed + rank). Only
rank 0 writes metrics, progress and checkpoints; each rank's RNG state is
saved beside them (`rng-rank{r}.pt`), so a resume on the same world size is
exact.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from typing import Any, Callable, Protocol, Sequence

import torch

from opd_sdk.errors import ConfigError

GRADIENT_BUCKET_NUMEL = 1 << 25  # elements per all-reduce (128 MiB of fp32)


def launched_world_size() -> int:
    """WORLD_SIZE set by `torchrun` / `accelerate launch` (1 when run as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def fsdp_requested() -> bool:
    """accelerate's FSDP config (or ACCELERATE_USE_FSDP=true under torchrun) asks for a sharded student."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def zero_stage_requested() -> int:
    """The ZeRO stage of accelerate's DeepSpeed config (ACCELERATE_USE_DEEPSPEED=true); 0 without DeepSpeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return 0
    return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or 2)


def deepspeed_problems(zero_stage: int) -> list[str]:
    """What opd-sdk cannot do of the DeepSpeed config accelerate launched with, one line each with the fix."""
    if not zero_stage:
        return []
    problems = []
    if zero_stage not in (1, 2):
        problems.append(f"DeepSpeed zero_stage {zero_stage}: opd-sdk runs ZeRO stage 1 or 2; to shard the "
                        "student's parameters use FSDP (distributed_type: FSDP), or set zero_stage: 2")
    offload = {v: os.environ.get(v, "none").lower() for v in (
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE")}
    if any(v not in ("", "none") for v in offload.values()):
        problems.append("DeepSpeed offload_optimizer_device / offload_param_device: offloading is not supported; "
                        "set both to none")
    if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none").lower() not in ("", "none"):
        problems.append("DeepSpeed deepspeed_config_file: opd-sdk builds DeepSpeed's config from the opd config "
                        "(optimizer, max_grad_norm); give zero_stage in the accelerate config instead of a file")
    if importlib.util.find_spec("deepspeed") is None:
        problems.append("DeepSpeed is not installed: pip install -e '.[deepspeed]' (or pip install deepspeed)")
    return problems


class CopiesStudent(Protocol):
    """What `launch_problems` reads off an objective (`opd_sdk.objectives.base.Objective`)."""

    copies_student: bool


def launch_problems(*, world_size: int, fsdp: bool, prompts_per_step: int, max_staleness: int = 0,
                    eval_every: int = 0, engine: str = "transformers",
                    objective: CopiesStudent | None = None) -> list[str]:
    """What this job cannot do with `world_size` processes (and FSDP), one line each with the fix.

    Checked by `opd train --check`, by `opd train` before it writes anything, and by the Trainer.
    """
    problems = deepspeed_problems(zero_stage_requested())
    if prompts_per_step % world_size:
        problems.append(f"rollout.prompts_per_step ({prompts_per_step}) must be a multiple of the number of "
                        f"processes ({world_size}): each process samples an equal share of the prompts")
    if not fsdp:
        return problems
    fix = "or train with data parallel (no FSDP)"
    if max_staleness:
        problems.append(f"rollout.max_staleness: FSDP trains without overlap for now; set it to 0, {fix}")
    if eval_every:
        problems.append("eval.every: not available under FSDP (an evaluation runs in one process on the whole "
                        "student); remove it: the held-out metric is measured before and after training")
    if engine == "vllm":
        problems.append(f"rollout.engine: vllm cannot sample from an FSDP-sharded student yet; use transformers, {fix}")
    if objective is not None and objective.copies_student:
        problems.append(f"objective: {type(objective).__name__} keeps a frozen copy of the student (a KL "
                        f"reference or a SPIN opponent), which FSDP does not shard yet; drop the copy (beta: 0 "
                        f"where that is the KL weight), {fix}")
    return problems



def is_main_process() -> bool:
    """False on ranks >= 1 of a launched job (before or after the process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


class Distributed:
    """This process's place in the job: rank, world_size, device, and the collectives the loop uses.

    Built by `Distributed.from_environment()`: a single process unless the
    environment is a launched job (WORLD_SIZE > 1) or asks for FSDP, in which
    case accelerate's `PartialState` joins the process group (NCCL on GPUs,
    gloo on CPUs) and picks this rank's device. fsdp: shard the student
    (FSDP2), also at world size 1. zero_stage: 1 or 2 under an accelerate
    DeepSpeed config (`opd_sdk.parallel.zero`), else 0. With world_size 1 every
    collective is the identity.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
                 fsdp: bool = False, zero_stage: int = 0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device or torch.device("cpu")
        self.fsdp = fsdp
        self.zero_stage = zero_stage

    @classmethod
    def from_environment(cls) -> "Distributed":
        """Raises ConfigError for a DeepSpeed config opd-sdk cannot run (`deepspeed_problems`)."""
        fsdp, zero_stage = fsdp_requested(), zero_stage_requested()
        problems = deepspeed_problems(zero_stage)
        if problems:
            raise ConfigError("; ".join(problems))
        if launched_world_size() <= 1 and not fsdp and not zero_stage:
            return cls()
        from accelerate import PartialState

        cpu = not torch.cuda.is_available()
        # Under a DeepSpeed config accelerate ignores `cpu` and looks for GPUs: on CPUs name gloo.
        state = PartialState(backend="gloo") if cpu and zero_stage else PartialState(cpu=cpu)
        return cls(state.process_index, state.num_processes, state.device, fsdp=fsdp, zero_stage=zero_stage)

    @property
    def lockstep(self) -> bool:
        """Every backward pass is a collective (FSDP, ZeRO): ranks must run the same passes."""
        return self.fsdp or bool(self.zero_stage)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> tuple[int, int]:
        """This rank's range [start, stop) of n items (n divisible by world_size)."""
        per = n // self.world_size
        return self.rank * per, (self.rank + 1) * per

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def sample_share(self, prompts: list[Any], sample: Callable[[list[Any]], Any],
                     join: Callable[[list[Any]], Any]) -> Any:
        """The step's whole batch on every rank: this rank samples its share of `prompts`
        (`sample(share)`, a batch with `.to(device)`), the shares travel on the CPU to every rank
        and are joined in rank order (`join(shares)`) on this rank's device. One process: sample(prompts)."""
        if not self.enabled:
            return sample(prompts)
        start, stop = self.share(len(prompts))
        return join(self.all_gather(sample(prompts[start:stop]).to("cpu"))).to(self.device)

    def main_first(self, fn: Callable[[], Any]) -> Any:
        """fn() on every rank, rank 0 first: an exception there is raised on every rank (so none goes
        on to a collective rank 0 never reaches). Each rank gets its own result."""
        mine = self.on_main(fn)
        return mine if self.is_main else fn()

    def main_only(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn on rank 0; on the other ranks a function that does nothing and returns None. For work
        rank 0 does for every rank where no collective may run (a worker thread)."""
        return fn if self.is_main else lambda *args: None

    def from_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only; every rank gets its result (picklable). An exception on rank 0
        is raised on every rank (the same exception when it pickles), so no rank waits for a
        result that never comes."""
        return self._on_main(fn, share=True)

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """fn() run on rank 0 only, its result kept there (None elsewhere); its exception raised
        on every rank. For work only rank 0 does (building teacher clients, checking them)."""
        return self._on_main(fn, share=False)

    def _on_main(self, fn: Callable[[], Any], share: bool) -> Any:
        if not self.enabled:
            return fn()
        box: list[Any] = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
                box[0] = ("ok", result if share else None)
            except Exception as exc:  # re-raised after the others learn of it (not on Ctrl-C: peers may be gone)
                try:
                    sent = pickle.loads(pickle.dumps(exc))
                except Exception:  # noqa: BLE001 - an exception that does not pickle travels as text
                    sent = RuntimeError(f"rank 0 failed: {type(exc).__name__}: {exc}")
                torch.distributed.broadcast_object_list([("error", sent)], src=0)
                raise
        torch.distributed.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise value
        return value if share else result

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        return self._reduce(values, torch.distributed.ReduceOp.SUM) if self.enabled else list(values)

    def max(self, values: Sequence[float]) -> list[float]:
        return self._reduce(values, torch.distributed.ReduceOp.MAX) if self.enabled else list(values)

    def _reduce(self, values: Sequence[float], op: Any) -> list[float]:
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=op)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if torch.distributed.get_backend() == "nccl" else torch.device("cpu")

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """grad <- sum over ranks of grad, for every parameter (None counts as zeros), in buckets.
        Nothing to do under FSDP or ZeRO (they reduce in backward) or in one process."""
        if not self.enabled or self.lockstep:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        for p in params:
            bucket.append(p.grad)
            if sum(g.numel() for g in bucket) >= GRADIENT_BUCKET_NUMEL:
                _all_reduce_bucket(bucket)
                bucket = []
        if bucket:
            _all_reduce_bucket(bucket)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group, all ranks together (a rank whose peer has already exited, or
        that exits without leaving, can abort with "terminate called without an active exception")."""
        if (self.enabled or self.lockstep) and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def _all_reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
