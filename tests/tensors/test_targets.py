"""The targets layer (opd_sdk.tensors.targets): Feedback -> tensors, against numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.tensors.targets import (
    check_feedback,
    count_failures,
    encode_text,
    feedback_pairs,
    reference_texts,
    score_table,
    teacher_support,
    teacher_token_logprobs,
    text_rows,
)
from opd_sdk.types import (
    Completion,
    FeedbackFailure,
    Preference,
    PreferencePair,
    Reference,
    Score,
    TokenLogprobs,
)
from tests.loop_fixtures import tiny_tokenizer
from tests.tensors.batches import make_batch

EOS = 3  # tiny_tokenizer's <|im_end|>
FAILED = FeedbackFailure(reason="judge down", error_type="timeout")


@pytest.fixture
def batch():
    """2 prompts x 2 samples; prompt 1 is shorter (left padding); completions of 3, 2, 4 and 1 tokens.

        row 0: [5 6 7 | 10 11 EOS  .]      row 2: [. 8 9 | 13 14 15 EOS]
        row 1: [5 6 7 | 12 EOS  .   .]      row 3: [. 8 9 | EOS .  .   . ]
    """
    return make_batch([[5, 6, 7], [8, 9]], [[10, 11, EOS], [12, EOS], [13, 14, 15, EOS], [EOS]], 2,
                      answers=["seven", None])


def test_feedback_must_be_one_entry_per_prompt_group(batch):
    check_feedback(batch, [FAILED, FAILED], "t")
    with pytest.raises(ConfigError, match="got 1 feedback entries for 2 prompts"):
        check_feedback(batch, [FAILED], "t")
    assert count_failures([Score(scores=[1.0, 0.0]), FAILED, FAILED]) == 2 and count_failures([]) == 0


def test_score_table_masks_failures_and_missing_scores_and_finds_flat_groups():
    batch = make_batch([[5], [6], [7]], [[EOS]] * 6, 2)
    table = score_table(batch, [Score(scores=[1.0, 0.0]), FAILED, Score(scores=[0.5, float("nan")])], "t")
    assert table.rewards_PG.tolist() == [[1.0, 0.0], [0.0, 0.0], [0.5, 0.0]]
    assert table.valid_PG.tolist() == [[True, True], [False, False], [True, False]]
    # group 0 spans 1.0 > 0: signal; group 1 has no valid score: not flat; group 2 has one valid score: spread 0
    assert table.flat_P.tolist() == [False, False, True]
    # a spread of 1e-9 within the tolerance 1e-6 is flat; 1.0 is not within 0.6
    table = score_table(batch, [Score(scores=[0.7, 0.7 + 1e-9]), Score(scores=[None, math.inf]),
                                Score(scores=[0.0, 1.0])], "t", flat_tolerance=0.6)
    assert table.flat_P.tolist() == [True, False, False] and not table.valid_PG[1].any()
    with pytest.raises(ConfigError, match="group 0 has 2 completions but its Score has 1 values"):
        score_table(batch, [Score(scores=[1.0]), FAILED, FAILED], "t")
    with pytest.raises(ConfigError, match="reads score feedback but group 0 got 'reference'"):
        score_table(batch, [Reference(completions=[Completion(text="x")]), FAILED, FAILED], "t")


def test_teacher_token_logprobs_are_aligned_with_the_sampled_columns(batch):
    # completions start at column prompt_len = 3; group 0's completions have 3 and 2 tokens
    fb = [TokenLogprobs(logprobs=[[-1.0, float("nan"), -3.0], [-4.0]]), FAILED]
    tok = teacher_token_logprobs(batch, fb, "t")
    assert tok.teacher_BT[0].tolist() == [0, 0, 0, -1.0, 0, -3.0, 0] and tok.teacher_BT[1, 3].item() == -4.0
    assert tok.mask_BT[0].tolist() == [0, 0, 0, 1, 0, 1, 0]  # the NaN is masked out and counted
    assert tok.mask_BT[1].tolist() == [0, 0, 0, 1, 0, 0, 0]  # the teacher skipped the EOS of completion 1
    assert tok.missing == 1 and tok.nonfinite == 1 and tok.mask_BT[2:].sum() == 0  # group 1 failed
    # -9999 (a server's minus infinity) is missing, not a log-prob
    assert teacher_token_logprobs(batch, [TokenLogprobs(logprobs=[[-9999.0], []]), FAILED], "t").nonfinite == 1
    with pytest.raises(TokenizationMismatch, match="4 tokens of completion 0 of group 0, but the student sampled 3"):
        teacher_token_logprobs(batch, [TokenLogprobs(logprobs=[[-1.0] * 4, [-1.0]])] * 2, "t")
    ragged = TokenLogprobs(logprobs=[[-1.0, -1.0, -1.0], [-1.0]], top_k=[[{2: -1.0}] * 3, []])
    with pytest.raises(ConfigError, match="one entry per scored token"):
        teacher_token_logprobs(batch, [ragged, FAILED], "t")
    with pytest.raises(ConfigError, match="token_logprobs"):
        teacher_token_logprobs(batch, [Score(scores=[1.0, 0.0])] * 2, "t")


def test_teacher_support_is_the_top_k_plus_the_sampled_token(batch):
    # row 0 scores columns 3 (sampled 10) and 4 (sampled 11); row 1 column 3 (sampled 12)
    fb = [TokenLogprobs(logprobs=[[-0.5, -2.0], [-0.1]],
                        top_k=[[{10: -0.5, 20: -1.5}, {30: -0.2, 21: float("nan")}], [{12: -0.1}]]), FAILED]
    tokens = teacher_token_logprobs(batch, fb, "t")
    support = teacher_support(batch, fb, tokens, vocab_size=40, who="t")
    assert support.rows_M.tolist() == [0, 0, 1] and support.cols_M.tolist() == [3, 4, 3]
    # sorted by token id; the NaN entry is left out; column 4's sampled token 11 is added with its log-prob
    assert support.ids_MK.tolist() == [[10, 20], [11, 30], [12, 0]]
    assert support.teacher_MK.tolist() == [[-0.5, -1.5], [-2.0, pytest.approx(-0.2)], [pytest.approx(-0.1), 0.0]]
    assert support.mask_MK.tolist() == [[True, True], [True, True], [True, False]]
    with pytest.raises(TokenizationMismatch, match="token id 30 is outside the student's vocabulary"):
        teacher_support(batch, fb, tokens, vocab_size=25, who="t")
    plain = [TokenLogprobs(logprobs=[[-0.5], []]), FAILED]
    with pytest.raises(ConfigError, match="needs the teacher's top-k"):
        teacher_support(batch, plain, teacher_token_logprobs(batch, plain, "t"), vocab_size=40, who="t")


def test_pairs_from_preferences_and_scores(batch):
    fb = [
        Preference(pairs=[PreferencePair(winner=1, loser=0, probability=0.9)]),
        Score(scores=[2.0, 2.0]),  # all equal: no pair
    ]
    assert feedback_pairs(batch, fb, "t") == [(1, 0, 0.9)]
    # rows are prompt-major: group 1's samples are rows 2 and 3; the best (1.5) wins over the worst
    assert feedback_pairs(batch, [FAILED, Score(scores=[0.5, 1.5])], "t") == [(3, 2, 1.0)]
    assert feedback_pairs(batch, [Score(scores=[1.0, float("nan")]), FAILED], "t") == []  # a missing score: no pair
    with pytest.raises(ConfigError, match="outside"):
        feedback_pairs(batch, [Preference(pairs=[PreferencePair(winner=2, loser=0, probability=1.0)])] * 2, "t")


def test_reference_texts_from_answers_and_from_reference_feedback(batch):
    assert reference_texts(batch, None, "answer", "t") == ([(0, "seven")], 1)  # prompt 1 has no answer
    fb = [Reference(completions=[Completion(text="a"), Completion(text="b")]), FAILED]
    assert reference_texts(batch, fb, "reference", "t") == ([(0, "a")], 0)
    assert reference_texts(batch, fb, "reference", "t", all_references=True) == ([(0, "a"), (0, "b")], 0)
    with pytest.raises(ConfigError, match="source must be 'answer' or 'reference'"):
        reference_texts(batch, fb, "teacher", "t")
    with pytest.raises(ConfigError, match="needs Reference feedback"):
        reference_texts(batch, None, "reference", "t")


def test_encode_text_appends_eos_once():
    tok = tiny_tokenizer()  # one id per character: "a" = 4, "b" = 5; EOS <|im_end|> = 3
    assert encode_text(tok, "ab") == [4, 5, EOS]
    assert encode_text(tok, "ab<|im_end|>") == [4, 5, EOS]
    assert encode_text(tok, "ab", append_eos=False) == [4, 5]
    with pytest.raises(ConfigError, match="tokenises to nothing"):
        encode_text(tok, "", append_eos=False)


def test_text_rows_reuse_the_batch_prompt(batch):
    # prompt 1 is [8, 9] left-padded to prompt_len 3; the longer text sets the width: 3 + 3
    ids, attn, target = text_rows(batch, [(1, [14, 15, EOS]), (0, [11, EOS])], pad_id=0)
    assert ids.tolist() == [[0, 8, 9, 14, 15, EOS], [5, 6, 7, 11, EOS, 0]]
    assert attn.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert target.tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert target.dtype == torch.float32
