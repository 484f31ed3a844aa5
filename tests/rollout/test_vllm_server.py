"""VLLMRollout in server mode against a real vLLM server this test starts (marked `vllm`):
LoRA adapter sync (/v1/load_lora_adapter), full-weight sync (reload_weights over /collective_rpc),
and the checks that must fail before training (tokenizer mismatch)."""

from __future__ import annotations

import pytest

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.rollout.logprobs import selected_logprobs
from opd_sdk.rollout.vllm_colocated import VLLMRollout
from tests.loop_fixtures import SPECIALS, tiny_tokenizer
from tests.vllm_fixtures import (
    fixed_ids,
    optimizer_step,
    requires_vllm,
    start_vllm_server,
    student,
    trainer_logprobs,
)

pytestmark = [pytest.mark.vllm, requires_vllm]

PORT = 8032  # this session's range is 8031-8039; never 8011 (CI's teacher server)
T = 0.7


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-student")
    student(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    proc, url = start_vllm_server(str(folder), PORT, str(folder / "server.log"))
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def test_server_lora_sync_is_exact(server, tok):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(student(tok), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    engine = VLLMRollout(model, tok, mode="server", base_url=server, temperature=T, max_new_tokens=10)
    assert engine.weight_sync == "lora"
    ids = fixed_ids(tok)
    before = engine.text_logprobs(ids)
    assert (before - trainer_logprobs(model, ids)).abs().max() < 1e-3
    batch = engine.sample([PromptItem(prompt="What is 2+3?"), PromptItem(prompt="hi")], 3)
    mask = batch.completion_mask_BT.bool()
    assert batch.size == 6 and mask.any()
    ours = selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, temperature=T,
                             from_col=batch.prompt_len)
    assert (ours[mask] - batch.sampler_logprobs_BT[mask]).abs().max() < 1e-3
    optimizer_step(model, ids)  # moves the adapter only
    engine.sync_weights(model)
    after = engine.text_logprobs(ids)
    assert (after - trainer_logprobs(model, ids)).abs().max() < 1e-3
    assert (after - before).abs().max() > 0.05
    engine.close()


def test_server_full_weight_sync_is_exact(server, tok):
    model = student(tok)
    engine = VLLMRollout(model, tok, mode="server", base_url=server, temperature=T, max_new_tokens=10,
                         weight_sync="full")
    ids = fixed_ids(tok)
    before = engine.text_logprobs(ids)
    assert (before - trainer_logprobs(model, ids)).abs().max() < 1e-3
    optimizer_step(model, ids)
    engine.sync_weights(model)
    after = engine.text_logprobs(ids)
    assert (after - trainer_logprobs(model, ids)).abs().max() < 1e-3
    assert (after - before).abs().max() > 0.05
    engine.sync_weights(student(tok))  # put the served weights back for the tests after this one
    engine.close()


def test_a_student_whose_tokenizer_differs_is_refused(server, tok):
    other = tiny_tokenizer()
    vocab = other.get_vocab()
    # Same characters, other ids: swap the ids of "a" and "b".
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    swapped = dict(vocab)
    swapped["a"], swapped["b"] = vocab["b"], vocab["a"]
    core = Tokenizer(models.WordLevel(swapped, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    wrong = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                    eos_token="<|im_end|>", additional_special_tokens=[SPECIALS[2]])
    wrong.chat_template = tok.chat_template
    with pytest.raises(ConfigError, match="rollout.base_url: the server's tokenizer .* differs from the student's"):
        VLLMRollout(student(tok), wrong, mode="server", base_url=server, weight_sync="full")


def test_a_lora_student_on_another_base_is_refused(server, tok):
    """The adapter path never sends base weights: a student whose base differs from the served
    model must be caught by the log-prob probe before training."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(student(tok, seed=5), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="rollout.base_url: the server's log-probs differ from the student's"):
        VLLMRollout(model, tok, mode="server", base_url=server, temperature=T)
