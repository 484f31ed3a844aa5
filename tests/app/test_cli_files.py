"""`opd train` over damaged files: a damaged feedback cache or checkpoint is named with its fix (exit 2,
no traceback), and --resume over a damaged newest checkpoint continues from the newest intact one."""

from __future__ import annotations

import json
import logging

from opd_sdk.train.checkpoint import STATE_FILE
from tests.app.test_cli import metric_rows, run_cli, write_config


def test_a_damaged_feedback_cache_is_named_with_its_fix(tmp_path, tiny_dir, capsys):
    cache = tmp_path / "run" / "feedback_cache.sqlite"
    cache.parent.mkdir()
    cache.write_bytes(b"not a database " * 100)
    rc, _, err = run_cli(capsys, "train", str(write_config(tmp_path, tiny_dir)))
    assert rc == 2
    assert f"opd: the feedback cache {cache} is damaged (file is not a database)" in err
    assert f"mv {cache} {cache}.damaged" in err and "nothing else is lost" in err


def test_resume_over_a_damaged_newest_checkpoint_continues_from_the_newest_intact(tmp_path, tiny_dir, capsys,
                                                                                   caplog):
    config = str(write_config(tmp_path, tiny_dir, save_every=1))
    rc, _, err = run_cli(capsys, "train", config)
    assert rc == 0, err
    run = tmp_path / "run"
    optimizer = run / "step-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # cut short
    with caplog.at_level(logging.WARNING, logger="opd_sdk.train.checkpoint"):
        rc, out, err = run_cli(capsys, "train", config, "--resume", "--set", "steps=3")
    assert rc == 0, err
    assert f"checkpoint step-2 is damaged ({optimizer} is 100 bytes, " in caplog.text
    assert "moved aside to step-2.damaged; resuming from step-1" in caplog.text
    assert "opd: resuming from step 1" in out
    assert [r["step"] for r in metric_rows(run)] == [0, 1, 2, 3]  # step 2 trained again, logged once
    assert json.loads(out[out.index("{"):])["steps"] == 3


def test_resume_when_every_checkpoint_is_damaged_names_them(tmp_path, tiny_dir, capsys):
    config = str(write_config(tmp_path, tiny_dir, save_every=1))
    rc, _, err = run_cli(capsys, "train", config)
    assert rc == 0, err
    run = tmp_path / "run"
    for step in (1, 2):
        (run / f"step-{step}" / STATE_FILE).write_text("{not json")
    rc, _, err = run_cli(capsys, "train", config, "--resume", "--set", "steps=3")
    assert rc == 2
    assert "nothing to resume from" in err and f"(damaged: step-2: {run / 'step-2' / STATE_FILE} does not parse" in err
    assert "step-1: " in err and "--overwrite" in err
