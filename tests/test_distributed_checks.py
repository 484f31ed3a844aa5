"""In-process checks of multi-process training that need no launcher: how a global batch is put
together from the ranks' shares, and the clear errors for a job that cannot run as configured."""

from __future__ import annotations

import pytest
import torch

from opd_sdk.batch import RolloutBatch
from opd_sdk.data import PromptItem
from opd_sdk.distributed import Distributed
from opd_sdk.errors import ConfigError
from opd_sdk.objectives import RewardWeighted
from opd_sdk.rollout import TransformersRollout
from opd_sdk.trainer import Trainer
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)
from tests.test_trainer import Constant, collector

PROMPTS = [PromptItem(prompt=p) for p in ("Hi", "What is 12 + 30?", "Say a long word please", "Go")]


def test_shares_concatenate_to_the_batch_one_process_samples(one_thread):
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


def test_deepspeed_launch_is_refused_with_what_to_use(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="DeepSpeed is not supported.*FSDP"):
        Distributed.from_environment()


def test_a_checkpoint_resumes_only_on_its_process_count(tmp_path, one_thread):
    tok = tiny_tokenizer()
    settings = dict(prompts_per_step=2, group_size=2, max_new_tokens=2, output_dir=tmp_path, progress=False)
    Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=1, **settings).train()
    again = Trainer(tiny_model(tok), tok, RewardWeighted(), collector(Constant()), PROMPTS, max_steps=2, **settings)
    again.dist = Distributed(rank=0, world_size=2)
    with pytest.raises(ConfigError, match="saved by a job of 1 process.*this one has 2.*--num_processes 1"):
        again.resume("latest")


def test_teachers_that_run_the_student_are_found_inside_composites():
    """Under FSDP such a teacher would run a sharded model on rank 0 alone (the trainer refuses it)."""
    from providers.compose import WeightedSum
    from providers.self_distill import SelfDistillTeacher
    from providers.verifier import VerifierTeacher

    from opd_sdk.teacher import reads_student

    tok = tiny_tokenizer()
    student, other = tiny_model(tok), tiny_model(tok, seed=1)
    live = SelfDistillTeacher(student, tok)
    ema = SelfDistillTeacher(student, tok, mode="ema")  # folds the student's weights in every step
    verifier = VerifierTeacher("numeric")
    assert reads_student(live, student) == [live.id]
    assert reads_student(ema, student) == [ema.id]
    assert reads_student(verifier, student) == []
    assert reads_student(WeightedSum([(verifier, 1.0), (live, 1.0)]), student) == [live.id]
    assert reads_student(SelfDistillTeacher(other, tok, mode="ema"), student) == []  # another model's
