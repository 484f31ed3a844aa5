"""`opd inspect` end to end: a tiny student samples, scripted teachers on 127.0.0.1 answer through the
real openai client, and the report flags each bad teacher for what is wrong with it (and passes a good one)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import yaml

from opd_sdk.app import cli
from opd_sdk.app.inspect import Thresholds, run_inspect
from opd_sdk.config.run import load_config
from opd_sdk.errors import ConfigError
from tests.providers.helpers import fenced_texts
from tests.scripted_server import ScriptedServer

PROMPTS, G = 6, 4  # 6 groups of 4: 36 within-group pairs for the rank agreement



def write_config(tmp_path: Path, tiny_dir: Path, teacher: dict, objective: dict | None = None, **extra) -> Path:
    raw = {
        "student": {"model": str(tiny_dir)},
        "data": {"task": "addition", "eval_size": 8},
        "teacher": teacher,
        "objective": objective or {"type": "reward_weighted", "params": {"advantage": "rloo"}},
        "rollout": {"prompts_per_step": 3, "group_size": G, "max_new_tokens": 5},
        "output_dir": str(tmp_path / "run"),
        "steps": 10,
        "logging": {"progress": False},
        **extra,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def judge_text(score_of) -> callable:
    """A pointwise judge that scores the fenced response with score_of(text)."""
    return lambda body: json.dumps({"score": score_of(fenced_texts(body)[0])})


def stable_score(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 11


def logprob_server(noise: float):
    """/v1/completions with echo + prompt_logprobs for token-id prompts: a fixed log-prob per token id,
    plus Gaussian noise of sd `noise` on every call (a non-deterministic endpoint)."""
    rng = random.Random(0)

    def answer(body: dict) -> dict:
        ids = body["prompt"]
        values = [-1.0 - (i % 7) / 10 + (rng.gauss(0, noise) if noise else 0.0) for i in ids]
        prompt_lps = [None] + [{str(i): {"logprob": v, "rank": 1}} for i, v in zip(ids[1:], values[1:])]
        return {"id": "cmpl", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": "x", "finish_reason": "length",
                             "logprobs": {"tokens": ["t"] * len(ids), "text_offset": list(range(len(ids))),
                                          "token_logprobs": [None] + values[1:], "top_logprobs": None},
                             "prompt_logprobs": prompt_lps}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}
    return answer


def inspect(capsys, tmp_path, tiny_dir, teacher, objective=None, *extra):
    path = write_config(tmp_path, tiny_dir, teacher, objective)
    out = tmp_path / "report"
    rc = cli.main(["inspect", str(path), "--prompts", str(PROMPTS), "--yes", "--out", str(out), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err, out


def judge(srv, **kw) -> dict:
    return {"type": "judge", "model": "scripted", "base_url": srv.base_url, **kw}


def test_a_good_judge_passes_with_a_full_report(capsys, tmp_path, tiny_dir):
    with ScriptedServer(judge_text(stable_score)) as srv:
        rc, out, err, report = inspect(capsys, tmp_path, tiny_dir, judge(srv))
        calls = srv.count
    assert rc == 0, err
    assert calls == 2 * PROMPTS * G  # pass 1 and the repeat, one call per sample (pointwise)
    md = (report / "inspect.md").read_text()
    assert "| usable answers | 100% (24/24 samples) |" in md
    assert "| repeat: rank agreement | 100% |" in md and "| verdict | usable |" in md
    assert "| whole run (120 samples): cost |" in md  # 10 steps x 3 prompts x 4 samples
    for png in ("score_histogram.png", "latency.png"):
        assert (report / png).stat().st_size > 1000
    assert "latency p50 / p95" in out and "unusable" not in err


def test_a_noisy_judge_is_flagged_noisy(capsys, tmp_path, tiny_dir):
    rng = random.Random(1)
    with ScriptedServer(judge_text(lambda text: rng.randint(0, 10))) as srv:
        rc, _, err, _ = inspect(capsys, tmp_path, tiny_dir, judge(srv))
    assert rc == 1
    assert "teacher (judge) is unusable: noisy: asked twice, the rankings agree on" in err
    assert "flat" not in err


def test_a_flat_judge_is_flagged_flat_unless_the_threshold_allows_it(capsys, tmp_path, tiny_dir):
    with ScriptedServer(lambda body: '{"score": 5}') as srv:
        rc, _, err, report = inspect(capsys, tmp_path, tiny_dir, judge(srv))
        assert rc == 1
        assert "flat: 100% of groups have all-equal scores (no gradient) > max_flat_share 50%" in err
        assert "noisy" not in err  # a constant is perfectly repeatable
        rc, _, err, _ = inspect(capsys, tmp_path, tiny_dir, judge(srv), None, "--threshold", "max_flat_share=1")
    assert rc == 0, err
    assert "- max_flat_share: 1.0" in (report / "inspect.md").read_text()


def test_a_pairwise_judge_that_always_prefers_the_first_answer_is_flagged_position_biased(
        capsys, tmp_path, tiny_dir):
    with ScriptedServer(lambda body: '{"winner": "A"}') as srv:
        teacher = {"type": "preference", "model": "scripted", "base_url": srv.base_url}
        rc, _, err, report = inspect(capsys, tmp_path, tiny_dir, teacher, {"type": "online_dpo"})
    assert rc == 1
    assert "position-biased: the verdict changes with the order; agreement when swapped 0%" in err
    assert (report / "swap_agreement.png").exists()


def test_a_listwise_judge_that_grades_by_position_is_flagged_position_biased(capsys, tmp_path, tiny_dir):
    def by_position(body: dict) -> str:
        n = len(fenced_texts(body))
        return json.dumps({"scores": [10] + [0] * (n - 1)})  # the first response shown wins, whatever it says

    with ScriptedServer(by_position) as srv:
        rc, _, err, _ = inspect(capsys, tmp_path, tiny_dir, judge(srv, mode="listwise"))
        calls = srv.count
    assert rc == 1 and "position-biased" in err
    assert calls == 3 * PROMPTS  # pass 1, the reversed order, the repeat: one call per group


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_log_prob_teacher_repeatability_against_the_signal(capsys, tmp_path, tiny_dir, noise):
    with ScriptedServer(logprob_server(noise)) as srv:
        teacher = {"type": "logprob", "model": "scripted", "base_url": srv.base_url, "send": "token_ids"}
        rc, _, err, report = inspect(capsys, tmp_path, tiny_dir, teacher, {"type": "token_distill"})
    md = (report / "inspect.md").read_text()
    assert "| token alignment | token_ids x24 |" in md
    assert "| echo / prompt log-probs + top-k | yes / yes |" in md
    if noise:
        assert rc == 1 and "non-deterministic log-probs: the same text scored twice differs by up to" in err
    else:
        assert rc == 0, err
        assert "| repeat: max / mean \\|diff\\| | 0 / 0 |" in md


def test_the_projected_cost_is_printed_and_declining_sends_nothing(tmp_path, tiny_dir):
    with ScriptedServer(judge_text(stable_score)) as srv:
        path = write_config(tmp_path, tiny_dir, judge(srv), collector={
            "price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 2.0})
        lines: list[str] = []
        asked: list[str] = []
        result = run_inspect(load_config(path), prompts=2, log=lines.append,
                             ask=lambda q: asked.append(q) or "n")
        assert result is None and srv.count == 0 and asked
    # 2 passes x 2 prompts x 4 samples = 16 calls, each at most max_tokens=200 completion tokens ($2/1k)
    projected = next(line for line in lines if "calls (plus retries" in line)
    assert ": 16 calls (plus retries and re-asks)" in projected
    cost = float(projected.rsplit("~$", 1)[1])
    assert cost > 16 * 200 * 2.0 / 1000  # the completion tokens alone: $6.40
    assert any(line.startswith("opd: projected cost of this inspection: ~$") for line in lines)


def test_unknown_threshold_names_are_refused():
    with pytest.raises(ConfigError, match="unknown name; use one of min_usable"):
        Thresholds.parse(["min_usabel=0.5"])
    assert Thresholds.parse(["min_usable=0.5"]).min_usable == 0.5


def test_failures_are_counted_and_quoted_and_teachers_of_two_kinds_share_one_table(capsys, tmp_path, tiny_dir):
    with ScriptedServer(lambda body: "I think it is a fine answer.", handlers={"/v1/completions": logprob_server(0)}) as srv:
        teachers = [judge(srv, max_reasks=0),
                    {"type": "logprob", "model": "scripted", "base_url": srv.base_url, "send": "token_ids"}]
        terms = [{"type": "reward_weighted", "weight": 1.0, "source": 0},
                 {"type": "token_distill", "weight": 1.0, "source": 1}]
        raw = yaml.safe_load(write_config(tmp_path, tiny_dir, {}).read_text())
        del raw["teacher"]
        raw.update(teachers=teachers, objective={"type": "hybrid", "params": {"terms": terms}},
                   collector={"max_retries": 0})
        path = tmp_path / "two.yaml"
        path.write_text(yaml.safe_dump(raw))
        rc = cli.main(["inspect", str(path), "--prompts", str(PROMPTS), "--yes", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "teachers.0 (judge) is unusable: usable answers 0% < min_usable 90% (failures: bad_response x24)" in err
    assert "teachers.1" not in err
    md = (tmp_path / "r" / "inspect.md").read_text()
    assert "| usable answers | 0% (0/24 samples) | 100% (24/24 samples) |" in md
    assert "| token alignment | n/a | token_ids x24 |" in md
    assert "last reply: 'I think it is a fine answer.'" in md  # the failed answer, quoted


def test_measure_on_answers_worked_by_hand():
    from opd_sdk.app.inspect_measure import TeacherReport, judge_problems, measure
    from opd_sdk.types import FeedbackFailure, Score

    first = [Score(scores=[0.2, 0.8]), Score(scores=[0.5, 0.5]),
             FeedbackFailure(reason="judge verdict did not parse", error_type="bad_response")]
    again = [Score(scores=[0.3, 0.7]), Score(scores=[0.5, 0.5]), first[2]]
    report = measure(TeacherReport("teacher", "judge", "score", "judge:x"), first, again, 2,
                     labels=[[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    assert (report.samples, report.usable, report.failures) == (6, 4, {"bad_response": 2})
    assert report.failure_quote == "bad_response: judge verdict did not parse"
    assert report.repeat_agreement == 1.0  # same order in group 1, a tie twice in group 2
    assert report.repeat_max_diff == pytest.approx(0.1) and report.repeat_mean_diff == pytest.approx(0.05)
    assert report.flat_share == 0.5
    # correct: 0.8 and 0.5; wrong: 0.2 and 0.5 -> (1 + 1 + 1 + 1/2) / 4
    assert report.verifier_auc == pytest.approx(0.875) and report.verifier_classes == (2, 2)
    assert judge_problems(report, Thresholds()) == [
        "usable answers 67% < min_usable 90% (failures: bad_response x2)"]
