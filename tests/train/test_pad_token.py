"""A Trainer built in code with a tokenizer that has no pad token (issue #22 item 9): it pads with
the EOS token, as `opd train` does, and says so once; with no EOS either it refuses with the fix."""

from __future__ import annotations

import logging

import pytest

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.objectives import RewardWeighted
from opd_sdk.train.trainer import Trainer
from providers.verifier import VerifierTeacher
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(2)]


def unpadded_tokenizer():
    tok = tiny_tokenizer()
    tok.pad_token = None
    assert tok.pad_token is None and tok.eos_token == "<|im_end|>"
    return tok


def test_a_tokenizer_without_a_pad_token_pads_with_eos_and_says_so_once(caplog):
    tok = unpadded_tokenizer()
    model = tiny_model(tiny_tokenizer())
    caplog.set_level(logging.WARNING, logger="opd_sdk.models")
    with FeedbackCollector(VerifierTeacher("numeric"), progress=False) as col:
        trainer = Trainer(model, tok, RewardWeighted(), col, ITEMS, group_size=2, prompts_per_step=2,
                          max_new_tokens=3, max_steps=1, precision="fp32")
        row = trainer.train_step()  # was: transformers' "Asking to pad but the tokenizer does not have a padding token"
        Trainer(model, tok, RewardWeighted(), col, ITEMS, group_size=2, prompts_per_step=2, max_new_tokens=3)
    assert tok.pad_token == "<|im_end|>" and trainer.pad_id == tok.eos_token_id
    assert row["step"] == 1
    said = [r.getMessage() for r in caplog.records if "no pad token" in r.getMessage()]
    assert len(said) == 1 and "'<|im_end|>'" in said[0] and "opd train" in said[0]


def test_a_tokenizer_without_pad_or_eos_is_refused_at_construction_with_the_fix():
    tok = unpadded_tokenizer()
    tok.eos_token = None
    refused = pytest.raises(ConfigError, match=r"no pad token and no EOS.*add_special_tokens.*resize_token_embeddings")
    with FeedbackCollector(VerifierTeacher("numeric"), progress=False) as col, refused:
        Trainer(tiny_model(tiny_tokenizer()), tok, RewardWeighted(), col, ITEMS, group_size=2,
                    prompts_per_step=2, max_new_tokens=3)
