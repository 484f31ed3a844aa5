"""A run never lies about how it ended (issue 24, items 1, 6, 9, 10): exit status, final/ and
summary.json say whether it learned; an attempt refused before its first step blocks no rerun;
a resume with a changed config lists the changes and refuses those that break exactness."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from tests.app.test_cli import metric_rows, run_cli, write_config
from tests.providers.test_logprob import EchoTeacher
from tests.scripted_server import Fault, ScriptedServer


def free_port() -> int:
    """A port nothing listens on (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAULTS = {
    "500": Fault.status(500),
    "401": Fault.status(401),
    "garbage": Fault.malformed(),
    "hang": Fault.hang(5.0),
}


@pytest.mark.parametrize("fault", ["down", *FAULTS])
def test_a_run_whose_every_teacher_call_failed_exits_non_zero_without_final(tmp_path, tiny_dir, capsys,
                                                                           monkeypatch, fault):
    """steps: 2 < max_no_signal_steps 3, every judge call fails: exit status 2, a message saying the run
    did not learn, no final/, summary.json with outcome did_not_learn (the held-out accuracy is graded
    by a verifier on the answers, so evaluation before training works without the teacher)."""
    monkeypatch.setenv("OPD_TRUTH_KEY", "sk-test-not-secret")
    with ScriptedServer(lambda body: '{"score": 7}', faults=lambda i, body: FAULTS.get(fault)) as srv:
        url = f"http://127.0.0.1:{free_port()}/v1" if fault == "down" else srv.base_url
        teacher = {"type": "judge", "model": "judge", "base_url": url, "api_key_env": "OPD_TRUTH_KEY"}
        path = write_config(tmp_path, tiny_dir, teacher=teacher, collector={"max_retries": 0, "timeout": 0.5})
        rc, out, err = run_cli(capsys, "train", str(path))
    run = tmp_path / "run"
    assert rc == 2, (out, err)
    assert not (run / "final").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["outcome"] in ("did_not_learn", "stopped") and summary["stopped"]
    assert summary["model_dir"] is None and summary["heldout_after"] is None
    if fault in ("401", "down"):  # an auth failure or refused connection may stop the run at once (issue 24.2)
        return
    assert "the run did not learn: 2 of 2 steps had no usable teacher feedback" in err, err
    assert "--overwrite" in err
    assert (run / "step-2" / "trainer_state.json").exists()  # the checkpoint is kept
    assert summary["outcome"] == "did_not_learn" and summary["failed_steps"] == 2 and summary["steps"] == 2
    assert "did not learn" in summary["stopped"]
    assert all(r["optim/skipped"] == 1 for r in metric_rows(run) if r["step"] > 0)


def test_a_one_step_run_with_a_logprob_teacher_of_another_tokenizer_did_not_learn(tmp_path, tiny_dir, capsys):
    """The teacher splits text in 2-character tokens, the student in characters: every call is a
    TokenizationMismatch, so the one step trains nothing and the run says so."""
    with ScriptedServer(EchoTeacher(chunk=2)) as srv:
        teacher = {"type": "logprob", "model": "m", "base_url": srv.base_url}
        path = write_config(tmp_path, tiny_dir, teacher=teacher, objective={"type": "token_distill"}, steps=1,
                            collector={"max_retries": 0})
        rc, _, err = run_cli(capsys, "train", str(path))
    assert rc == 2 and "the run did not learn: 1 of 1 steps" in err and "tokenization_mismatch" in err, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["outcome"] == "did_not_learn" and not (tmp_path / "run" / "final").exists()


def test_half_the_steps_failing_is_under_the_threshold_and_the_share_is_configurable(tmp_path, tiny_dir, capsys,
                                                                                     monkeypatch):
    """Step 1's calls fail, step 2's answer (4 calls a step: 2 prompts x 2 samples): 1 of 2 failed steps
    is not more than max_failed_step_share 0.5, so the run finishes; with 0.4 it did not learn."""
    monkeypatch.setenv("OPD_TRUTH_KEY", "sk-test-not-secret")
    for share, rc_expected, outcome in [(0.5, 0, "finished"), (0.4, 2, "did_not_learn")]:
        with ScriptedServer(lambda body: '{"score": 7}',
                            faults=lambda i, body: Fault.status(500) if i < 4 else None) as srv:
            teacher = {"type": "judge", "model": "judge", "base_url": srv.base_url, "api_key_env": "OPD_TRUTH_KEY"}
            path = write_config(tmp_path, tiny_dir, teacher=teacher, max_failed_step_share=share,
                                collector={"max_retries": 0, "no_cache": True},
                                objective={"type": "reward_weighted", "params": {"advantage": "reinforce"}})
            rc, _, err = run_cli(capsys, "train", str(path), "--overwrite")
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert rc == rc_expected, err
        assert summary["outcome"] == outcome and summary["failed_steps"] == 1
        assert (tmp_path / "run" / "final").exists() == (outcome == "finished")


def test_an_attempt_refused_before_its_first_step_does_not_block_the_rerun(tmp_path, tiny_dir, capsys,
                                                                           monkeypatch):
    """Loading fails after output_dir was prepared (config.yaml written): the corrected rerun, the same
    command, is not refused for want of --overwrite."""
    from opd_sdk.app import runner
    from opd_sdk.errors import ConfigError

    real = runner.load_student

    def broken(*a, **k):
        raise ConfigError("student.model: the weights could not be read")

    monkeypatch.setattr(runner, "load_student", broken)
    path = write_config(tmp_path, tiny_dir, steps=1)
    rc, _, err = run_cli(capsys, "train", str(path))
    assert rc == 2 and "could not be read" in err
    monkeypatch.setattr(runner, "load_student", real)
    rc, _, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["outcome"] == "finished"


def test_resume_with_a_changed_config_lists_the_changes_and_refuses_breaking_ones(tmp_path, tiny_dir, capsys):
    path = write_config(tmp_path, tiny_dir, steps=1, save_every=1)
    rc, _, err = run_cli(capsys, "train", str(path))
    assert rc == 0, err
    saved = (tmp_path / "run" / "config.yaml").read_text()
    rc, _, err = run_cli(capsys, "train", str(path), "--resume", "--set", "steps=2", "--set", "rollout.group_size=4",
                         "--set", "optimizer.lr=0.01")
    assert rc == 2, err
    assert "rollout.group_size: 2 -> 4" in err and "optimizer.lr: 0.001 -> 0.01" in err
    assert "steps:" not in err.split("exactly:")[1].split("pass --allow")[0]  # steps is no breaking change
    assert "--allow-config-change" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == saved  # untouched
    assert [r["step"] for r in metric_rows(tmp_path / "run")] == [0, 1]

    rc, out, err = run_cli(capsys, "train", str(path), "--resume", "--set", "steps=2")  # a safe change: shown
    assert rc == 0, err
    assert "opd: resuming with config changes" in out and "steps: 1 -> 2" in out
    rc, out, err = run_cli(capsys, "train", str(path), "--resume", "--set", "steps=3", "--set", "optimizer.lr=0.01",
                           "--allow-config-change")
    assert rc == 0, err
    assert "optimizer.lr: 0.001 -> 0.01" in out and "steps: 2 -> 3" in out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optimizer"]["lr"] == 0.01


def test_python_resume_of_a_finished_run_says_so(tmp_path):
    """Trainer.train(resume_from="latest") on a run whose final/ is saved raises, as `opd train --resume`
    does, instead of returning [] silently; with more steps it trains them."""
    from opd_sdk.errors import ConfigError
    from tests.train.test_trainer import Constant, _tiny_trainer

    _tiny_trainer(Constant(), max_steps=1, output_dir=tmp_path).train()
    assert (tmp_path / "final").exists()
    with pytest.raises(ConfigError, match=r"is finished \(final/ saved\): step 1 of steps 1, nothing is left"):
        _tiny_trainer(Constant(), max_steps=1, output_dir=tmp_path).train(resume_from="latest")
    history = _tiny_trainer(Constant(), max_steps=2, output_dir=tmp_path).train(resume_from="latest")
    assert [r["step"] for r in history] == [2]


def test_python_trainer_whose_every_call_failed_raises_training_failed_without_final(tmp_path):
    """The Python API: 2 steps < max_no_signal_steps 3, the teacher always down: TrainingFailed after
    the checkpoint, and no final/."""
    from opd_sdk.errors import TrainingFailed
    from tests.train.test_trainer import AlwaysDown, _tiny_trainer

    trainer = _tiny_trainer(AlwaysDown(), max_steps=2, max_no_signal_steps=3, output_dir=tmp_path)
    with pytest.raises(TrainingFailed, match=r"did not learn: 2 of 2 steps .*always-down.*teacher_error x4"):
        trainer.train()
    assert trainer.failed_steps == 2 and (tmp_path / "step-2").is_dir() and not (tmp_path / "final").exists()
