"""Built-in synthetic tasks with known answers and reference solutions.

Each task makes `PromptItem`s: `prompt` (what the student sees),
`privileged` (a reference solution that a teacher may see and the student
may not), `answer` (the exact answer as a string) and `metadata` (task name,
split, and the reference solution again under "solution"). `check(text,
answer)` extracts the last number in a completion and compares it exactly.

Splits are disjoint and fixed: a problem belongs to `train` or `heldout` by a
stable hash of its operands (for the times table and addition, of the
unordered pair, so 3x7 and 7x3 land in the same split and a held-out fact is
never seen in training). `seed` only changes which problems are drawn and in
what order, never the partition.

Tasks:
- `times_table`: "What is A times B? Answer with just the number." A, B in 2..9.
- `addition`: "What is A plus B? Answer with just the number." A, B in 0..9.
- `word_problems`: two-digit addition and subtraction stories whose reference
  solution is one worked line and then "Answer: N".
- `running_total`: a chain of `steps` additions and subtractions (task_params
  `steps`, default 3) on numbers of one or two digits, every running total in
  0..99. The reference writes one line a step ("17 + 5 = 22", then "22 - 8 =
  14": each line starts from the last total) and then "Answer: N", so one early
  slip spoils every later line and the answer (a task where exposure bias can
  show). Besides train and heldout it has a `validation` split (for choosing
  learning rates), disjoint from both: a problem (start and operations) is
  held out with probability 1/3, validation 1/6, train 1/2.

`first_wrong_step(text, solution)` compares a completion with a reference
solution line by line: where an answer first goes wrong.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Callable, Literal

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError

Split = Literal["train", "validation", "heldout"]
HELDOUT_EVERY = 3  # about one problem in three is held out

_NUMBER = re.compile(r"-?\d+")


def extract_last_number(text: str) -> str | None:
    """The last integer in `text` ("-12" included; "1,234" reads as 234), or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    return str(int(found[-1]))


def check(text: str, answer: str) -> bool:
    """True when the last number in `text` equals `answer` exactly."""
    got = extract_last_number(text)
    return got is not None and got == str(int(answer))


def accuracy(texts: list[str], items: list[PromptItem]) -> float:
    """Fraction of `texts` that `check` right against their items' answers."""
    if len(texts) != len(items):
        raise ValueError(f"got {len(texts)} texts for {len(items)} items; pass one text per item")
    if not items:
        raise ValueError("accuracy of an empty list is undefined; pass at least one item")
    return sum(check(t, it.answer or "") for t, it in zip(texts, items, strict=True)) / len(items)


def _split_of(key: str, split_seed: int, *, validation: bool = False) -> Split:
    """The split of a problem, from a stable hash of its key: held out 1/HELDOUT_EVERY; with
    `validation`, a further 1/(2 * HELDOUT_EVERY) is validation (carved out of train)."""
    digest = hashlib.sha256(f"{split_seed}:{key}".encode()).digest()
    if not validation:
        return "heldout" if digest[0] % HELDOUT_EVERY == 0 else "train"
    slot = digest[0] % (2 * HELDOUT_EVERY)
    return "heldout" if slot < 2 else "validation" if slot == 2 else "train"


def first_wrong_step(text: str, solution: str) -> int | None:
    """Index (from 0) of the first line of `text` that differs from the same line of `solution`
    (spaces collapsed, blank lines skipped; a missing line differs), or None when every line of
    the solution is matched. The final "Answer: N" line counts as a step."""
    def lines(s: str) -> list[str]:
        return [" ".join(line.split()) for line in s.splitlines() if line.strip()]

    got, want = lines(text), lines(solution)
    for i, line in enumerate(want):
        if i >= len(got) or got[i] != line:
            return i
    return None


@dataclass(frozen=True)
class _Problem:
    key: str  # what decides the split
    prompt: str
    solution: str
    answer: int


def _pair_problems(word: str, lo: int, hi: int, op: Callable[[int, int], int]) -> list[_Problem]:
    out = []
    for a in range(lo, hi + 1):
        for b in range(lo, hi + 1):
            n = op(a, b)
            out.append(
                _Problem(
                    key=f"{min(a, b)},{max(a, b)}",
                    prompt=f"What is {a} {word} {b}? Answer with just the number.",
                    solution=str(n),
                    answer=n,
                )
            )
    return out


_NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max"]
_THINGS = ["apples", "marbles", "stickers", "coins", "books", "shells"]


def _word_problem(rng: random.Random) -> _Problem:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    if rng.random() < 0.5:
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        story = f"{name} has {a} {thing}. {name} gets {b} more."
        work, n = f"{a} + {b} = {a + b}", a + b
        key = f"+{min(a, b)},{max(a, b)}"
    else:
        a = rng.randint(20, 99)
        b = rng.randint(10, a - 1)
        story = f"{name} has {a} {thing}. {name} gives away {b} of them."
        work, n = f"{a} - {b} = {a - b}", a - b
        key = f"-{a},{b}"
    prompt = (
        f"{story} How many {thing} does {name} have now? "
        "Show the calculation, then end with 'Answer: N'."
    )
    return _Problem(key=key, prompt=prompt, solution=f"{work}\nAnswer: {n}", answer=n)


CHAIN_STEPS = 3  # running_total's default number of steps


def _chain_problem(rng: random.Random, steps: int) -> _Problem:
    start = total = rng.randint(10, 59)
    words, lines, key = [], [], [str(start)]
    for _ in range(steps):
        b = rng.randint(2, 29)
        add = total + b <= 99 and (total - b < 0 or rng.random() < 0.5)
        new = total + b if add else total - b
        words.append(f"{'add' if add else 'subtract'} {b}")
        lines.append(f"{total} {'+' if add else '-'} {b} = {new}")
        key.append(f"{'+' if add else '-'}{b}")
        total = new
    ops = ", then ".join(words)
    prompt = (f"Start at {start}. {ops[0].upper()}{ops[1:]}. Write one line per step with the running total, "
              "then end with 'Answer: N'.")
    return _Problem(key=",".join(key), prompt=prompt, solution="\n".join(lines + [f"Answer: {total}"]), answer=total)


@dataclass(frozen=True)
class Task:
    """A synthetic task: `items(split, n, seed)` and the `check` that grades it."""

    name: str

    def _pool(self) -> list[_Problem] | None:
        if self.name == "times_table":
            return _pair_problems("times", 2, 9, lambda a, b: a * b)
        if self.name == "addition":
            return _pair_problems("plus", 0, 9, lambda a, b: a + b)
        return None  # word problems are drawn, not enumerated

    def items(self, split: Split, n: int | None = None, *, seed: int = 0, split_seed: int = 0,
              steps: int | None = None) -> list[PromptItem]:
        """`n` problems of `split` (all of them when n is None, for the enumerated tasks).

        For the enumerated tasks n may exceed the split's size: problems then
        repeat in a fresh shuffled order each pass. `steps`: running_total's
        chain length (default CHAIN_STEPS); "validation": running_total only.
        """
        chain = self.name == "running_total"
        if split not in ("train", "validation", "heldout"):
            raise ConfigError(f"split must be 'train', 'validation' or 'heldout', got {split!r}")
        if split == "validation" and not chain:
            raise ConfigError(f"task {self.name!r} has no validation split (running_total has one)")
        if steps is not None and not chain:
            raise ConfigError(f"task {self.name!r} takes no `steps` (running_total's chain length); remove it")
        steps = CHAIN_STEPS if steps is None else steps
        if chain and not 1 <= steps <= 12:
            raise ConfigError(f"running_total steps must be 1..12, got {steps}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        pool = self._pool()
        if pool is not None:
            mine = [p for p in pool if _split_of(p.key, split_seed) == split]
            chosen: list[_Problem] = []
            while len(chosen) < (len(mine) if n is None else n):
                order = list(mine)
                rng.shuffle(order)
                chosen.extend(order)
            chosen = chosen[: len(mine) if n is None else n]
        else:
            if n is None:
                raise ConfigError(f"task {self.name!r} is generated, not enumerated: pass n (how many items)")
            chosen = []
            while len(chosen) < n:
                p = _chain_problem(rng, steps) if chain else _word_problem(rng)
                if _split_of(p.key, split_seed, validation=chain) == split:
                    chosen.append(p)
        return [
            PromptItem(
                prompt=p.prompt,
                privileged=p.solution,
                answer=str(p.answer),
                metadata={"task": self.name, "split": split, "solution": p.solution},
            )
            for p in chosen
        ]

    @staticmethod
    def check(text: str, answer: str) -> bool:
        return check(text, answer)


TASK_NAMES = ("times_table", "addition", "word_problems", "running_total")


def get_task(name: str) -> Task:
    """The built-in task called `name` (one of TASK_NAMES)."""
    if name not in TASK_NAMES:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}")
    return Task(name)
