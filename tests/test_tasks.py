"""Built-in synthetic tasks: answers, splits, checker."""

from __future__ import annotations

import re

import pytest

from opd_sdk.errors import ConfigError
from opd_sdk.tasks import (
    TASK_NAMES,
    accuracy,
    check,
    extract_last_number,
    first_wrong_step,
    get_task,
)


def operands(prompt: str) -> tuple[int, int]:
    a, b = re.findall(r"\d+", prompt)[:2]
    return int(a), int(b)


@pytest.mark.parametrize("name, op", [("times_table", lambda a, b: a * b), ("addition", lambda a, b: a + b)])
def test_enumerated_tasks_answers_and_disjoint_splits(name, op):
    task = get_task(name)
    train, held = task.items("train"), task.items("heldout")
    size = 64 if name == "times_table" else 100
    assert len(train) + len(held) == size
    assert 0.2 * size < len(held) < 0.45 * size
    for it in train + held:
        a, b = operands(it.prompt)
        assert it.answer == str(op(a, b)) == it.privileged == it.metadata["solution"]
        assert it.prompt.endswith("Answer with just the number.")
    unordered = lambda items: {frozenset(operands(it.prompt)) for it in items}
    assert not unordered(train) & unordered(held)  # 3x7 held out => 7x3 held out too


def test_times_table_pinned_example():
    items = get_task("times_table").items("train") + get_task("times_table").items("heldout")
    seven_eight = [it for it in items if it.prompt == "What is 7 times 8? Answer with just the number."]
    assert len(seven_eight) == 1 and seven_eight[0].answer == "56"


def test_seed_changes_order_not_partition():
    task = get_task("times_table")
    a, b = task.items("train", seed=0), task.items("train", seed=1)
    assert [it.prompt for it in a] != [it.prompt for it in b]
    assert {it.prompt for it in a} == {it.prompt for it in b}
    assert [it.prompt for it in task.items("train", seed=0)] == [it.prompt for it in a]
    many = task.items("heldout", n=50, seed=3)  # more than the split holds: repeats
    assert len(many) == 50 and {it.prompt for it in many} == {it.prompt for it in task.items("heldout")}


def test_word_problems_solutions_and_splits():
    task = get_task("word_problems")
    train, held = task.items("train", 200, seed=0), task.items("heldout", 100, seed=0)
    for it in train + held:
        a, b = operands(it.prompt)
        expected = a + b if "more" in it.prompt else a - b
        assert it.answer == str(expected)
        assert it.privileged.endswith(f"Answer: {expected}")
        assert check(it.privileged, it.answer)
        sign = "+" if "more" in it.prompt else "-"
        assert it.privileged.splitlines()[0] == f"{a} {sign} {b} = {expected}"
    key = lambda it: (("+", *sorted(operands(it.prompt))) if "more" in it.prompt else ("-", *operands(it.prompt)))
    assert not {key(i) for i in train} & {key(i) for i in held}
    with pytest.raises(ConfigError, match="pass n"):
        task.items("train")


def test_checker_reads_the_last_number():
    assert extract_last_number("7 times 8 is 56.") == "56"
    assert extract_last_number("Answer: -3") == "-3"
    assert extract_last_number("no digits") is None
    assert check("The answer is 56", "56") and not check("56 or 57", "56") and not check("", "56")
    assert check(" 056", "56")
    items = get_task("addition").items("heldout")[:2]
    assert accuracy([items[0].answer, "nope"], items) == 0.5
    with pytest.raises(ValueError, match="one text per item"):
        accuracy(["1"], items)


def test_bad_names():
    assert set(TASK_NAMES) == {"times_table", "addition", "word_problems", "running_total"}
    with pytest.raises(ConfigError, match="choose one of"):
        get_task("chess")
    with pytest.raises(ConfigError, match="split"):
        get_task("addition").items("test")


def test_running_total_chains_from_the_last_total_and_splits_are_disjoint():
    task = get_task("running_total")
    splits = {name: task.items(name, 300, seed=0) for name in ("train", "validation", "heldout")}
    for it in [i for items in splits.values() for i in items]:
        numbers = [int(x) for x in re.findall(r"\d+", it.prompt)]
        start, ops = numbers[0], re.findall(r"(add|subtract) (\d+)", it.prompt.lower())
        assert len(ops) == 3 and 10 <= start <= 59
        lines, total = it.privileged.splitlines(), start
        for line, (word, b) in zip(lines, ops, strict=False):
            new = total + int(b) if word == "add" else total - int(b)
            assert line == f"{total} {'+' if word == 'add' else '-'} {b} = {new}" and 0 <= new <= 99
            total = new
        assert lines[-1] == f"Answer: {total}" and it.answer == str(total) and check(it.privileged, it.answer)
    prompts = {name: {i.prompt for i in items} for name, items in splits.items()}
    assert not prompts["train"] & prompts["heldout"]
    assert not prompts["train"] & prompts["validation"] and not prompts["validation"] & prompts["heldout"]
    # the partition is the problem's, not the seed's: another seed's held-out never meets this train split
    assert not {i.prompt for i in task.items("heldout", 300, seed=7)} & prompts["train"]


def test_running_total_pinned_example_and_steps():
    first = get_task("running_total").items("train", 1, seed=0)[0]
    assert first.prompt == ("Start at 20. Subtract 4, then add 24, then subtract 21. Write one line per step "
                            "with the running total, then end with 'Answer: N'.")
    assert first.privileged == "20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 19" and first.answer == "19"
    five = get_task("running_total").items("heldout", 2, steps=5)
    assert all(len(it.privileged.splitlines()) == 6 for it in five)
    with pytest.raises(ConfigError, match="no validation split"):
        get_task("times_table").items("validation")
    with pytest.raises(ConfigError, match="takes no `steps`"):
        get_task("word_problems").items("train", 2, steps=3)
    with pytest.raises(ConfigError, match="1..12"):
        get_task("running_total").items("train", 2, steps=0)


def test_first_wrong_step_counts_lines_against_the_solution():
    solution = "20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 19"
    assert first_wrong_step(solution, solution) is None
    assert first_wrong_step("20 - 4  = 16\n\n16 + 24 = 40\n40 - 21 = 19\nAnswer: 19", solution) is None
    assert first_wrong_step("20 - 4 = 15\n15 + 24 = 39\n39 - 21 = 18\nAnswer: 18", solution) == 0
    assert first_wrong_step("20 - 4 = 16\n16 + 24 = 40\n40 - 21 = 18\nAnswer: 18", solution) == 2
    assert first_wrong_step("20 - 4 = 16\n16 + 24 = 40", solution) == 2  # stopped early
    assert first_wrong_step("", solution) == 0
