"""`opd eval --exposure`: the exposure-bias meter, on tiny models, with a teacher over HTTP and a local one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from opd_sdk.app import cli
from opd_sdk.app.exposure import by_first_wrong_step, format_table, per_position
from opd_sdk.data import PromptItem
from opd_sdk.rollout.engine import render_prompts
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401
from tests.model_server import ModelResponder
from tests.scripted_server import ScriptedServer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_per_position_means_the_log_loss_over_the_rows_that_reach_it():
    rows = per_position([[-1.0, -2.0, -4.0], [-3.0, math.nan]])
    assert rows == [{"pos": 0, "mean_nll": 2.0, "n": 2}, {"pos": 1, "mean_nll": 2.0, "n": 1},
                    {"pos": 2, "mean_nll": 4.0, "n": 1}]


def test_accuracy_by_first_wrong_step():
    item = PromptItem(prompt="Start at 20. Subtract 4, then add 24.", answer="40",
                      metadata={"solution": "20 - 4 = 16\n16 + 24 = 40\nAnswer: 40"})
    texts = ["20 - 4 = 16\n16 + 24 = 40\nAnswer: 40",  # all right
             "20 - 4 = 15\n15 + 24 = 39\nAnswer: 39",  # slip at step 0, wrong
             "20 - 4 = 15\n16 + 24 = 40\nAnswer: 40",  # slip at step 0, right answer anyway
             "20 - 4 = 16\n16 + 24 = 41\nAnswer: 41"]  # slip at step 1
    groups = by_first_wrong_step(texts, [item] * 4)
    assert groups == [{"step": 0, "n": 2, "accuracy": 0.5}, {"step": 1, "n": 1, "accuracy": 0.0},
                      {"step": "none", "n": 1, "accuracy": 1.0}]



def config(tmp_path: Path, student: Path, teacher: dict, objective: str = "token_distill") -> Path:
    raw = {"student": {"model": str(student)}, "data": {"task": "running_total", "eval_size": 3},
           "teacher": teacher, "objective": {"type": objective},
           "rollout": {"max_new_tokens": 6, "temperature": 1.0}, "eval": {"max_new_tokens": 6},
           "output_dir": str(tmp_path / "run"), "logging": {"progress": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_exposure_over_http_scores_the_students_samples_and_the_teachers_text(tmp_path, tiny_dir, capsys):
    tok = tiny_tokenizer()
    teacher = tiny_model(tok, seed=1)
    with ScriptedServer(ModelResponder(teacher, tok)) as srv:
        path = config(tmp_path, tiny_dir, {"type": "logprob", "model": "teacher", "base_url": srv.base_url,
                                           "send": "token_ids"})
        assert cli.main(["eval", str(path), "--exposure", "--samples", "2"]) == 0
        chats = srv.count_path("/v1/chat/completions")
    out = capsys.readouterr().out
    assert "teacher log-loss" in out and "| first wrong step |" in out
    result = json.loads((tmp_path / "run" / "exposure" / "base" / "exposure.json").read_text())
    assert (tmp_path / "run" / "exposure" / "base" / "exposure.png").exists()
    assert chats == 3 and result["reference_source"].startswith("the teacher's samples")
    assert sum(g["n"] for g in result["first_wrong_step"]) == 6  # 3 prompts x 2 samples, all graded
    # position 0 of the teacher's text: -log p_teacher(its first token | the rendered prompt), by hand
    first = result["reference_nll_by_position"][0]
    assert first["n"] == 3
    from opd_sdk.tasks import get_task

    items = get_task("running_total").items("heldout", 3, seed=0)
    assert result["prompts"] == 3 and result["student_nll_by_position"][0]["n"] == 6
    assert all(r["mean_nll"] > 0 for r in result["student_nll_by_position"])
    # the first reference token is the teacher's own greedy-or-sampled pick; its log-loss is what the model says
    prompt_ids = tok(render_prompts(tok, items[:1])[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(teacher(torch.tensor([prompt_ids])).logits[0, -1], -1)
    assert first["mean_nll"] >= -float(lp.max()) - 1e-5  # no text scores better than the teacher's argmax


def test_exposure_with_a_local_teacher_uses_the_dataset_solutions(tmp_path, tiny_dir):
    path = config(tmp_path, tiny_dir, {"type": "self_distill", "mode": "frozen"})
    assert cli.main(["eval", str(path), "--exposure", "--samples", "1", "--json"]) == 0
    result = json.loads((tmp_path / "run" / "exposure" / "base" / "exposure.json").read_text())
    assert result["reference_source"] == "dataset reference solutions" and result["teacher"] == "self_distill"
    assert "| 0-7 |" in format_table(result)


def test_exposure_refuses_a_teacher_without_logprobs(tmp_path, tiny_dir, capsys):
    path = config(tmp_path, tiny_dir, {"type": "verifier"}, objective="reward_weighted")
    assert cli.main(["eval", str(path), "--exposure"]) == 2
    assert "needs a teacher that returns log-probs of given text" in capsys.readouterr().err
