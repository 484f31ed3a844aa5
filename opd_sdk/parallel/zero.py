"""DeepSpeed ZeRO stage 1 / 2 for the student's optimizer state and gradients.

Chosen by `accelerate launch` with a DeepSpeed config (zero_stage 1 or 2;
`opd_sdk.parallel.distributed`). Every rank keeps the whole student, so rollouts,
frozen copies, teachers that read the student and `save_pretrained` work as
under data parallel; DeepSpeed partitions the AdamW state over the ranks
(stage 1) and the gradients too (stage 2), reduces the gradients during
backward and steps the optimizer.

    strategy = ZeroStrategy(dist, max_grad_norm=1.0)        # dist.zero_stage: 1 or 2
    model = strategy.prepare_model(model)
    strategy.prepare_optimizer(model, optimizer)             # builds DeepSpeed's engine
    for each micro-batch:  strategy.backward(loss, last=...)  # every rank the same number of times
    grad_norm = strategy.step()

The loop's convention holds: each rank's loss is its share of a sum divided by
the GLOBAL batch's unit count, and gradients are SUMMED over ranks. DeepSpeed
averages them over the data-parallel ranks, so `backward` scales the loss by
the world size. Micro-batches are marked with DeepSpeed's accumulation
boundary (`set_gradient_accumulation_boundary`), not counted by its
`gradient_accumulation_steps`: the loop decides how many micro-batches a
step has. Gradient clipping is DeepSpeed's (`gradient_clipping` = the opd
config's `optimizer.max_grad_norm`), over the global gradient.

Source: DeepSpeed's `deepspeed.initialize` / `DeepSpeedEngine` (0.19) and the
ZeRO paper (Rajbhandari et al., 2020); fp32 only here (the loop's bf16 is
torch autocast, DeepSpeed's own mixed precision is not used).
"""

from __future__ import annotations

from pathlib import Path

import torch

from opd_sdk.parallel.distributed import Distributed

DEEPSPEED_DIR = "deepspeed"  # a checkpoint's folder of DeepSpeed's partitions
TAG = "zero"  # the one tag under a checkpoint's deepspeed/ folder


class ZeroStrategy:
    """DeepSpeed's engine around the student and the client optimizer (an AdamW over the trainable
    parameters; LoRA works: frozen parameters are not partitioned). The model is still called
    directly (its forward is not wrapped); the optimizer's param_groups keep driving the learning
    rate, so a torch LR scheduler built on it keeps working. Every backward is a collective
    (lockstep); the student is saved whole, the optimizer partitions in deepspeed/.

    Raises ImportError (in `prepare_optimizer`) when deepspeed is not installed.
    """

    shards_student = False
    lockstep = True  # DeepSpeed counts the backward passes up to the accumulation boundary
    synced_generation = False

    def __init__(self, dist: Distributed, *, max_grad_norm: float | None = None) -> None:
        self.dist = dist
        self.max_grad_norm = max_grad_norm
        self.engine = None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.dist.device) if self.dist.enabled else model

    def prepare_optimizer(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Build DeepSpeed's engine: after the model is on its device and before anything steps."""
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,  # DeepSpeed's bookkeeping only: the loop batches
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.dist.zero_stage},
            "gradient_clipping": float(self.max_grad_norm or 0.0),
            "zero_allow_untested_optimizer": True,  # torch's AdamW: ZeRO partitions its state
            "steps_per_print": 2**31 - 1,
        }
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """last: after this micro-batch DeepSpeed finishes reducing the gradients over the ranks."""
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss * self.dist.world_size)

    def step(self) -> float | None:
        """Clip, step the optimizer, zero the gradients; returns the global gradient norm before
        clipping (None when DeepSpeed did not compute one)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def save(self, folder: Path) -> None:
        """Every rank writes its optimizer partitions (and rank 0 the module) under folder/deepspeed."""
        self.engine.save_checkpoint(str(Path(folder) / DEEPSPEED_DIR), tag=TAG)

    def load(self, folder: Path) -> None:
        """Load what `save` wrote: module, fp32 master weights and optimizer partitions.
        Raises FileNotFoundError when the folder holds no such checkpoint."""
        path, _ = self.engine.load_checkpoint(
            str(Path(folder) / DEEPSPEED_DIR), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise FileNotFoundError(f"{folder} holds no DeepSpeed checkpoint")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # every rank holds the whole student
