"""benchmarks/blackbox.py (issue #19's table) and benchmarks/make_teacher.py, in their tiny tier: every row
trains a tiny random student against a tiny random teacher reached over HTTP (the scripted server answering
from a real model), so no row rots."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
pytestmark = pytest.mark.usefixtures("one_thread")
TEACHER_ROWS = {"sft", "reverse_kl", "gkd_jsd", "spin", "sft_then_reverse_kl", "gad"}


def load(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def blackbox():
    return load("blackbox")


def test_every_row_runs_tiny_and_a_rerun_resumes_from_the_cells(tmp_path, blackbox):
    out = tmp_path / "bb"
    first = blackbox.main(["--tiny", "--out", str(out), "--seeds", "0", "--save-models", "sft"], log=lambda *a: None)
    cells = {c["row"]: c for c in first["cells"]}
    assert set(cells) == {"base", *blackbox.ROWS}
    for name, c in cells.items():
        tokens = c["prompt_tokens"] + c["completion_tokens"]
        assert (tokens > 0 and c["api_calls"] > 0) if name in TEACHER_ROWS else tokens == 0, name
        assert 0.0 <= c["greedy"] <= 1.0 and 0.0 <= c["forget"] <= 1.0 and c["cpu_s"] > 0
        assert 0.0 <= c["steps_right"] <= 1.0, name
        assert c["failures"] == 0, name
        if name != "base":
            assert len(c["trace"]["loss/total"]) == 2, name  # both steps trained (SFT then RKL: one each)
    assert len(cells["gad"]["trace"]["gad/accuracy"]) == 2  # the discriminator learnt and reported every step
    assert first["server_requests"] > 0
    assert (out / "models" / "sft" / "config.json").exists() and not (out / "models" / "reverse_kl").exists()
    assert all(f"| {name} |" in first["table"] for name in cells)
    saved = sorted(p.relative_to(out / "cells").as_posix() for p in (out / "cells").rglob("*.json"))
    assert "table/reverse_kl/seed0-lr2e-05.json" in saved and len(saved) == len(cells)
    again = blackbox.main(["--tiny", "--out", str(out), "--seeds", "0", "--save-models", "sft"], log=lambda *a: None)
    assert again["server_requests"] == 0  # every cell read back, no teacher asked
    assert again["table"] == first["table"]
    # a cell made with other settings is refused, not mixed in
    with pytest.raises(SystemExit, match="other settings"):
        blackbox.main(["--tiny", "--out", str(out), "--seeds", "0", "--steps", "3"], log=lambda *a: None)


def test_gad_row_pays_the_teacher_text_once_per_prompt_and_counts_the_reference_calls(tmp_path, blackbox):
    # 2 training prompts, 2 steps of 2 prompts: each prompt drawn twice, its teacher text asked once. The
    # reference teacher's calls go through its own collector, not the row's (a LocalRunner's usage is 0):
    # the cell must still count them, exactly as the server saw them (nothing else in this run asks it).
    result = blackbox.main(["--tiny", "--out", str(tmp_path / "gad"), "--rows", "gad", "--seeds", "0",
                            "--n-train", "2"], log=lambda *a: None)
    gad = next(c for c in result["cells"] if c["row"] == "gad")
    assert gad["api_calls"] == result["server_requests"] == 2
    assert gad["completion_tokens"] > 0 and gad["failures"] == 0
    assert "| gad |" in result["table"]


def test_sweep_picks_each_rows_best_validation_lr_and_the_table_uses_it(tmp_path, blackbox):
    out = tmp_path / "sw"
    args = ["--tiny", "--out", str(out), "--rows", "verifier_rloo", "--seeds", "0"]
    swept = blackbox.main(args + ["--mode", "sweep", "--lrs", "1e-3", "1e-2"], log=lambda *a: None)
    by_lr = {c["lr"]: c["greedy"] for c in swept["cells"]}
    assert set(by_lr) == {1e-3, 1e-2} and all(c["mode"] == "sweep" and c["steps"] == 1 for c in swept["cells"])
    best = max(by_lr, key=lambda lr: (by_lr[lr], -lr))
    assert swept["best_lrs"] == {"verifier_rloo": best}
    # a sweep cell does not depend on the table's --steps: a rerun with another reads it back
    again = blackbox.main(args + ["--mode", "sweep", "--lrs", "1e-3", "1e-2", "--steps", "3"], log=lambda *a: None)
    assert again["cells"] == swept["cells"]
    table = blackbox.main(args, log=lambda *a: None)
    assert [c["lr"] for c in table["cells"] if c["row"] == "verifier_rloo"] == [best]
    assert "(not swept)" not in table["table"]


def test_table_is_mean_and_spread_over_seeds_from_the_cells(blackbox):
    def cell(row, seed, greedy, prompt=0, completion=0):
        return {"row": row, "seed": seed, "lr": None if row == "base" else 1e-5, "greedy": greedy, "sampled": greedy / 2,
                "steps_right": greedy, "forget": 0.5, "api_calls": 10, "prompt_tokens": prompt, "completion_tokens": completion, "cpu_s": 4.0}

    cells = [cell("base", 0, 0.1), cell("base", 1, 0.2),
             cell("reverse_kl", 0, 0.3, 100_000, 100_000), cell("reverse_kl", 1, 0.6, 100_000, 100_000)]
    table, rows = blackbox.build_table(cells, price_prompt=0.1, price_completion=0.4, swept={})
    rkl = next(r for r in rows if r["row"] == "reverse_kl")
    # gains over the same seed's base: 20 and 40 points; 0.2 M teacher tokens each -> 100 and 200 points / M
    assert rkl["gain_points"] == pytest.approx((30.0, 14.142135), rel=1e-5)
    assert rkl["points_per_m_tokens"] == pytest.approx((150.0, 70.710678), rel=1e-5)
    assert rkl["cost_usd"] == pytest.approx(0.05)  # 0.1 M x $0.1 + 0.1 M x $0.4
    assert "| reverse_kl | 1e-05 (not swept) | 2 | 45.0 ± 21.2 | 22.5 ± 10.6 | 45.0 ± 21.2 | 50.0 ± 0.0 |" in table


def test_make_teacher_saves_and_fails_below_the_gap(tmp_path):
    student = tmp_path / "student"
    tok = tiny_tokenizer()
    tiny_model(tok).save_pretrained(student)
    tok.save_pretrained(student)
    make_teacher = load("make_teacher")
    common = ["--model", str(student), "--steps", "2", "--batch-size", "2", "--n-train", "8", "--eval-size", "3",
              "--max-new-tokens", "4", "--warmup", "1"]
    # a random model trained 2 steps does not beat itself by 30 points: exit 1, saved with meets_gap false
    assert make_teacher.main(common + ["--out", str(tmp_path / "t1")]) == 1
    report = json.loads((tmp_path / "t1" / "teacher.json").read_text())
    assert report["meets_gap"] is False and report["gap_points"] < 30 and report["steps"] == 2
    assert (tmp_path / "t1" / "config.json").exists() and (tmp_path / "t1" / "tokenizer_config.json").exists()
    assert make_teacher.main(common + ["--out", str(tmp_path / "t2"), "--min-gap", "-100"]) == 0


def test_sft_batch_masks_the_prompt_and_padding():
    make_teacher = load("make_teacher")
    from opd_sdk.data import PromptItem

    tok = tiny_tokenizer()
    items = [PromptItem(prompt="1+1?", privileged="2", answer="2"), PromptItem(prompt="10+1?", privileged="11", answer="11")]
    batch = make_teacher.sft_batch(tok, items)
    kept = [[t for t in row if t != -100] for row in batch["labels"].tolist()]
    assert [tok.decode(k) for k in kept] == ["2<|im_end|>", "11<|im_end|>"]
    # prompts of 23 and 24 tokens (the chat template's), answers "2" and "11" plus EOS: rows of 25 and 27
    assert batch["attention_mask"].sum(-1).tolist() == [25, 27] and batch["input_ids"].shape == (2, 27)
    assert batch["labels"][0, 25:].tolist() == [-100, -100]  # padding is never learnt


def test_steps_right_is_the_share_of_lines_right_before_the_first_slip(blackbox):
    from opd_sdk.data import PromptItem

    item = PromptItem(prompt="p", answer="19", metadata={"solution": "20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 19"})
    texts = ["20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 19",  # all 4 lines
             "20 - 4 = 16\n16 + 24 = 41\n41 - 21 = 20\nAnswer: 20",  # 1 of 4 before the slip
             "20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 18",  # 3 of 4 (the answer line counts)
             "1. 20 - 4 = 16"]                                         # 0
    assert [blackbox.steps_right([t], [item]) for t in texts] == [1.0, 0.25, 0.75, 0.0]
    assert blackbox.steps_right(texts, [item] * 4) == 0.5
