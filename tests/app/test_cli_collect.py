"""`opd collect CONFIG [--batch]`: a run's teacher asked about its prompts into the feedback cache
(no student is loaded), online and through the Batch API (the scripted server's batch routes)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from opd_sdk.app import cli, runner
from tests.providers.helpers import fenced_texts
from tests.scripted_batches import BatchRoutes
from tests.scripted_server import ScriptedServer
from tests.train.test_clean_lifecycles import ROOT, run_strict


def grade_product(body: dict) -> dict:
    """10 when the graded answer is A x B of the task, else 0; 100 prompt and 10 completion tokens."""
    a, b = map(int, re.findall(r"What is (\d+) times (\d+)", body["messages"][-1]["content"])[0])
    score = 10 if fenced_texts(body)[0].strip() == str(a * b) else 0
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": json.dumps({"score": score})}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}}


def write_config(tmp_path: Path, base_url: str, out: str, **changes) -> Path:
    raw = {
        "student": {"model": "never-loaded"},
        "data": {"task": "times_table", "task_params": {"n_train": 4}},
        "teacher": {"type": "judge", "model": "judge-m", "base_url": base_url, "structured": "none"},
        "objective": {"type": "reward_weighted"},
        "collector": {"price_per_1k_prompt_tokens": 1.0, "price_per_1k_completion_tokens": 2.0,
                      "batch_poll_s": [0.02, 0.05]},
        "logging": {"progress": False},
        "output_dir": str(tmp_path / out),
    } | changes
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    monkeypatch.setattr(runner, "load_student", lambda *a, **k: pytest.fail("opd collect loaded the student"))


def summary_of(capsys) -> dict:
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_collect_batch_labels_the_dataset_in_one_batch_at_half_the_online_price(tmp_path, capsys, no_model_load):
    with ScriptedServer(grade_product) as srv:
        routes = BatchRoutes(srv)
        assert cli.main(["collect", str(write_config(tmp_path, srv.base_url, "online"))]) == 0
        online = summary_of(capsys)
        assert srv.count_path("/v1/chat/completions") == 4 and routes.created == 0
        assert cli.main(["collect", str(write_config(tmp_path, srv.base_url, "batch")), "--batch"]) == 0
        batch = summary_of(capsys)
        assert routes.created == 1 and routes.lines_sent == 4 and srv.count_path("/v1/chat/completions") == 4
    # 4 calls x (100 x $1 + 10 x $2) / 1000 = $0.48 online; the batch price is half
    assert online["teachers"][0]["cost_usd"] == pytest.approx(0.48)
    assert batch["teachers"][0]["cost_usd"] == pytest.approx(0.24)
    assert batch["mode"] == "batch" and batch["teachers"][0]["answered"] == 4 and batch["prompts"] == 4
    rows = [json.loads(x) for x in (tmp_path / "batch" / "collected.jsonl").read_text().splitlines()]
    assert [r["feedback"]["scores"] for r in rows] == [[1.0]] * 4  # every dataset answer is right
    assert rows[0]["prompt"] == "What is 5 times 3? Answer with just the number." and rows[0]["answer"] == "15"
    assert Path(batch["cache"]).exists()


def test_collect_refuses_a_grading_teacher_on_prompts_without_answers(tmp_path, capsys, no_model_load):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is 2 times {i}?"}) + "\n" for i in range(3)))
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", "run", data={"path": str(data), "eval_size": 1})
    assert cli.main(["collect", str(config), "--split", "all"]) == 2
    assert "no reference answer" in capsys.readouterr().err


def test_collect_batch_refuses_a_teacher_that_runs_in_process(tmp_path, capsys, no_model_load):
    config = write_config(tmp_path, "http://127.0.0.1:9/v1", "run", teacher={"type": "verifier"})
    assert cli.main(["collect", str(config), "--batch"]) == 2
    assert "runs in this process" in capsys.readouterr().err


def test_the_readme_batch_round_trip_runs_clean_and_says_what_the_readme_shows(tmp_path):
    out = run_strict([str(ROOT / "benchmarks" / "batch_roundtrip.py"), "--out", str(tmp_path / "demo")], tmp_path)
    assert out.count("batches created so far: 2, lines sent: 10, synchronous calls: 0") == 2
    assert "batch batch_0: completed (6 of 8 answered, 2 failed)" in out
    assert '"cache_hits": 8' in out and '"cost_usd": 1.6e-05' in out
