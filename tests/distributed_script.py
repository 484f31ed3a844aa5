"""Launched by tests/test_distributed.py: a Python-API training against a judge on the scripted server.

    torchrun --standalone --nproc_per_node 2 tests/distributed_script.py record OUT URL K
        trains 3 steps on 2 processes; each rank writes the batches it sampled (OUT/batches/),
        rank 0 the final weights (OUT/weights.pt)
    python tests/distributed_script.py replay OUT URL K
        one process trains on the recorded global batches (both ranks' shares, concatenated):
        the single-process run with the same global batch; weights to OUT/replay_weights.pt

K is rollout.max_staleness. The objective is REINFORCE, whose baseline is the whole batch's mean
reward: a rank that planned from its own share alone would get another gradient.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opd_sdk.batch import RolloutBatch  # noqa: E402
from opd_sdk.collector import FeedbackCollector  # noqa: E402
from opd_sdk.data import PromptItem  # noqa: E402
from opd_sdk.distributed import Distributed  # noqa: E402
from opd_sdk.objectives import RewardWeighted  # noqa: E402
from opd_sdk.trainer import Trainer  # noqa: E402
from providers.judge import JudgeTeacher  # noqa: E402
from tests.loop_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

PROMPTS = [PromptItem(prompt=f"What is {a} + {a}?", answer=str(2 * a)) for a in range(12)]
SETTINGS = dict(prompts_per_step=4, group_size=2, max_steps=3, max_new_tokens=6, lr=1e-2, seed=0,
                precision="fp32", save_every=1)


class Recording:
    """The trainer's rollout engine, writing each batch it samples to folder/step{n}-rank{r}.json."""

    def __init__(self, inner, folder: Path, rank: int) -> None:
        self.inner, self.folder, self.rank, self.n = inner, folder, rank, 0
        self.exact_logprobs = getattr(inner, "exact_logprobs", True)
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


def main(mode: str, out: Path, url: str, k: int) -> None:
    tok = tiny_tokenizer()
    judge = JudgeTeacher("judge", base_url=url, api_key="test-key", structured="none")
    replay = mode == "replay"
    dist = Distributed() if replay else Distributed.from_environment()
    collector = FeedbackCollector(judge, progress=False, rpm=240) if dist.is_main else None
    trainer = Trainer(
        tiny_model(tok, seed=0), tok, RewardWeighted(advantage="reinforce"), collector, PROMPTS,
        micro_batch_prompts=1, max_staleness=k, distributed=dist,
        output_dir=None if replay else out / "run", progress=False, **SETTINGS,
    )
    if replay:  # the trainer's settings (tis_cap...) stay those of the engine it built
        trainer.rollout = Replay(out / "batches", 2, trainer.pad_id)
    else:
        trainer.rollout = Recording(trainer.rollout, out / "batches", dist.rank)
    try:
        trainer.train()
    finally:
        trainer.close()
        if collector is not None:
            collector.close()
    if dist.is_main:
        torch.save(trainer.model.state_dict(), out / ("replay_weights.pt" if replay else "weights.pt"))
    dist.close()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
