"""Prompt loading (JSONL, lists, datasets) and the resumable prompt sampler."""

from __future__ import annotations

import json

import pytest

from opd_sdk.data import PromptItem, PromptSampler, load_prompts
from opd_sdk.errors import ConfigError


def test_jsonl_with_privileged_answer_and_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [
        {"question": "2+2?", "solution": "2+2=4", "gold": 4, "task": "add"},
        {"question": [{"role": "system", "content": "Be short."}, {"role": "user", "content": "3+3?"}], "gold": "6"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = load_prompts(path, prompt_field="question", privileged_field="solution", answer_field="gold")
    assert items[0] == PromptItem(prompt="2+2?", privileged="2+2=4", answer="4", metadata={"task": "add"})
    assert items[1].answer == "6" and items[1].privileged is None
    assert [m.role for m in items[1].messages()] == ["system", "user"]
    assert items[0].messages()[0].role == "user"


def test_missing_prompt_field_names_file_line_and_fix(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no prompt here"}\n')
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert f"{path}:2" in msg and "'prompt'" in msg and "data.prompt_field" in msg and "prompt_field=" in msg and "text" in msg


def test_bad_json_and_bad_messages(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        load_prompts(path)
    with pytest.raises(ConfigError, match=r"prompts\[0\]: bad prompt"):
        load_prompts([{"prompt": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(ConfigError, match="does not exist"):
        load_prompts(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="must be a string"):
        load_prompts([{"prompt": "x", "answer": ["4"]}])


def test_python_lists_and_metadata_fields():
    items = load_prompts(["a", {"prompt": "b", "answer": "1", "x": 1, "y": 2}], metadata_fields=["x"])
    assert items[0] == PromptItem(prompt="a")
    assert items[1].metadata == {"x": 1}
    with pytest.raises(ConfigError, match="empty"):
        load_prompts(["ok", "  "])
    with pytest.raises(ConfigError, match="no prompts"):
        load_prompts([])


def test_datasets_split():
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"q": ["1+1?", "2+1?"], "a": ["2", "3"]})}
    )
    items = load_prompts(dd, split="train", prompt_field="q", answer_field="a")
    assert [(i.prompt, i.answer) for i in items] == [("1+1?", "2"), ("2+1?", "3")]
    with pytest.raises(ConfigError, match="split"):
        load_prompts(dd, prompt_field="q")
    with pytest.raises(ConfigError, match="not found"):
        load_prompts(dd, split="test", prompt_field="q")


def test_sampler_epochs_and_exact_resume():
    items = [PromptItem(prompt=str(i)) for i in range(5)]
    a = PromptSampler(items, 2, seed=3)
    seen = [[p.prompt for p in a.next_batch()] for _ in range(5)]  # 10 prompts = 2 epochs
    flat = [x for b in seen for x in b]
    assert sorted(flat[:5]) == sorted(flat[5:]) == ["0", "1", "2", "3", "4"]
    b = PromptSampler(items, 2, seed=3)
    b.next_batch(), b.next_batch()
    state = b.state_dict()
    c = PromptSampler(items, 2, seed=3)
    c.load_state_dict(state)
    assert [[p.prompt for p in c.next_batch()] for _ in range(3)] == seen[2:]
    with pytest.raises(ConfigError, match="same prompt set"):
        PromptSampler(items[:3], 2).load_state_dict(state)
    unshuffled = PromptSampler(items, 3, shuffle=False)
    assert [p.prompt for p in unshuffled.next_batch()] == ["0", "1", "2"]
    assert [p.prompt for p in unshuffled.next_batch()] == ["3", "4", "0"]


@pytest.mark.parametrize("answer", ["", "   ", "\n\t"])
def test_empty_reference_answer_is_refused_with_file_and_line(tmp_path, answer):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n"
                    + json.dumps({"prompt": "3+3?", "answer": answer}) + "\n")
    with pytest.raises(ConfigError, match=r"qa.jsonl:2: the reference answer 'answer' is .*empty"):
        load_prompts(path)
    with pytest.raises(ConfigError, match=r"prompts\[0\]: .*reference answer"):
        load_prompts([{"prompt": "q", "answer": answer}])
    with pytest.raises(ValueError, match="reference answer is empty"):
        PromptItem(prompt="q", answer=answer)
    assert load_prompts([{"prompt": "q", "answer": None}])[0].answer is None  # no answer at all is fine


def test_verifier_never_credits_an_empty_completion():
    """Before: an empty reference gave an empty completion 1.0 from the exact verifier."""
    from opd_sdk.types import Completion, FeedbackRequest
    from providers import VerifierTeacher

    for mode, kw in [("exact", {}), ("numeric", {}), ("regex", {"pattern": ".*"}),
                     ("callable", {"check": lambda text, want: True})]:
        teacher = VerifierTeacher(mode, **kw)
        request = FeedbackRequest(prompt="q", completions=[Completion(text=""), Completion(text="  \n")],
                                  metadata={"answer": "4"})
        assert teacher.score(request).scores == [0.0, 0.0], mode


def test_every_bad_row_of_a_file_is_reported_in_one_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = ['{"prompt": "ok"}', '{"prompt": "no quote}', '{"text": "no prompt"}', '{"prompt": "p", "answer": " "}']
    path.write_text("\n".join(rows + ['{"text": "x"}'] * 12) + "\n")
    with pytest.raises(ConfigError) as err:
        load_prompts(path)
    msg = str(err.value)
    assert msg.startswith("15 bad prompt rows:")
    assert f"{path}:2: not valid JSON" in msg and f"{path}:3: missing prompt field" in msg and f"{path}:4:" in msg
    assert f"{path}:11:" in msg and f"{path}:12:" not in msg and "and 5 more" in msg


@pytest.mark.parametrize("prompt", ["", "   ", []])
def test_an_empty_prompt_is_called_empty_not_missing(tmp_path, prompt):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "answer": "1"}) + "\n")
    with pytest.raises(ConfigError, match=r"empty.jsonl:1: the prompt \('prompt'\) is empty"):
        load_prompts(path)
