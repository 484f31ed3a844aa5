"""Multi-process training (opd_sdk.parallel.distributed) on 2 CPU processes (gloo), launched as users launch it.

- The Python API under `torchrun`: weights after 3 steps equal one process trained on the same
  global batch (atol 1e-5), with and without the pipeline (max_staleness 1), under FSDP2 and
  DeepSpeed ZeRO-2 and ZeRO-1 with LoRA (when deepspeed is installed); every judge request
  is sent once, and never faster than the job's RPM although two processes sample.
- `opd train` under `accelerate launch`: rank 0 alone writes; killing one rank stops the job,
  and `--resume` finishes it without asking the judge anything it already answered.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripted_server import ScriptedServer
from tests.train.test_crash_resume import (
    CALLS_PER_STEP,
    KEY,
    STEPS,
    GatedJudge,
    answered,
    assert_no_key_anywhere,
    finish_and_check,
    steps_in,
    write_config,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "distributed_script.py"

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available() or shutil.which("torchrun") is None,
    reason="needs torch.distributed with gloo and the torchrun launcher",
)


def env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def scores_by_content(body: dict) -> str:
    """A deterministic judge: the score depends on the text it is shown."""
    text = body["messages"][-1]["content"]
    return f"Score: {sum(map(ord, text)) % 11}"


def run(cmd: list[str], timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=ROOT, env=env or globals()["env"](), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def assert_within_rpm(arrivals: list[float], rpm: float) -> None:
    """The collector's bucket admits at most 1 + rate * w requests in any window of w seconds."""
    rate = rpm / 60.0
    arrivals = sorted(arrivals)
    for i in range(len(arrivals)):
        for j in range(i + 1, len(arrivals)):
            assert j - i + 1 <= 1 + rate * (arrivals[j] - arrivals[i]) + 1, (i, j, arrivals)


# what `accelerate launch` exports for each example config (examples/accelerate/)
LAUNCH_ENV = {
    "ddp": {},
    "fsdp": {"ACCELERATE_USE_FSDP": "true"},
    "zero2": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"},
    "zero1-lora": {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1", "OPD_TEST_LORA": "1"},
}
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


@pytest.mark.parametrize("strategy, k", [("ddp", 0), ("ddp", 1), ("fsdp", 0), pytest.param("zero2", 0, marks=needs_deepspeed),
                                         pytest.param("zero1-lora", 0, marks=needs_deepspeed)])
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path, strategy, k):
    launched = env() | LAUNCH_ENV[strategy]
    torchrun = ["torchrun", "--standalone", "--nproc_per_node", "2", str(SCRIPT)]
    with ScriptedServer(scores_by_content) as srv:
        run(torchrun + ["record", str(tmp_path), srv.base_url, str(k)], env=launched)
        bodies = [str(b) for b in srv.bodies()]
        arrivals = srv.arrival_times()
        run([sys.executable, str(SCRIPT), "replay", str(tmp_path), srv.base_url, str(k)], env=launched)
        if k == 0:  # the job again from its step-2 checkpoint: the same last step, the same weights
            run(torchrun + ["resume", str(tmp_path), srv.base_url, str(k)], env=launched)

    # each rank sampled its own half of every step: 2 prompts x 2 samples
    assert sorted(p.name for p in (tmp_path / "batches").iterdir()) == [
        f"step{n}-rank{r}.json" for n in range(3) for r in range(2)
    ]
    # every request once (4 prompts x 2 samples x 3 steps, minus answers the cache already had), at the job's RPM
    assert 0 < len(bodies) <= 24 and len(set(bodies)) == len(bodies)
    assert_within_rpm(arrivals, rpm=240)

    two = torch.load(tmp_path / "weights.pt", weights_only=True)
    one = torch.load(tmp_path / "replay_weights.pt", weights_only=True)
    from tests.loop_fixtures import tiny_model, tiny_tokenizer

    start = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    lora = strategy.endswith("lora")  # only the adapters move; lora_B starts at zero
    moved = max(float(w.abs().max()) if lora and "lora_B" in n else 0.0 if lora else float((w - start[n]).abs().max())
                for n, w in two.items())
    assert moved > 1e-3, "the weights did not move: the comparison below would prove nothing"
    for name in two:  # (an FSDP-saved student keeps a tied LM head once, under the embeddings' name)
        torch.testing.assert_close(two[name], one[name], atol=1e-5, rtol=0, msg=name)
    if k == 0:
        resumed = torch.load(tmp_path / "resumed_weights.pt", weights_only=True)
        for name in two:
            torch.testing.assert_close(resumed[name], two[name], atol=1e-6, rtol=0, msg=name)

    # rank 0 alone wrote the log and the checkpoints, each rank's RNG beside them
    rows = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 3
    step = tmp_path / "run" / "step-3"
    assert (step / "rng-rank1.pt").exists()
    assert (step / "sharded").is_dir() == (strategy == "fsdp")
    assert (step / ("adapter" if lora else "model")).is_dir() == (strategy != "fsdp")
    assert (step / "deepspeed").is_dir() == strategy.startswith("zero")  # each rank's optimizer partition


def launch(config: Path, *extra: str, accelerate_config: str = "ddp") -> subprocess.Popen:
    """`opd train` as README launches it on 2 processes: `accelerate launch` with an example config."""
    cmd = ["accelerate", "launch", "--config_file", str(ROOT / "examples" / "accelerate" / f"{accelerate_config}.yaml"),
           "-m", "opd_sdk", "train", str(config), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env() | {"OPD_CRASH_KEY": KEY, "OPD_TEST_RUN": str(config)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(config: Path, rank: int) -> int | None:
    """The pid of the training process with RANK=rank launched for `config`."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OPD_TEST_RUN={config}".encode() in environ and f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
def test_opd_train_under_accelerate_launch_survives_a_killed_rank(tmp_path, tiny_dir):
    judge = GatedJudge(hold_at=2 * CALLS_PER_STEP + 1)  # step 3's second call: the server stalls
    with ScriptedServer(judge, max_concurrency=1) as srv:
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        proc = launch(config)
        assert judge.reached.wait(240), proc.communicate(timeout=60)[1][-4000:] if proc.poll() is not None else ""
        os.kill(rank_pid(config, 1), signal.SIGKILL)  # rank 1 dies while rank 0 waits for the judge
        judge.release.set()
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        paid = answered(srv)
        run = tmp_path / "run"
        assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2"]
        assert steps_in(run) == [0, 1, 2]  # rank 0 alone logs: each step once
        assert "on 2 processes" in out and out.count("opd: training") == 1

        summary = finish_and_check(config, srv, [out, err], paid, start=launch)
    assert summary["steps"] == STEPS
    assert (run / "step-4" / "rng-rank1.pt").exists() and (run / "final").exists()
    assert_no_key_anywhere(run, [out, err])


@pytest.mark.skipif(shutil.which("accelerate") is None, reason="needs the accelerate launcher")
@pytest.mark.parametrize("accelerate_config, shards", [("fsdp", "sharded"),
                                                       pytest.param("deepspeed", "deepspeed", marks=needs_deepspeed)])
def test_opd_train_under_accelerate_fsdp_or_zero_saves_a_whole_student_and_resumes(
        tmp_path, tiny_dir, accelerate_config, shards):
    from transformers import AutoModelForCausalLM

    with ScriptedServer(scores_by_content) as srv:
        config = write_config(tmp_path, tiny_dir, srv.base_url)
        proc = launch(config, "--set", "steps=2", accelerate_config=accelerate_config)
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-6000:]
        run = tmp_path / "run"
        assert steps_in(run) == [0, 1, 2] and (run / "step-2" / shards).is_dir()
        summary = json.loads(out[out.index("{"):])
        assert summary["steps"] == 2 and summary["heldout_after"] is not None
        saved = AutoModelForCausalLM.from_pretrained(run / "final").state_dict()
        start = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
        assert max(float((saved[n] - start[n]).abs().max()) for n in start) > 1e-4  # trained, and saved whole

        proc = launch(config, "--resume", "--set", "steps=3", accelerate_config=accelerate_config)  # one step more
        out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-6000:]
    assert steps_in(run) == [0, 1, 2, 3] and (run / "step-3" / shards).is_dir()
