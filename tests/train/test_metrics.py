"""Metric names: namespaced, each computed in one place, documented in README; a run written with
the old flat names (before the namespaces) reads like a new one."""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import TeacherError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.metrics import (
    NAMESPACES,
    MetricsLogger,
    StepTimer,
    current_name,
    merge_rows,
    plot_learning_curve,
    read_metrics,
    reward_curve,
    step_row,
)
from opd_sdk.train.trainer import Trainer
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.types import Completion, FeedbackFailure, Score
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()

# metrics.jsonl as the loop wrote it before the names were namespaced (a resumed run, an old run's folder)
OLD_RUN = [
    {"step": 0, "eval/accuracy": 0.25},
    {"step": 1, "valid_samples": 6.0, "rewardweighted/tokens": 12.0, "signal": 4.0, "policy_passes": 1.0,
     "reward_mean": 0.5, "reward_std": 0.5, "loss": -0.25, "feedback_failures": 1, "failures/timeout": 1,
     "skipped_step": 0, "staleness": 0, "grad_norm": 0.3, "lr": 1e-5, "mean_completion_len": 3.5,
     "teacher_cost_usd": 0.01, "time_sampling_s": 1.5, "time_step_s": 2.0},
    {"step": 2, "reward_mean": 0.75, "loss": -0.125, "feedback_failures": 0, "time_step_s": 1.0},
]
NEW_RUN = [
    {"step": 0, "eval/accuracy": 0.25},
    {"step": 1, "objective/valid_samples": 6.0, "objective/rewardweighted/tokens": 12.0, "optim/signal": 4.0,
     "forward/policy_passes": 1.0, "reward/mean": 0.5, "reward/std": 0.5, "loss/total": -0.25,
     "teacher/failures": 1, "teacher/failures/timeout": 1, "optim/skipped": 0, "rollout/staleness": 0,
     "optim/grad_norm": 0.3, "optim/lr": 1e-5, "rollout/completion_len_mean": 3.5, "teacher/cost_usd": 0.01,
     "time/sample_s": 1.5, "time/step_s": 2.0},
    {"step": 2, "reward/mean": 0.75, "loss/total": -0.125, "teacher/failures": 0, "time/step_s": 1.0},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_old_run_reads_with_the_new_names(tmp_path):
    assert read_metrics(write_jsonl(tmp_path / "old.jsonl", OLD_RUN)) == NEW_RUN
    assert read_metrics(write_jsonl(tmp_path / "new.jsonl", NEW_RUN)) == NEW_RUN  # a new run is unchanged
    assert current_name("loss") == "loss/total" and current_name("loss/total") == "loss/total"


def test_the_learning_curve_reads_old_and_new_rows(tmp_path):
    pytest.importorskip("matplotlib")
    # one resumed run: steps 1-2 written with the old names, step 3 with the new
    history = OLD_RUN[1:] + [{"step": 3, "reward/mean": 1.0}]
    assert reward_curve(history) == ([1, 2, 3], [0.5, 0.75, 1.0])
    png = plot_learning_curve(history, [(0, 0.25), (3, 0.5)], tmp_path / "curve.png", title="t", metric="accuracy")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_old_run_is_rewritten_with_one_set_of_names(tmp_path):
    path = write_jsonl(tmp_path / "metrics.jsonl", OLD_RUN)
    log = MetricsLogger(path, tensorboard=False)
    log.truncate_after(1)  # what resume does: steps after the checkpoint are dropped
    log.log(2, {"reward/mean": 1.0})
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == NEW_RUN[:2] + [{"step": 2, "reward/mean": 1.0}]


def test_metrics_logger_truncates_repeated_steps(tmp_path):
    log = MetricsLogger(tmp_path / "m.jsonl", tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss/total": torch.tensor(float(step)), "reward/mean": None})
    log.truncate_after(1)
    log.log(2, {"loss/total": 20.0})
    log.close()
    assert read_metrics(tmp_path / "m.jsonl") == [
        {"step": 1, "loss/total": 1.0, "reward/mean": None},
        {"step": 2, "loss/total": 20.0},
    ]


def test_a_metric_reported_twice_is_refused():
    assert merge_rows({"loss/total": 1.0}, {"reward/std": 0.5}) == {"loss/total": 1.0, "reward/std": 0.5}
    with pytest.raises(RuntimeError, match=r"\['reward/std'\] are computed in two places"):
        merge_rows({"reward/std": 0.5, "loss/total": 1.0}, {"reward/std": 0.4})


# scores per prompt id: None = the teacher call fails; a None / NaN score = that completion's call failed
SCORES = {0: [0.0, 1.0], 1: [1.0, 1.0], 2: None, 3: [0.5, float("nan")], 4: [None, None]}


class Fixed:
    """Known scores per prompt (SCORES), a failed call for prompt 2."""

    id = "fixed"

    async def feedback(self, request):
        scores = SCORES[request.metadata["id"]]
        if scores is None:
            raise TeacherError("scripted failure", retriable=False)
        return Score(scores=scores)


@pytest.fixture
def row(one_thread):  # noqa: F811 (fixture)
    tok = tiny_tokenizer()
    items = [PromptItem(prompt=f"p{d}", metadata={"id": d}) for d in SCORES]
    with FeedbackCollector(Fixed(), progress=False, max_retries=0) as collector:
        trainer = Trainer(tiny_model(tok), tok, RewardWeighted(advantage="rloo"), collector, items, group_size=2,
                          prompts_per_step=5, max_new_tokens=3, shuffle=False, max_steps=1, precision="fp32")
        return trainer.train_step()


def test_reward_and_failures_are_logged_once_with_the_documented_definition(row):
    # the finite scores of the step: 0, 1, 1, 1, 0.5 (prompt 2 failed; a None and a NaN are missing)
    # mean 3.5 / 5 = 0.7; population std: sqrt((0.7^2 + 3 * 0.3^2 + 0.2^2) / 5) = sqrt(0.8 / 5) = 0.4
    # (the sample std, sqrt(0.8 / 4) = 0.447, was the objective's definition that the loop's overwrote)
    assert row["reward/mean"] == pytest.approx(0.7) and row["reward/std"] == pytest.approx(0.4)
    assert row["teacher/failures"] == 1
    assert [v for k, v in row.items() if k.startswith("teacher/failures/")] == [1]
    # computed once: no other stage (the objective, the loss) logs its own reward or failure statistics
    assert [k for k in row if "reward" in k] == ["reward/mean", "reward/std"]
    assert [k for k in row if "failures" in k and not k.startswith("teacher/failures/")] == ["teacher/failures"]
    # prompt 0 has a spread (its 2 samples learn); 1 is flat, and so is 3 (one valid score); 2 failed; 4 has none
    assert row["objective/valid_samples"] == 2 + 2 + 1 and row["objective/flat_groups"] == 2
    assert row["objective/missing_scores"] == 1 + 2  # prompt 2's failure is counted in teacher/failures
    assert row["optim/signal"] == 2 and row["optim/skipped"] == 0 and math.isfinite(row["loss/total"])


def documented_names() -> list[str]:
    """The metric names in README's "Metrics" table (first column), `<placeholders>` as patterns."""
    section = README[README.index("\n## Metrics"):]
    section = section[: section.index("\n## ", 1)]
    names = re.findall(r"^\| `([^`]+)`", section, re.M)
    assert len(names) > 20, names
    return names


def test_every_logged_name_is_namespaced_and_in_the_readme_table(row):
    patterns = [re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(name))) for name in documented_names()]
    for name in row:
        if name == "step":
            continue
        assert name.split("/")[0] in NAMESPACES, name
        assert any(p.fullmatch(name) for p in patterns), f"{name} is not in README's metrics table"


def test_step_row_builds_the_loops_metrics_from_worked_numbers():
    """2 prompts x 2 samples, 3 + 1 + 2 + 2 = 8 sampled tokens; scores 1, 0, 1 and one timeout;
    laps 0.5 s sampling, then 0.25 + 0.75 + 0.25 + 0.25 s: the step took 2 s."""
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]], dtype=torch.float)
    batch = RolloutBatch(prompts=[PromptItem(prompt="a"), PromptItem(prompt="b")], group_size=2,
                         input_ids_BT=torch.zeros(4, 3, dtype=torch.long), attention_mask_BT=torch.ones(4, 3),
                         completion_mask_BT=mask, sampler_logprobs_BT=torch.zeros(4, 3), prompt_len=0,
                         completions=[Completion(text="x")] * 4)
    feedback = [Score(scores=[1.0, 0.0]), Score(scores=[1.0, None]), FeedbackFailure(reason="t", error_type="timeout")]
    timer = StepTimer()
    timer.start, timer.laps = 10.0, {"sample": 0.5, "feedback": 0.25, "forward_backward": 0.75, "optimizer": 0.25,
                                     "sync": 0.25}
    timer.last = 12.0
    row = step_row({"loss/total": 0.125}, feedback, collections.Counter(timeout=1), batch, timer,
                   teacher={"requests": 3, "cache_hits": 1, "cost_usd": 0.5}, staleness=1, skipped=False,
                   grad_norm=2.0, lr=1e-3)
    assert row == {
        "loss/total": 0.125, "reward/mean": 2 / 3, "reward/std": pytest.approx((2 / 9) ** 0.5),
        "teacher/failures": 1, "teacher/failures/timeout": 1,
        "teacher/requests": 3, "teacher/cache_hits": 1, "teacher/cost_usd": 0.5,
        "rollout/staleness": 1, "rollout/completion_tokens": 8, "rollout/completion_len_mean": 2.0,
        "optim/skipped": 0, "optim/grad_norm": 2.0, "optim/lr": 1e-3,
        "time/tokens_per_s": 4.0, "time/sample_tokens_per_s": 16.0, "time/sample_s": 0.5, "time/feedback_s": 0.25,
        "time/forward_backward_s": 0.75, "time/optimizer_s": 0.25, "time/sync_s": 0.25, "time/step_s": 2.0,
    }
    with pytest.raises(RuntimeError, match="two places"):  # the loss may not report a name the loop reports
        step_row({"reward/mean": 0.0}, feedback, collections.Counter(), batch, timer, teacher={}, staleness=0,
                 skipped=True, grad_norm=None, lr=1e-3)
