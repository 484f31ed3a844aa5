"""Issue 14, section 3: token-level feedback. Missing log-probs (-9999, NaN, inf) are masked
and counted, BOS is never doubled, and characters split across byte-level tokens align."""

from __future__ import annotations

import math

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from opd_sdk import Completion, FeedbackRequest
from opd_sdk.feedback.teacher import tokenizer_fingerprint
from opd_sdk.types import TokenLogprobs, feedback_from_json, feedback_to_json
from providers import LogprobTeacher
from tests.providers.helpers import client_for
from tests.providers.test_logprob import CHARS, EOS, TOK, EchoTeacher, char_tokenizer
from tests.scripted_server import ScriptedServer


def test_minus_9999_nan_and_inf_are_missing_values_that_survive_the_cache():
    fb = TokenLogprobs(logprobs=[[-0.5, -9999.0, float("nan"), -12000.0, float("-inf"), -3.0]],
                       top_k=[[{1: -0.5}, {1: -9999.0, 2: -0.1}, {}, {}, {}, {3: float("inf")}]])
    assert [math.isnan(v) for v in fb.logprobs[0]] == [False, True, True, True, True, False]
    assert math.isnan(fb.top_k[0][1][1]) and fb.top_k[0][1][2] == -0.1
    assert fb.n_missing() == 4 + 1 + 1  # four selected tokens, two top-k entries
    back = feedback_from_json(feedback_to_json(fb))  # NaN round-trips through the cache's JSON
    assert back.n_missing() == 6 and back.logprobs[0][0] == -0.5


class MinusInfinity(EchoTeacher):
    """vLLM sends -9999.0 for log(0): here for every "b", in the selected and the top-k values."""

    def __call__(self, body):
        out = super().__call__(body)
        lp = out["choices"][0]["logprobs"]
        lp["token_logprobs"] = [(-9999.0 if t == "b" else v) for t, v in zip(lp["tokens"], lp["token_logprobs"])]
        for entry in out["choices"][0]["prompt_logprobs"][1:]:
            for v in entry.values():
                if v["decoded_token"] == "b":
                    v["logprob"] = -9999.0
        return out


async def test_minus_9999_from_the_server_is_masked_not_a_logprob():
    with ScriptedServer(MinusInfinity()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False, top_k=2)
        fb = await teacher.feedback(FeedbackRequest(prompt="Q: ", completions=[Completion(text="abc")]))
    values = fb.logprobs[0]
    assert values[0] == pytest.approx(-0.7) and math.isnan(values[1]) and values[2] == pytest.approx(-0.9)
    assert math.isnan(fb.top_k[0][1][66]) and fb.n_missing() == 2


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The char tokenizer plus "<s>", which it adds in front (like Llama), and a chat template
    that writes "<s>" itself (so the rendered prompt already holds BOS)."""
    tok = char_tokenizer()
    tok.add_special_tokens({"bos_token": "<s>"})
    bos = tok.convert_tokens_to_ids("<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok.chat_template = "<s>{% for m in messages %}[{{ m.content }}]{% endfor %}>"
    return tok


async def test_bos_is_not_doubled_when_the_template_already_emits_it():
    tok = bos_tokenizer()
    bos = tok.bos_token_id
    assert tok("x")["input_ids"][0] == bos  # the tokenizer adds BOS by default ...
    chat = FeedbackRequest(prompt=[{"role": "user", "content": "hi"}], completions=[Completion(text="ab")])
    with ScriptedServer(EchoTeacher()) as srv:
        ids_teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=tok, send="token_ids")
        await ids_teacher.feedback(chat)
        sent = srv.bodies("/v1/completions")[0]["prompt"]
        assert sent[0] == bos and sent.count(bos) == 1  # ... and the template already did: one BOS
        text_teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=tok)
        await text_teacher.feedback(chat)
        body = srv.bodies("/v1/completions")[1]
        assert body["prompt"].startswith("<s>[hi]>") and body["add_special_tokens"] is False
        plain = LogprobTeacher("m", client=client_for(srv), tokenizer=char_tokenizer(), use_chat_template=False)
        await plain.feedback(FeedbackRequest(prompt="Q: ", completions=[Completion(text="ab")]))
        assert "add_special_tokens" not in srv.bodies("/v1/completions")[2]  # no BOS in the prompt: as before


async def test_same_fingerprint_sends_the_requests_ids_as_they_are():
    with ScriptedServer(EchoTeacher()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, send="token_ids", use_chat_template=False)
        assert teacher.tokenizer_id == tokenizer_fingerprint(TOK)
        prompt_ids = [CHARS.index(c) for c in "Z: "]  # not what rendering "Q: " would give: proves no re-render
        req = FeedbackRequest(prompt="Q: ", completions=[Completion(text="ab", token_ids=[65, 66, EOS])],
                              prompt_token_ids=prompt_ids, tokenizer=teacher.tokenizer_id)
        fb = await teacher.feedback(req)
        assert srv.bodies("/v1/completions")[0]["prompt"] == prompt_ids + [65, 66, EOS]
        assert fb.logprobs == [[-0.7, -0.8, -2.0]]
        other = req.model_copy(update={"tokenizer": "tok:another"})  # another tokenizer: rendered again
        await teacher.feedback(other)
        assert srv.bodies("/v1/completions")[1]["prompt"][:3] == [CHARS.index(c) for c in "Q: "]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE that knows ASCII pairs but no emoji or CJK merges: "😀" is 4 byte tokens."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tk.train_from_iterator(["the answer is 42 ok " * 50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


class VllmLikeEcho:
    """Echo log-probs the way vLLM reports them for a byte-level tokenizer: token text from
    incremental detokenization (a token that ends inside a character has text "" until the token
    that completes it), text_offset = running sum of those lengths; log-prob of token id i = -i/1000."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, body):
        ids = self.tok(body["prompt"], add_special_tokens=False)["input_ids"]
        tokens, offsets, pos, done = [], [], 0, ""
        for t in range(len(ids)):
            text = self.tok.decode(ids[: t + 1])
            piece = "" if text.endswith("\ufffd") else text[len(done):]
            if piece:
                done = text
            tokens.append(piece)
            offsets.append(pos)
            pos += len(piece)
        lps = [None] + [-i / 1000 for i in ids[1:]]
        return {"id": "c", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "text": "", "finish_reason": "length",
                             "logprobs": {"tokens": tokens, "text_offset": offsets, "token_logprobs": lps,
                                          "top_logprobs": None}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


def space_merging_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE whose only merge is space + the first byte of an emoji ("Ġð"): " 😀" is
    ["Ġð", "Ł", "ĺ", "Ģ"], so a space and half a character share a token (as in SmolLM2)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"Ġð": len(alphabet), "<eos>": len(alphabet) + 1}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "ð")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


@pytest.mark.parametrize("make, text", [
    (byte_level_tokenizer, "ok 😀 42"), (byte_level_tokenizer, "答案是42"), (byte_level_tokenizer, "😀😀"),
    (byte_level_tokenizer, "é🙂x"), (space_merging_tokenizer, "19 😀, ok 🙂"),
])
async def test_characters_split_across_byte_tokens_align_exactly(make, text):
    tok = make()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.decode(ids[: t + 1]).endswith("\ufffd") for t in range(len(ids)))  # a split character
    with ScriptedServer(VllmLikeEcho(tok)) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=tok, use_chat_template=False)
        fb = await teacher.feedback(FeedbackRequest(
            prompt="the answer is:\n", completions=[Completion(text=text, token_ids=ids)],
            tokenizer=tokenizer_fingerprint(tok)))
    assert fb.details["per_completion"][0]["alignment"] == "exact"
    assert fb.logprobs == [[pytest.approx(-i / 1000) for i in ids]]  # one teacher value per student token
