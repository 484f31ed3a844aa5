"""LogprobTeacher against a scripted completions endpoint that echoes prompt log-probs.

The scripted teacher tokenises like vLLM would (special token "<eos>" is one
token) either per character (the student's tokenizer here) or in 2-character
chunks (a different tokenizer), and gives each token the log-prob
lp(t) = -(ord(t[0]) % 10) / 10 - 0.5 * (len(t) - 1), so every number below is
worked by hand.
"""

from __future__ import annotations

import re

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd_sdk import (
    Completion,
    ConfigError,
    FeedbackCollector,
    FeedbackFailure,
    FeedbackRequest,
    TeacherError,
)
from opd_sdk.errors import TokenizationMismatch
from providers import LogprobTeacher
from tests.providers.helpers import client_for
from tests.scripted_server import ScriptedServer

CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(CHARS)} | {"<eos>": len(CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="?"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")


TOK = char_tokenizer()
EOS = len(CHARS)


def lp(token: str) -> float:
    return -(ord(token[0]) % 10) / 10 - 0.5 * (len(token) - 1)


class EchoTeacher:
    """Responder for /v1/completions with echo: tokens, text_offset, token_logprobs, prompt_logprobs."""

    def __init__(self, chunk: int = 1, noise_on_call: dict[int, float] | None = None) -> None:
        self.pattern = re.compile("<eos>|" + "." * chunk if chunk == 1 else "<eos>|.{1,%d}" % chunk, re.DOTALL)
        self.noise_on_call, self.calls = noise_on_call or {}, 0

    def __call__(self, body: dict) -> dict:
        prompt = body["prompt"]
        if isinstance(prompt, list):  # token ids of the char vocabulary
            tokens = [CHARS[i] if i < len(CHARS) else "<eos>" for i in prompt]
            ids = list(prompt)
        else:
            tokens = self.pattern.findall(prompt)
            ids = [TOK.convert_tokens_to_ids(t) if len(t) == 1 or t == "<eos>" else 1000 + len(t) for t in tokens]
        noise = self.noise_on_call.get(self.calls, 0.0)
        self.calls += 1
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        lps = [None] + [lp(t) + noise for t in tokens[1:]]
        prompt_lps = [None] + [
            {str(i): {"logprob": v, "rank": 1, "decoded_token": t},
             **({} if i == 0 else {"0": {"logprob": -3.0, "rank": 2, "decoded_token": " "}}),
             **({} if i == 1 else {"1": {"logprob": -4.0, "rank": 3, "decoded_token": "!"}})}
            for i, t, v in zip(ids[1:], tokens[1:], lps[1:])
        ]
        text = "".join(tokens) + "."
        return {
            "id": "cmpl", "object": "text_completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "length",
                         "logprobs": {"tokens": tokens + ["."], "text_offset": offsets + [pos],
                                      "token_logprobs": lps + [-1.0], "top_logprobs": None},
                         "prompt_logprobs": prompt_lps}],
            "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1, "total_tokens": len(tokens) + 1},
        }


def req(*completions: Completion, prompt: str = "Q: ") -> FeedbackRequest:
    return FeedbackRequest(prompt=prompt, completions=list(completions))


async def test_same_tokenizer_maps_one_to_one_and_sends_prompt_plus_completion():
    with ScriptedServer(EchoTeacher()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False)
        fb = await teacher.feedback(req(Completion(text="ab"), Completion(text="ab", token_ids=[65, 66, EOS])))
        assert fb.logprobs == [[-0.7, -0.8], [-0.7, -0.8, -2.0]]  # "<eos>": -(60 % 10)/10 - 0.5*4
        assert fb.details["per_completion"] == [{"alignment": "exact"}, {"alignment": "exact"}]
        body = srv.bodies("/v1/completions")[0]
        assert body["echo"] is True and body["logprobs"] == 1 and body["prompt"] in ("Q: ab", "Q: ab<eos>")
        assert fb.top_k is None and fb.usage.calls == 2


async def test_different_tokenizer_is_named_or_mapped_by_character_offsets():
    # teacher chunks of 2 over "Q: abcd": "Q:", " a", "bc", "d"; " a" straddles the prompt boundary.
    with ScriptedServer(EchoTeacher(chunk=2)) as srv:
        strict = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False)
        with pytest.raises(TokenizationMismatch, match="tokenise the completion differently.*boundary"):
            await strict.feedback(req(Completion(text="abcd")))
        with FeedbackCollector(strict, progress=False) as col:
            [failure] = await col.collect([req(Completion(text="abcd"))])
        assert isinstance(failure, FeedbackFailure) and not failure.retriable
        assert "tokenise the completion differently" in failure.reason

        loose = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False,
                               on_mismatch="offsets", top_k=2)
        fb = await loose.feedback(req(Completion(text="abcd")))
        # a <- " a" (-0.2 - 0.5), b <- "bc" (-0.8 - 0.5), c <- nothing starts there, d <- "d" (0.0)
        assert fb.logprobs == [[pytest.approx(-0.7), pytest.approx(-1.3), 0.0, pytest.approx(0.0)]]
        assert fb.top_k is None  # ids of a different vocabulary do not correspond
        assert fb.details["per_completion"][0]["alignment"] == "offsets"


async def test_token_ids_mode_scores_exactly_the_students_tokens_with_top_k():
    with ScriptedServer(EchoTeacher()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=TOK, use_chat_template=False,
                                 send="token_ids", top_k=2)
        fb = await teacher.feedback(req(Completion(text="ab", token_ids=[65, 66, EOS])))
        body = srv.bodies("/v1/completions")[0]
        assert body["prompt"] == [49, 26, 0, 65, 66, EOS] and body["prompt_logprobs"] == 2
        assert fb.logprobs == [[-0.7, -0.8, -2.0]]
        assert fb.top_k == [[{65: -0.7, 0: -3.0}, {66: -0.8, 0: -3.0}, {EOS: -2.0, 0: -3.0}]]


async def test_without_a_tokenizer_the_teachers_tokens_or_a_count_check():
    with ScriptedServer(EchoTeacher(chunk=2)) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv))
        fb = await teacher.feedback(req(Completion(text="bcd"), prompt="Q:"))  # "Q:", "bc", "d"
        assert fb.logprobs == [[pytest.approx(-1.3), 0.0]]
        assert fb.details["per_completion"][0] == {"alignment": "teacher_tokens", "teacher_tokens": ["bc", "d"]}
        with pytest.raises(TokenizationMismatch, match="2 tokens, the student's ids are 3"):
            await teacher.feedback(req(Completion(text="bcd", token_ids=[66, 67, 68]), prompt="Q:"))
        with pytest.raises(ConfigError, match="tokenizer="):
            await teacher.feedback(FeedbackRequest(prompt=[{"role": "user", "content": "hi"}],
                                                   completions=[Completion(text="x")]))


async def test_chat_prompts_are_rendered_with_the_students_template():
    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    with ScriptedServer(EchoTeacher()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), tokenizer=tok)
        request = FeedbackRequest(prompt=[{"role": "user", "content": "hi"}], completions=[Completion(text="a")])
        fb = await teacher.feedback(request)
        assert srv.bodies("/v1/completions")[0]["prompt"] == "<user>hi\n<assistant>a"
        assert fb.logprobs == [[-0.7]]


async def test_self_test_reports_the_spread_between_two_runs():
    with ScriptedServer(EchoTeacher()) as srv:
        stable = await LogprobTeacher("m", client=client_for(srv)).self_test(prompt="Q:", text="ab")
        assert stable == {"n_tokens": 2, "max_abs_diff": 0.0, "mean_abs_diff": 0.0,
                          "total_logprob": pytest.approx(-1.5), "stable": True}
    with ScriptedServer(EchoTeacher(noise_on_call={1: 0.002})) as srv:
        noisy = await LogprobTeacher("m", client=client_for(srv)).self_test(prompt="Q:", text="ab")
        assert noisy["max_abs_diff"] == pytest.approx(0.002) and noisy["stable"] is False


async def test_an_endpoint_without_echo_logprobs_is_a_clear_non_retriable_error():
    with ScriptedServer(lambda body: "hello") as srv:
        teacher = LogprobTeacher("m", client=client_for(srv))
        with pytest.raises(TeacherError, match="echo=True") as err:
            await teacher.feedback(req(Completion(text="ab")))
        assert not err.value.retriable


def test_config_errors():
    with pytest.raises(ConfigError, match="tokenizer="):
        LogprobTeacher("m", base_url="http://127.0.0.1:9/v1", send="token_ids")
    with pytest.raises(ConfigError, match="on_mismatch"):
        LogprobTeacher("m", base_url="http://127.0.0.1:9/v1", on_mismatch="guess")


async def test_self_test_fails_fast_on_a_server_without_prompt_logprobs():
    """Checked once before training: top_k needs prompt_logprobs; a server without them is named."""
    from opd_sdk.errors import Unsupported

    class NoPromptLogprobs(EchoTeacher):
        def __call__(self, body):
            out = super().__call__(body)
            del out["choices"][0]["prompt_logprobs"]
            return out

    with ScriptedServer(NoPromptLogprobs()) as srv:
        teacher = LogprobTeacher("m", client=client_for(srv), top_k=2)
        with pytest.raises(Unsupported, match="prompt_logprobs"):
            await teacher.self_test(prompt="Q:", text="ab")
        with pytest.raises(Unsupported):
            await teacher.feedback(req(Completion(text="ab")))
        assert srv.count == 1  # found once; the later call was not sent
