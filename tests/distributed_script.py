"""Launched by tests/parallel/test_distributed.py: a Python-API training against a judge on the scripted server.

    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py record OUT URL K
        trains 3 steps on 2 processes (FSDP when ACCELERATE_USE_FSDP=true, DeepSpeed ZeRO when
        ACCELERATE_USE_DEEPSPEED=true, a LoRA student when OPD_TEST_LORA=1); each rank writes the
        batches it sampled (OUT/batches/), rank 0 the final weights (OUT/weights.pt)
    torchrun ... resume OUT URL K
        the same job again from its step-2 checkpoint; final weights to OUT/resumed_weights.pt
    python tests/distributed_script.py replay OUT URL K
        one process trains on the recorded global batches (both ranks' shares, concatenated):
        the single-process run with the same global batch; weights to OUT/replay_weights.pt

K is rollout.max_staleness; an optional last argument names the rollout engine (vllm: one colocated
engine per rank, in the vLLM venv). The objective is REINFORCE, whose baseline is the whole batch's mean
reward: a rank that planned from its own share alone would get another gradient.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opd_sdk.data import PromptItem  # noqa: E402
from opd_sdk.feedback.collector import FeedbackCollector  # noqa: E402
from opd_sdk.objectives import RewardWeighted  # noqa: E402
from opd_sdk.parallel.distributed import Distributed  # noqa: E402
from opd_sdk.parallel.fsdp import full_state_dict  # noqa: E402
from opd_sdk.rollout.batch import RolloutBatch  # noqa: E402
from opd_sdk.train.trainer import Trainer  # noqa: E402
from providers.judge import JudgeTeacher  # noqa: E402
from tests.loop_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = [PromptItem(prompt=f"What is {a} + {a}?", answer=str(2 * a)) for a in range(12)]
# a decaying learning rate: the schedule must reach the optimizer however it is partitioned (ZeRO)
SETTINGS = dict(prompts_per_step=4, group_size=2, max_steps=3, max_new_tokens=6, seed=0, precision="fp32",
                save_every=1, schedule="linear")
# AdamW magnifies rounding in tiny gradients; FSDP's reduce-scatter rounds differently from one process
LR = {"ddp": 1e-2, "fsdp": 1e-3}
HIDDEN = {"transformers": 64, "vllm": 256}  # vLLM's CPU attention needs head_dim 64
LORA = {"r": 4, "target_modules": ["q_proj", "v_proj"]}  # with OPD_TEST_LORA=1
WEIGHTS = {"record": "weights.pt", "replay": "replay_weights.pt", "resume": "resumed_weights.pt"}


class Recording:
    """The trainer's rollout engine, writing each batch it samples to folder/step{n}-rank{r}.json."""

    def __init__(self, inner, folder: Path, rank: int) -> None:
        self.inner, self.folder, self.rank, self.n = inner, folder, rank, 0
        self.exact_logprobs = inner.exact_logprobs
        folder.mkdir(parents=True, exist_ok=True)

    def sample(self, prompts, group_size):
        batch = self.inner.sample(prompts, group_size)
        (self.folder / f"step{self.n}-rank{self.rank}.json").write_text(json.dumps(batch.to_json()))
        self.n += 1
        return batch

    def sync_weights(self, model) -> None:
        self.inner.sync_weights(model)

    def close(self) -> None:
        self.inner.close()


class Replay:
    """Returns the recorded global batches in order (the ranks' shares concatenated)."""

    exact_logprobs = True  # a RolloutEngine member; the trainer took its TIS cap from the engine it built

    def __init__(self, folder: Path, world_size: int, pad_id: int) -> None:
        self.folder, self.world_size, self.pad_id, self.n = folder, world_size, pad_id, 0

    def sample(self, prompts, group_size):
        shares = [RolloutBatch.from_json(json.loads((self.folder / f"step{self.n}-rank{r}.json").read_text()))
                  for r in range(self.world_size)]
        self.n += 1
        batch = RolloutBatch.concat(shares, self.pad_id)
        assert [p.prompt for p in batch.prompts] == [p.prompt for p in prompts], "ranks sampled other prompts"
        return batch

    def sync_weights(self, model) -> None:
        pass

    def close(self) -> None:
        pass


def main(mode: str, out: Path, url: str, k: int, engine: str = "transformers") -> None:
    tok = tiny_tokenizer()
    judge = JudgeTeacher("judge", base_url=url, api_key="test-key", structured="none")
    replay = mode == "replay"
    dist = Distributed() if replay else Distributed.from_environment()
    lr = LR["fsdp" if os.environ.get("ACCELERATE_USE_FSDP") == "true" else "ddp"]
    collector = FeedbackCollector(judge, progress=False, rpm=240) if dist.is_main else None
    trainer = Trainer(
        tiny_model(tok, seed=0, hidden=HIDDEN[engine]), tok, RewardWeighted(advantage="reinforce"), collector, PROMPTS,
        engine=engine, max_model_len=128, kv_cache_gb=1,
        micro_batch_prompts=1, max_staleness=k, distributed=dist, lr=lr, lora=LORA if os.environ.get("OPD_TEST_LORA") else None,
        output_dir={"record": out / "run", "resume": out / "run"}.get(mode), progress=False, **SETTINGS,
    )
    if replay:  # the trainer's settings (tis_cap...) stay those of the engine it built
        trainer.rollout = Replay(out / "batches", 2, trainer.pad_id)
    elif mode == "record":
        trainer.rollout = Recording(trainer.rollout, out / "batches", dist.rank)
    try:
        trainer.train(resume_from=out / "run" / "step-2" if mode == "resume" else None)
    finally:
        trainer.close()
        if collector is not None:
            collector.close()
    weights = full_state_dict(trainer.model) if dist.fsdp else trainer.model.state_dict()
    if dist.is_main:
        torch.save(weights, out / WEIGHTS[mode])
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), *sys.argv[5:])
