"""In-process checks of multi-process training that need no launcher: how a global batch is put
together from the ranks' shares, and the clear errors for a job that cannot run as configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.objectives import RewardWeighted
from opd_sdk.parallel.distributed import Distributed
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.engine import TransformersRollout
from opd_sdk.train.trainer import Trainer
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401
from tests.train.test_trainer import Constant, collector

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [PromptItem(prompt=p) for p in ("Hi", "What is 12 + 30?", "Say a long word please", "Go")]


def test_shares_concatenate_to_the_batch_one_process_samples(one_thread):  # noqa: F811
    """Two ranks' shares, each padded to its own widths, re-pad to exactly one batch of all prompts."""
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    whole = TransformersRollout(tiny_model(tok), tok, max_new_tokens=6).sample(PROMPTS, 2)
    shares = [whole.select_prompts(0, 2), whole.select_prompts(2, 4)]
    # the shares are narrower than the whole (their own longest prompt and completion)...
    trimmed = [RolloutBatch.from_json(s.to_json()) for s in shares]
    for s in trimmed:
        left = int((s.attention_mask_BT[:, : s.prompt_len].sum(0) == 0).sum())  # all-padding prompt columns
        s.input_ids_BT, s.attention_mask_BT = s.input_ids_BT[:, left:], s.attention_mask_BT[:, left:]
        s.completion_mask_BT, s.sampler_logprobs_BT = s.completion_mask_BT[:, left:], s.sampler_logprobs_BT[:, left:]
        s.prompt_len -= left
    assert trimmed[0].prompt_len < whole.prompt_len or trimmed[1].prompt_len < whole.prompt_len
    # ...and come back as the whole, column for column
    joined = RolloutBatch.concat(trimmed, pad_id=tok.pad_token_id)
    used = whole.attention_mask_BT.sum(0) > 0
    width = int(used.nonzero().max()) + 1
    assert joined.prompt_len == whole.prompt_len
    for name in ("input_ids_BT", "attention_mask_BT", "completion_mask_BT", "sampler_logprobs_BT"):
        torch.testing.assert_close(getattr(joined, name)[:, :width], getattr(whole, name)[:, :width], msg=name)
    assert [c.text for c in joined.completions] == [c.text for c in whole.completions]


def test_concat_refuses_batches_that_do_not_belong_together():
    tok = tiny_tokenizer()
    rollout = TransformersRollout(tiny_model(tok), tok, max_new_tokens=2)
    with pytest.raises(ValueError, match="group sizes"):
        RolloutBatch.concat([rollout.sample(PROMPTS[:1], 2), rollout.sample(PROMPTS[:1], 3)])


def test_prompts_per_step_must_split_evenly_over_the_processes():
    tok = tiny_tokenizer()
    two_ranks = Distributed(rank=0, world_size=2)  # no process group: the check comes before any collective
    with pytest.raises(ConfigError, match=r"prompts_per_step \(3\) must be a multiple of the number of processes \(2\)"):
        Trainer(tiny_model(tok), tok, RewardWeighted(), None, PROMPTS, prompts_per_step=3, distributed=two_ranks)


def test_deepspeed_configs_opd_cannot_run_are_refused_with_the_fix(monkeypatch):
    """ZeRO-3, offloading and a DeepSpeed JSON file: refused before any process group (stage 1/2 run:
    tests/parallel/test_distributed.py)."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ds.json")
    with pytest.raises(ConfigError) as err:
        Distributed.from_environment()
    for expected in ("zero_stage 3: opd-sdk runs ZeRO stage 1 or 2; to shard the student's parameters use FSDP",
                     "offloading is not supported; set both to none",
                     "give zero_stage in the accelerate config instead of a file"):
        assert expected in str(err.value), (expected, str(err.value))


def test_a_zero_checkpoint_resumes_only_under_zero_and_the_cli_says_so_before_writing(tmp_path, one_thread):  # noqa: F811
    tok = tiny_tokenizer()
    settings = dict(prompts_per_step=2, group_size=2, max_new_tokens=2, output_dir=tmp_path, progress=False)
    Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=1, **settings).train()
    state = tmp_path / "step-1" / "trainer_state.json"  # as a ZeRO-2 job of one process leaves it
    state.write_text(json.dumps(json.loads(state.read_text()) | {"zero_stage": 2}))
    again = Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=2, **settings)
    mixed = r"saved by a DeepSpeed ZeRO-2 job and this one is plain.*the accelerate config the run was started with"
    with pytest.raises(ConfigError, match=mixed):
        again.resume("latest")
    from opd_sdk.app.runner import (
        prepare_output_dir,  # `opd train --resume` refuses it before writing anything
    )

    with pytest.raises(ConfigError, match=mixed):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="saved by a job of 1 process"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False, dist=Distributed(world_size=2, zero_stage=2))
    with pytest.raises(ConfigError, match="saved by a DeepSpeed ZeRO-2 job and this one is DeepSpeed ZeRO-1"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False, dist=Distributed(zero_stage=1))


def test_a_checkpoint_resumes_only_on_its_process_count(tmp_path, one_thread):  # noqa: F811
    tok = tiny_tokenizer()
    settings = dict(prompts_per_step=2, group_size=2, max_new_tokens=2, output_dir=tmp_path, progress=False)
    Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=1, **settings).train()
    state = tmp_path / "step-1" / "trainer_state.json"  # as a job of 2 processes leaves it
    state.write_text(json.dumps(json.loads(state.read_text()) | {"world_size": 2}))
    again = Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=2, **settings)
    with pytest.raises(ConfigError, match="saved by a job of 2 process.*this one has 1.*--num_processes 2"):
        again.resume("latest")


def test_teachers_that_run_the_student_are_found_inside_composites():
    """Under FSDP such a teacher would run a sharded model on rank 0 alone (the trainer refuses it)."""
    from opd_sdk.feedback.teacher import reads_student
    from providers.compose import WeightedSum
    from providers.self_distill import SelfDistillTeacher
    from providers.verifier import VerifierTeacher

    tok = tiny_tokenizer()
    student, other = tiny_model(tok), tiny_model(tok, seed=1)
    live = SelfDistillTeacher(student, tok, mode="live")
    ema = SelfDistillTeacher(student, tok, mode="ema")  # folds the student's weights in every step
    verifier = VerifierTeacher("numeric")
    assert reads_student(live, student) == [live.id]
    assert reads_student(ema, student) == [ema.id]
    assert reads_student(verifier, student) == []
    assert reads_student(WeightedSum([(verifier, 1.0), (live, 1.0)]), student) == [live.id]
    assert reads_student(SelfDistillTeacher(other, tok, mode="ema"), student) == []  # another model's


def test_check_lists_every_problem_of_this_launch_before_anything_loads(tmp_path, capsys, monkeypatch):
    """`opd train --check` under a launcher (WORLD_SIZE, accelerate's FSDP flag): all problems, each with its fix."""
    import yaml

    from tests.app.test_cli import run_cli

    raw = yaml.safe_load((ROOT / "examples" / "configs" / "verifier_times_table.yaml").read_text())
    raw["rollout"] = {**raw.get("rollout", {}), "prompts_per_step": 3, "max_staleness": 1}
    raw["objective"] = {"type": "reward_weighted", "params": {"beta": 0.05}}
    raw["eval"] = {**raw.get("eval", {}), "every": 2}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    rc, out, err = run_cli(capsys, "train", str(tmp_path / "run.yaml"), "--check")
    assert rc == 2 and "valid" not in out
    for expected in ("prompts_per_step (3) must be a multiple of the number of processes (2)",
                     "rollout.max_staleness: FSDP trains without overlap for now; set it to 0",
                     "eval.every: not available under FSDP",
                     "RewardWeighted keeps a frozen copy of the student"):
        assert expected in err, (expected, err)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    rc, _, err = run_cli(capsys, "train", str(tmp_path / "run.yaml"), "--check")
    assert rc == 2 and "zero_stage 3" in err and "frozen copy" not in err  # ZeRO keeps the whole student
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    raw["rollout"]["prompts_per_step"] = 4
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    rc, out, err = run_cli(capsys, "train", str(tmp_path / "run.yaml"), "--check")
    assert rc == 0, err  # data parallel takes all of it


def test_fsdp_refuses_a_frozen_copy_before_it_copies_anything():
    tok = tiny_tokenizer()
    sharded_alone = Distributed(rank=0, world_size=1, fsdp=True)  # refused before any process group is needed
    with pytest.raises(ConfigError, match="RewardWeighted keeps a frozen copy of the student.*data parallel"):
        Trainer(tiny_model(tok), tok, RewardWeighted(beta=0.1), None, PROMPTS, prompts_per_step=2,
                distributed=sharded_alone)


def test_after_a_stop_a_launched_job_says_which_checkpoint_it_resumes_from(tmp_path, monkeypatch):
    """A job of several processes writes no checkpoint when stopped: the message names the newest one."""
    from types import SimpleNamespace

    from opd_sdk.app.cli import _after_interrupt

    cfg = SimpleNamespace(output_dir=str(tmp_path), save_every=5)  # the two fields it reads of a RunConfig
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _after_interrupt(cfg).startswith("no checkpoint was saved yet (a job of several processes saves only "
                                            "every save_every=5 steps), so there is no complete checkpoint")
    (tmp_path / "step-5").mkdir()
    (tmp_path / "step-5" / "trainer_state.json").write_text('{"step": 5}')
    assert _after_interrupt(cfg).startswith("checkpoint step-5 is the newest (a job of several processes")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _after_interrupt(cfg).startswith("checkpoint step-5 was saved; `opd train CONFIG --resume`")
