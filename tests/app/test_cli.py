"""`opd train` / `opd eval` end to end on a tiny random model, and config errors before any load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from opd_sdk.app import cli, runner
from opd_sdk.errors import ConfigError
from tests.scripted_server import ScriptedServer



def write_config(tmp_path: Path, tiny_dir: Path, **changes) -> Path:
    raw = {
        "student": {"model": str(tiny_dir)},
        "data": {"task": "addition", "eval_size": 8},
        "teacher": {"type": "verifier"},
        "objective": {"type": "reward_weighted", "params": {"advantage": "rloo"}},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4},
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "optimizer": {"lr": 1e-3},
        "output_dir": str(tmp_path / "run"),
        "steps": 2,
        "logging": {"progress": False},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[section] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if anything tries to load the student."""

    def boom(*a, **k):
        raise AssertionError("the student was loaded before the config was checked")

    monkeypatch.setattr(runner, "load_student", boom)


def metric_rows(run: Path) -> list[dict]:
    """metrics.jsonl's rows; step 0 holds only the held-out metric before training."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if r["step"] > 0]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_check_accepts_a_valid_config(tmp_path, tiny_dir, capsys, no_model_load):
    rc, out, _ = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir)), "--check")
    assert rc == 0 and "is valid" in out


@pytest.mark.parametrize(
    "changes, overrides, expected",
    [
        ({"optimizer__lr": -1}, [], "optimizer.lr: Input should be greater than 0"),
        ({}, ["rollout.group_sise=4"], "rollout.group_sise: unknown field"),
        ({"objective": {"type": "reward_wieghted"}}, [], "objective.type: unknown objective 'reward_wieghted'"),
        ({"objective": {"type": "reward_weighted", "params": {"advantages": "rloo"}}}, [],
         "objective.params.advantages: unknown parameter for RewardWeighted; did you mean `advantage`?"),
        ({"teacher": {"type": "verifier", "params": {"tolerance": 1}}}, [],
         "teacher.params.tolerance: unknown parameter for VerifierTeacher; valid: mode, atol"),
        ({"teacher": {"type": "reference", "model": "m", "base_url": "http://127.0.0.1:9/v1"}}, [],
         "objective 'reward_weighted': RewardWeighted reads score feedback but teacher (type 'reference') returns reference"),
        ({"teacher": {"type": "judge", "model": "gpt-4o-mini", "api_key_env": "OPD_TEST_UNSET_KEY"}}, [],
         "teacher.api_key_env: the environment variable OPD_TEST_UNSET_KEY is not set"),
        ({"data": {"task": "long_division"}}, [], "unknown task 'long_division'"),
        ({"objective": {"type": "hybrid", "params": {"terms": [
            {"type": "reward_weighted", "weight": 1.0}, {"type": "token_distill", "weight": 0.1}]}}}, [],
         "objective.params.terms.1: TokenDistill reads token_logprobs feedback but teacher (type 'verifier')"),
        ({"teacher": None}, [], "teacher: objective 'reward_weighted' reads score feedback; add a `teacher:`"),
        ({"objective": {"type": "hybrid", "params": {"terms": [{"type": "sft"}]}}}, [],
         "objective.params.terms.0.weight: required field is missing: add it"),
        ({"data": {"path": "/nonexistent/prompts.jsonl"}}, [], "data.path: /nonexistent/prompts.jsonl does not exist"),
        ({"teachers": [{"type": "verifier"}]}, [], "give `teacher:` (one) or `teachers:`"),
        ({}, ["student.device=gpu"], "student.device: String should match pattern"),
        ({"teacher": None, "teachers": [{"type": "verifier"}, {"type": "verifier"}]}, [],
         "objective 'reward_weighted' reads 1 feedback source(s) but 2 teacher(s) are given"),
        ({"teacher": None, "teachers": [{"type": "verifier"}, {"type": "judge", "modle": "m"}]}, [],
         "teachers.1.modle: unknown field"),
        ({"teacher": None, "teachers": [{"type": "verifier"}, {"type": "verifier"}],
          "objective": {"type": "hybrid", "params": {"terms": [{"type": "reward_weighted", "weight": 1.0},
                                                               {"type": "token_distill", "weight": 0.1, "source": 1}]}}},
         [], "objective.params.terms.1: TokenDistill reads token_logprobs feedback but teachers.1 (type 'verifier')"),
    ],
)
def test_bad_configs_fail_before_the_model_loads(tmp_path, tiny_dir, capsys, no_model_load, monkeypatch,
                                                 changes, overrides, expected):
    monkeypatch.delenv("OPD_TEST_UNSET_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    path = write_config(tmp_path, tiny_dir, **changes)
    argv = ["train", str(path)] + [a for o in overrides for a in ("--set", o)]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2
    assert expected in err


def test_two_teachers_feed_a_hybrid_from_yaml(tmp_path, capsys):
    """teachers: [verifier, self_distill] with a hybrid whose token term reads source 1."""
    from tests.providers.test_self_distill import (  # a template the teacher's view check accepts
        make_model,
        make_tokenizer,
    )

    student = tmp_path / "student"
    tok = make_tokenizer()
    make_model(tok).save_pretrained(student)
    tok.save_pretrained(student)
    terms = [{"type": "reward_weighted", "weight": 1.0}, {"type": "token_distill", "weight": 0.5, "source": 1}]
    path = write_config(tmp_path, student, teacher=None, teachers=[{"type": "verifier"}, {"type": "self_distill"}],
                        objective={"type": "hybrid", "params": {"terms": terms}})
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 2 and summary["teacher_requests"] >= 2 * 2 + 2  # 2 prompts x 2 steps + the teacher
    rows = train_rows(tmp_path / "run")
    assert all(r["objective/rewardweighted/valid_samples"] == 4 for r in rows), rows
    assert all(r["objective/tokendistill/tokens"] > 0 for r in rows), rows
    assert all(r["teacher/failures"] == 0 for r in rows)


def test_literal_key_in_yaml_is_refused_and_not_printed(tmp_path, tiny_dir, capsys, no_model_load):
    path = write_config(tmp_path, tiny_dir, teacher={"type": "judge", "model": "m", "api_key": "sk-SECRET-777"})
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 2 and "API keys are never read from a config file" in err
    assert "SECRET-777" not in out + err


def test_teacher_free_spin_on_data_answers_trains(tmp_path, tiny_dir, capsys):
    path = write_config(
        tmp_path, tiny_dir, teacher=None,
        objective={"type": "spin", "params": {"source": "answer", "beta": 0.1}},
    )
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 2 and summary["teacher_requests"] is None


def test_train_then_eval_then_resume(tmp_path, tiny_dir, capsys):
    torch.manual_seed(0)
    path = write_config(tmp_path, tiny_dir, save_every=1, eval__every=2)
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    run = tmp_path / "run"
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "eval/accuracy"}  # the held-out metric before training
    assert all(r["teacher/failures"] == 0 and 0.0 <= r["reward/mean"] <= 1.0 for r in rows[1:])
    assert (run / "final" / "config.json").exists() and (run / "config.yaml").exists()
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(out[out.index("{"):])
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["steps"] == 2 and summary["heldout_graded"] == 8
    assert summary["heldout_before"] == rows[0]["eval/accuracy"]
    assert summary["heldout_after"] == summary["heldout_accuracy"] == rows[2]["eval/accuracy"]  # same model
    assert "eval/accuracy" not in rows[1]
    assert f"held-out accuracy before training {rows[0]['eval/accuracy']:.3f}" in out
    assert f"before {rows[0]['eval/accuracy']:.3f} -> after {summary['heldout_after']:.3f}" in out
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2"]

    rc, out, err = run_cli(capsys, "eval", str(path), "--model", str(run / "final"), "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["metric"] == "accuracy" and result["graded"] == 8 and 0.0 <= result["value"] <= 1.0

    rc, _, err = run_cli(capsys, "train", str(path))  # a second run must not overwrite silently
    assert rc == 2 and "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert [r["step"] for r in metric_rows(run)] == [0, 1, 2]  # nothing was touched

    rc, _, err = run_cli(capsys, "train", str(path), "--resume")  # finished: nothing to train, nothing re-evaluated
    assert rc == 2 and "is finished (step-2 of steps: 2, final/ saved)" in err and "raise steps" in err
    assert [r["step"] for r in metric_rows(run)] == [0, 1, 2]

    # the first 2 steps as a version before the namespaced metric names wrote them (reward_mean, loss, ...)
    first = metric_rows(run)
    old_name = {"reward/mean": "reward_mean", "loss/total": "loss", "teacher/failures": "feedback_failures",
                "time/step_s": "time_step_s", "optim/lr": "lr", "objective/valid_samples": "valid_samples"}
    old = [{old_name.get(k, k): v for k, v in r.items()} for r in first]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    rc, out, err = run_cli(capsys, "train", str(path), "--resume", "--set", "steps=5")
    assert rc == 0, err
    assert f"opd: resuming from step 2 ({run})" in out
    resumed = metric_rows(run)
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4, 5]
    assert resumed[:3] == first  # the old rows are rewritten with the new names
    summary = json.loads(out[out.index("{"):])
    assert summary["final_reward_mean"] == resumed[5]["reward/mean"] is not None
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-3", "step-4", "step-5"]  # keep_checkpoints: 3
    assert summary["heldout_before"] == rows[0]["eval/accuracy"]

    rc, out, err = run_cli(capsys, "train", str(path), "--overwrite")
    assert rc == 0, err
    assert [r["step"] for r in metric_rows(run)] == [0, 1, 2]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2"]


def test_train_checks_the_config_once_and_reads_the_prompts_once(tmp_path, tiny_dir, capsys, monkeypatch):
    """`opd train` used to check the config twice and read the data three times; `opd eval` twice."""
    from opd_sdk.config import data, registry

    calls = {"check_config": 0, "load_data": 0}

    def counted(name: str, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    check, load = counted("check_config", registry.check_config), counted("load_data", data.load_data)
    for module in (registry, runner):  # every name they are called by on the way
        monkeypatch.setattr(module, "check_config", check)
        monkeypatch.setattr(module, "load_data", load)
    path = write_config(tmp_path, tiny_dir, steps=1)
    rc, _, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    assert calls == {"check_config": 1, "load_data": 1}
    calls.update(check_config=0, load_data=0)
    rc, _, err = run_cli(capsys, "eval", str(path), "--model", str(tmp_path / "run" / "final"))
    assert rc == 0, err
    assert calls == {"check_config": 1, "load_data": 1}


def test_resume_with_nothing_to_resume_says_so_and_stops(tmp_path, tiny_dir, capsys, no_model_load):
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir)), "--resume")
    assert rc == 2 and "nothing to resume from" in err and "run without --resume" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_checkpoints_are_on_by_default():
    from opd_sdk.config.run import validate_config

    cfg = validate_config({"student": {"model": "x"}, "data": {"task": "addition"}, "objective": {"type": "sft"}})
    assert cfg.save_every == 25 and cfg.keep_checkpoints == 3


def test_resume_after_a_crash_repeats_no_teacher_call(tmp_path, tiny_dir, capsys, monkeypatch):
    """A run killed after step 2's teacher calls but before its checkpoint redoes step 2 from the
    cache: the same samples (RNG restored), so the judge server sees no new request."""
    monkeypatch.setenv("OPD_TEST_KEY", "sk-test-not-secret")
    with ScriptedServer(lambda body: '{"score": 7}') as srv:
        teacher = {"type": "judge", "model": "judge", "base_url": srv.base_url, "api_key_env": "OPD_TEST_KEY"}
        path = write_config(tmp_path, tiny_dir, teacher=teacher, save_every=1,
                            eval={"metric": "teacher_score", "max_new_tokens": 4})
        rc, out, err = run_cli(capsys, "train", str(path))
        assert rc == 0, err
        sent = srv.count
        assert sent > 0
        run = tmp_path / "run"
        shutil.rmtree(run / "step-2")  # the crash: step 2 was never checkpointed
        (run / "final").rename(run / "final-old")
        rc, out, err = run_cli(capsys, "train", str(path), "--resume")
        assert rc == 0, err
        summary = json.loads(out[out.index("{"):])
        # step 2 and the held-out eval come entirely from the cache
        assert srv.count == sent
        # the counters are the run's (#22.1): the killed step's calls (journalled) are in them, nothing new;
        # requests exceed HTTP calls by the empty answers, scored 0 without a call
        assert summary["teacher_http_calls"] == sent and summary["cache_hits"] > 0
        assert summary["teacher_requests"] >= sent
        # the judge gives any text 0.7, but the tiny model's greedy held-out answers are empty: 0.0, never
        # sent (no credit for an empty answer, tests/providers/test_empty_answers.py)
        assert summary["heldout_teacher_score"] == 0.0


def test_demo_refuses_an_output_folder_that_holds_an_opd_train_run(tmp_path, tiny_dir):
    from opd_sdk.app import demo

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("steps: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="holds an `opd train` run"):
        demo.run_demo(out_dir=run, steps=1, model_dir=tiny_dir, log=lambda *a: None)
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'  # untouched


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, tiny_dir, monkeypatch):
    from opd_sdk.app import demo

    monkeypatch.setitem(demo.DEMO, "max_new_tokens", 4)
    monkeypatch.setitem(demo.DEMO, "eval_max_new_tokens", 4)
    monkeypatch.setitem(demo.DEMO, "eval_every", 1)
    lines: list[str] = []
    summary = demo.run_demo(out_dir=tmp_path / "demo", steps=2, model_dir=tiny_dir, log=lines.append)
    out = tmp_path / "demo"
    assert summary["steps"] == 2 and summary["heldout_prompts"] > 0
    assert [s for s, _ in summary["heldout_curve"]] == [0, 1, 2]
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "final" / "config.json").exists()
    assert json.loads((out / "demo_summary.json").read_text())["heldout_accuracy_after"] == summary["heldout_accuracy_after"]
    assert any("held-out accuracy before" in line for line in lines)


def test_lora_student_trains_and_its_adapter_folder_evaluates(tmp_path, tiny_dir, capsys):
    pytest.importorskip("peft")
    path = write_config(tmp_path, tiny_dir, student={"model": str(tiny_dir), "lora": {"r": 4, "alpha": 8}}, steps=1)
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").exists()
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_dir.name
    for f in [*final.rglob("*"), *(tmp_path / "run").glob("step-*/**/*")]:  # no machine path anywhere
        if f.is_file() and f.suffix in (".json", ".md", ".txt", ".yaml"):
            assert str(tiny_dir) not in f.read_text(), f
    rc, out, err = run_cli(capsys, "eval", str(path), "--model", str(final), "--json")
    assert rc == 0, err
    assert json.loads(out)["graded"] == 8


def test_a_stop_for_no_signal_keeps_a_checkpoint_and_a_summary(tmp_path, tiny_dir, capsys, monkeypatch):
    from opd_sdk.errors import TrainingStopped
    from opd_sdk.train.trainer import Trainer

    real_step = Trainer.train_step

    def step_then_stop(self):
        if self.step == 1:
            raise TrainingStopped("teacher: 3 steps without usable feedback; opd train CONFIG --resume")
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_stop)
    rc, out, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir, steps=5)))
    run = tmp_path / "run"
    assert rc == 2 and "3 steps without usable feedback" in err
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and "without usable feedback" in summary["stopped"]
    assert summary["heldout_before"] is not None and summary["heldout_after"] is None


def test_resume_after_a_stop_before_the_first_step_says_run_again(tmp_path):
    """An attempt stopped before its first step trained nothing: --resume says run without it, and that
    plain run is not refused (issue 24.6); once a step is in metrics.jsonl, --overwrite is the way."""
    from opd_sdk.app.runner import prepare_output_dir
    from opd_sdk.errors import ConfigError

    (tmp_path / "config.yaml").write_text("x: 1\n")
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/accuracy": 0.5}\n')
    with pytest.raises(ConfigError, match="no complete step-N/ checkpoint; run without --resume"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "reward/mean": 0.5}\n')
    with pytest.raises(ConfigError, match="no complete step-N/ checkpoint; start the run again with --overwrite"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        prepare_output_dir(tmp_path, resume=False, overwrite=False)


def test_resume_of_a_finished_run_says_so_and_a_raised_step_count_continues(tmp_path):
    from opd_sdk.app.runner import prepare_output_dir
    from opd_sdk.errors import ConfigError
    from opd_sdk.train.checkpoint import STATE_FILE

    (tmp_path / "step-3").mkdir()
    (tmp_path / "step-3" / STATE_FILE).write_text('{"step": 3, "world_size": 1}')
    prepare_output_dir(tmp_path, resume=True, overwrite=False, steps=3)  # final/ not saved yet: resume saves it
    (tmp_path / "final").mkdir()
    with pytest.raises(ConfigError, match=r"is finished \(step-3 of steps: 3, final/ saved\), nothing is left"):
        prepare_output_dir(tmp_path, resume=True, overwrite=False, steps=3)
    prepare_output_dir(tmp_path, resume=True, overwrite=False, steps=5)


@pytest.mark.parametrize("command", ["train", "eval", "collect", "inspect", "demo"])
def test_each_subcommand_help_says_what_it_does(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    usage, _, rest = capsys.readouterr().out.partition("\n\n")
    assert usage.startswith(f"usage: opd {command}")
    assert rest.split("\n\n")[0].strip() and not rest.startswith("positional") and not rest.startswith("options")


def test_eval_metric_none_trains_without_evaluating_and_opd_eval_says_how_to_evaluate(tmp_path, tiny_dir, capsys):
    path = write_config(tmp_path, tiny_dir, eval={"metric": "none"})
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 2 and summary["heldout_after"] is None and summary["heldout_before"] is None
    assert summary["outcome"] == "finished" and Path(summary["model_dir"], "config.json").exists()
    assert "no held-out evaluation" in out and all("eval/" not in k for r in metric_rows(tmp_path / "run") for k in r)
    rc, out, err = run_cli(capsys, "eval", str(path))
    assert rc != 0 and "eval.metric=accuracy" in err
    # eval.every without a metric is refused by --check, before anything loads
    bad = write_config(tmp_path, tiny_dir, eval={"metric": "none", "every": 1})
    rc, out, err = run_cli(capsys, "train", str(bad), "--check")
    assert rc != 0 and "eval.every needs a metric" in err


def test_a_teacher_down_at_the_first_teacher_score_evaluation_stops_before_training(tmp_path, tiny_dir, capsys,
                                                                                   monkeypatch):
    import opd_sdk.train.evaluate

    real = opd_sdk.train.evaluate.greedy_accuracy

    def some_text(*args, **kwargs):  # the tiny model's greedy answers may decode empty, which no judge is asked
        result = real(*args, **kwargs)
        result.completions = [f"answer {i}" for i in range(len(result.completions))]
        return result

    monkeypatch.setattr(opd_sdk.train.evaluate, "greedy_accuracy", some_text)
    judge = {"type": "judge", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key_env": None}
    path = write_config(tmp_path, tiny_dir, teacher=judge, eval={"metric": "teacher_score", "max_new_tokens": 4},
                        objective={"type": "reward_weighted", "params": {"advantage": "rloo"}})
    rc, out, err = run_cli(capsys, "train", str(path))
    assert rc == 2 and "eval: no held-out answer could be graded" in err and "127.0.0.1:9" in err, (out, err)
    run = tmp_path / "run"
    assert not (run / "summary.json").exists() and not (run / "final").exists() and not (run / "step-1").exists()
    rc, out, err = run_cli(capsys, "train", str(path))  # the rerun is not refused for the failed attempt
    assert rc == 2 and "--overwrite" not in err, err
