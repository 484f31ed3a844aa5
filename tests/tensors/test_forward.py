"""The forward layer (opd_sdk.tensors.forward): a Part of a Plan, and one policy pass per micro-batch read by
each term in its own row order, checked against the tiny model run on each sequence alone, unpadded."""

from __future__ import annotations

import math

import pytest
import torch

from opd_sdk.tensors.forward import Part, Plan, forward_micro
from opd_sdk.tensors.targets import TeacherSupport
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)
from tests.tensors.batches import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 3
PROMPTS = [[5, 6, 7], [8, 9], [10]]
COMPLETIONS = [[20, 21, EOS], [22, EOS], [23, 24, 25, EOS], [EOS], [26, EOS], [27, 28, EOS]]


def plan(rows: list[int], B: int = 6, texts=(), support: TeacherSupport | None = None) -> Plan:
    rows_B = torch.zeros(B, dtype=torch.bool)
    rows_B[rows] = True
    return Plan(rows_B, normaliser=1.0, signal=1, metrics={}, texts=list(texts), support=support)


def support(rows: list[int], cols: list[int], ids: list[list[int]]) -> TeacherSupport:
    ids_MK = torch.tensor(ids)
    return TeacherSupport(torch.tensor(rows), torch.tensor(cols), ids_MK, torch.ones_like(ids_MK, dtype=torch.bool),
                          torch.zeros(ids_MK.shape))


def test_a_part_is_the_plans_rows_texts_and_support_in_a_range_of_prompt_groups():
    # G = 2: prompt groups [1, 3) are rows [2, 6)
    full = plan([0, 2, 3, 5], texts=[(0, [1]), (2, [1]), (1, [1])], support=support([0, 2, 3, 5], [3] * 4, [[1]] * 4))
    part = Part.of(full, 1, 3, 2)
    assert part.rows.tolist() == [2, 3, 5] and part.texts == [1, 2] and part.support_M.tolist() == [1, 2, 3]
    part = Part.of(full, 0, 1, 2)
    assert part.rows.tolist() == [0] and part.texts == [0] and part.support_M.tolist() == [0]
    assert not part.empty() and Part.of(plan([0, 1]), 1, 3, 2).empty()
    assert not Part.of(plan([], texts=[(2, [1])]), 1, 3, 2).empty()  # a text row alone is something to run


class Term:
    """What forward_micro asks of an objective: its temperature and the frozen models it reads."""

    def __init__(self, temperature: float, frozen: dict | None = None) -> None:
        self.t, self.frozen = temperature, frozen or {}

    def temperature(self, batch) -> float:
        return self.t

    def frozen_models(self) -> dict:
        return self.frozen


def alone(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) [len(ids), V] of one unpadded sequence: row j predicts token j + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float() / temperature, -1)


def sequence(b: int) -> tuple[list[int], int]:
    """Row b's real tokens (no padding), and where its completion starts in them."""
    prompt = PROMPTS[b // 2]
    return prompt + COMPLETIONS[b], len(prompt)


def completion_logprobs(model, b: int, temperature: float = 1.0) -> list[float]:
    ids, start = sequence(b)
    dist = alone(model, ids, temperature)
    return [float(dist[j - 1, ids[j]]) for j in range(start, len(ids))]


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    return tiny_model(tok, seed=0), tiny_model(tok, seed=1)


@pytest.fixture
def batch(models):
    """3 prompts x 2 samples; the sampler's log-probs are the policy's minus 0.5 on every sampled token."""
    batch = make_batch(PROMPTS, COMPLETIONS, 2)
    L = batch.prompt_len
    for b in range(batch.size):
        values = completion_logprobs(models[0], b)
        batch.sampler_logprobs_BT[b, L : L + len(values)] = torch.tensor(values) - 0.5
    return batch


def test_one_pass_serves_each_term_in_its_own_row_order(models, batch):
    policy, frozen = models
    L = batch.prompt_len  # 3
    # micro-batch: prompt groups [1, 3) = rows 2..5. Term A reads rows 2 and 5 at T=1 with a top-k support on
    # row 2 column 3 and row 5 column 4; term B reads rows 3, 4, 5 and a reference text after prompt 2, at
    # T=0.5, with a support on row 4 column 3 (and one on row 0, outside the micro-batch), and a frozen model.
    a = plan([2, 5], support=support([2, 5], [3, 4], [[23, 40], [28, 41]]))
    b = plan([3, 4, 5], texts=[(0, [30, EOS]), (2, [30, 31, EOS])],
             support=support([0, 4], [3, 3], [[1, 2], [26, 42]]))
    views, stats = forward_micro(policy, batch, 1, 3, [(Term(1.0), a), (Term(0.5, {"reference": frozen}), b)],
                                 tis_cap=1.2)
    (view_a, part_a), (view_b, part_b) = views
    assert part_a.rows.tolist() == [2, 5] and part_b.rows.tolist() == [3, 4, 5] and part_b.texts == [1]
    assert view_a.T == view_b.T == 7  # row 2's 4 completion tokens set the micro-batch's width

    def check(view_rows: torch.Tensor, model, rows: list[int], temperature: float):
        assert view_rows.shape == (len(rows), 7)
        for r, row in enumerate(rows):
            expected = completion_logprobs(model, row, temperature)
            got = view_rows[r, L : L + len(expected)].tolist()
            assert got == pytest.approx(expected, abs=1e-4), (row, temperature)
            assert view_rows[r, :L].abs().sum() == 0  # prompt columns: no LM head run there

    check(view_a.policy(1.0), policy, [2, 5], 1.0)
    check(view_b.policy(0.5), policy, [3, 4, 5], 0.5)
    check(view_b.policy(0.5, model="reference"), frozen, [3, 4, 5], 0.5)
    assert view_a.policy(1.0).requires_grad and not view_b.policy(0.5, model="reference").requires_grad

    # the text row: prompt 2 ([10]) then 30 31 EOS; its log-probs sit at columns L.. of the text tensor
    dist = alone(policy, [10, 30, 31, EOS], 0.5)
    texts = view_b.texts(0.5)
    assert texts.shape == (1, L + 3) and view_b.text_mask.tolist() == [[0, 0, 0, 1, 1, 1]]
    assert texts[0, L:].tolist() == pytest.approx([float(dist[j - 1, t]) for j, t in enumerate([10, 30, 31, EOS])
                                                   if j >= 1], abs=1e-4)

    # the support: the policy's log-probs of the listed ids at the position predicting that column
    logprobs_MK, log_tail_M = view_a.support()
    row2, row5 = alone(policy, sequence(2)[0]), alone(policy, sequence(5)[0])
    # row 2 = [8 9 | 23 ...]: column 3 (token 23) is predicted at index 1; row 5 = [10 | 27 28 ...]: column 4 at index 1
    expected_MK = torch.stack([row2[1, [23, 40]], row5[1, [28, 41]]])
    assert torch.allclose(logprobs_MK.detach().float(), expected_MK, atol=1e-4)
    tail = [math.log(1 - math.exp(float(x)) - math.exp(float(y))) for x, y in expected_MK]
    assert log_tail_M.tolist() == pytest.approx(tail, abs=1e-4)
    # term B's support (row 0 is outside the micro-batch): row 4 = [10 | 26 EOS], column 3 predicted at index 0
    logprobs_MK, _ = view_b.support()
    row4 = alone(policy, sequence(4)[0])
    assert torch.allclose(logprobs_MK.detach().float(), row4[0, [26, 42]].unsqueeze(0), atol=1e-4)

    # trainer - sampler = +0.5 on each of rows 2..5's 4 + 1 + 2 + 3 sampled tokens
    assert stats["policy_passes"] == 1.0 and stats["logprob_tokens"] == 10.0
    assert stats["logprob_abs_diff_sum"] == pytest.approx(5.0, abs=1e-3)
    assert stats["max_ratio"] == pytest.approx(math.exp(0.5), abs=1e-3)
    # truncated importance weights: min(e^0.5 = 1.65, cap 1.2) on the sampled tokens, 1 elsewhere
    weights = view_a.weights
    assert weights[0].tolist() == pytest.approx([1, 1, 1, 1.2, 1.2, 1.2, 1.2])
    assert weights[1].tolist() == pytest.approx([1, 1, 1, 1.2, 1.2, 1.2, 1])


def test_a_micro_batch_no_term_reads_runs_nothing(models, batch):
    calls = []
    hook = models[0].register_forward_hook(lambda *args: calls.append(1))
    try:
        views, stats = forward_micro(models[0], batch, 1, 3, [(Term(1.0), plan([0, 1]))])
    finally:
        hook.remove()
    assert views == [None] and calls == [] and stats["policy_passes"] == 0.0 and stats["logprob_tokens"] == 0.0
    # one term with nothing in the range, one with rows: the first gets None, the second its view
    views, _ = forward_micro(models[0], batch, 1, 3, [(Term(1.0), plan([0])), (Term(1.0), plan([4]))])
    assert views[0] is None and views[1][1].rows.tolist() == [4]
