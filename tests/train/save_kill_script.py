"""Run by tests/train/test_checkpoint_damage.py in a fresh interpreter: trains a tiny model with a
checkpoint every step and, inside step 2's save, prints SAVING and waits to be killed.

    python tests/train/save_kill_script.py OUTPUT_DIR scrubbing|before_rename

scrubbing: every file but trainer_state.json is written; machine paths are being scrubbed from them.
before_rename: every file is written and flushed, the folder not yet renamed to step-2/.
"""

from __future__ import annotations

import sys
import time

import torch

from opd_sdk.objectives import RewardWeighted
from opd_sdk.train import checkpoint
from tests.train.test_checkpoint import make_trainer


def wait_to_be_killed() -> None:
    print("SAVING", flush=True)
    time.sleep(600)
    sys.exit(1)  # never killed: the test fails on the exit status


def main(out: str, where: str) -> None:
    if where == "scrubbing":  # rewriting saved JSON files (a LoRA adapter's base path): it once ran after the rename
        scrub = checkpoint.scrub_machine_paths

        def slow_scrub(folder):
            if str(folder).rstrip("/").endswith(("step-2", "step-2.tmp")):
                wait_to_be_killed()
            return scrub(folder)

        checkpoint.scrub_machine_paths = slow_scrub
    else:
        replace = checkpoint._replace_folder

        def slow_replace(tmp, final):
            if final.name == "step-2":
                wait_to_be_killed()
            return replace(tmp, final)

        checkpoint._replace_folder = slow_replace
    trainer, _, coll = make_trainer(out, None, RewardWeighted(), save_every=1)
    trainer.max_steps = 3
    trainer.train()
    coll.close()
    sys.exit(1)  # the save never paused


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
