"""Providers against a real vLLM server serving SmolLM2-135M-Instruct (real-server tier).

Start one with `.ci/start_vllm.sh` and set OPD_VLLM_URL (e.g. http://127.0.0.1:8011/v1);
OPD_VLLM_MODEL is the served name (default "smollm2"). Skipped when OPD_VLLM_URL is unset.
SmolLM2-135M is a weak judge: these tests check that real outputs parse or fail honestly,
not that its grades are good.
"""

from __future__ import annotations

import os

import pytest

from opd_sdk import (
    Completion,
    FeedbackCollector,
    FeedbackFailure,
    FeedbackRequest,
    Preference,
    Reference,
    Score,
)

URL = os.environ.get("OPD_VLLM_URL")
MODEL = os.environ.get("OPD_VLLM_MODEL", "smollm2")
pytestmark = [pytest.mark.real_server, pytest.mark.skipif(not URL, reason="set OPD_VLLM_URL to a vLLM server"),
              pytest.mark.timeout(300)]

QUESTION = "What is 12 + 7? Answer with just the number."


def requests_() -> list[FeedbackRequest]:
    return [FeedbackRequest(prompt=QUESTION, completions=[Completion(text=t) for t in ("19", "9")],
                            metadata={"answer": "19"}),
            FeedbackRequest(prompt="Name the capital of France.",
                            completions=[Completion(text="Paris."), Completion(text="Berlin.")])]


async def test_judge_scores_parse_into_unit_interval_with_structured_output():
    from providers import JudgeTeacher

    judge = JudgeTeacher(MODEL, base_url=URL)
    with FeedbackCollector(judge, max_retries=2, progress=False) as col:
        results = await col.collect(requests_())
    assert all(isinstance(r, Score) for r in results), [r for r in results if not isinstance(r, Score)]
    assert all(0.0 <= s <= 1.0 for r in results for s in r.scores)
    assert judge.endpoint.schema_supported  # vLLM accepted response_format=json_schema
    assert col.usage.prompt_tokens > 0 and col.usage.completion_tokens > 0
    await judge.endpoint.client.close()


async def test_judge_without_a_schema_gives_scores_or_honest_failures():
    from providers import JudgeTeacher

    judge = JudgeTeacher(MODEL, base_url=URL, structured="none", max_reasks=1, max_tokens=48)
    with FeedbackCollector(judge, max_retries=0, progress=False) as col:
        results = await col.collect(requests_()[:1])
    for r in results:
        if isinstance(r, Score):
            assert all(0.0 <= s <= 1.0 for s in r.scores if s == s)  # a NaN is a completion that failed
        else:  # a verdict that did not parse after its re-ask, or a reply cut at max_tokens: neither retried
            assert isinstance(r, FeedbackFailure), r
            assert (r.error_type, r.retriable) in {("bad_response", False), ("truncated", False)}, r
            assert "parse" in r.reason or "max_tokens" in r.reason, r
    await judge.endpoint.client.close()


async def test_g_eval_reads_real_top_logprobs_and_listwise_parses():
    from providers import JudgeTeacher

    geval = JudgeTeacher(MODEL, base_url=URL, g_eval=True, scale=(1, 5))
    fb = await geval.feedback(requests_()[0])
    for verdict in fb.details["verdicts"]:
        assert verdict["g_eval"] is not None and 1.0 <= verdict["g_eval"] <= 5.0
        assert sum(verdict["g_eval_probs"].values()) == pytest.approx(1.0)
    listwise = JudgeTeacher(MODEL, base_url=URL, mode="listwise")
    fb = await listwise.feedback(requests_()[1])
    assert len(fb.scores) == 2 and all(0.0 <= s <= 1.0 for s in fb.scores)
    await geval.endpoint.client.close()
    await listwise.endpoint.client.close()


async def test_preferences_come_back_for_both_orders():
    from providers import PreferenceTeacher

    teacher = PreferenceTeacher(MODEL, base_url=URL)
    fb = await teacher.feedback(requests_()[0])
    assert isinstance(fb, Preference) and len(fb.pairs) == 1 and 0.5 <= fb.pairs[0].probability <= 1.0
    [verdict] = fb.details["verdicts"]
    assert verdict["i_first"] in ("A", "B", "tie") and verdict["j_first"] in ("A", "B", "tie")
    assert fb.usage.calls == 2
    await teacher.endpoint.client.close()


async def test_references_are_real_text():
    from providers import ReferenceTeacher

    teacher = ReferenceTeacher(MODEL, base_url=URL, n=2, temperature=0.8, max_tokens=32)
    fb = await teacher.feedback(requests_()[1])
    assert isinstance(fb, Reference) and len(fb.completions) == 2
    assert all(len(c.text.strip()) > 0 for c in fb.completions)
    assert fb.usage.completion_tokens > 0
    await teacher.endpoint.client.close()


@pytest.fixture(scope="module")
def smollm2():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd_sdk.models import smollm2_dir

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("send", ["text", "token_ids"])
async def test_logprobs_equal_transformers_for_the_same_weights(smollm2, send):
    import torch

    from opd_sdk.rollout.logprobs import selected_logprobs
    from providers import LogprobTeacher

    model, tok = smollm2
    texts = ["12 + 7 = 19.", "The capital of France is Paris, a city on the Seine."]
    ids_with_eos = tok(texts[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    completions = [Completion(text=texts[0], token_ids=ids_with_eos), Completion(text=texts[1])]
    request = FeedbackRequest(prompt=QUESTION, completions=completions)
    teacher = LogprobTeacher(MODEL, base_url=URL, tokenizer=tok, send=send, top_k=3)
    fb = await teacher.feedback(request)

    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok(prompt)["input_ids"]
    for i, c in enumerate(completions):
        ids = c.token_ids or tok(c.text, add_special_tokens=False)["input_ids"]
        input_ids_BT = torch.tensor([prompt_ids + ids])
        with torch.no_grad():
            local_BT = selected_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT))
        local = local_BT[0, len(prompt_ids): len(prompt_ids) + len(ids)].tolist()  # column t: log p(x_t | x_<t)
        assert len(fb.logprobs[i]) == len(ids)
        assert max(abs(a - b) for a, b in zip(local, fb.logprobs[i])) < 1e-3
        assert all(ids[t] in fb.top_k[i][t] or len(fb.top_k[i][t]) == 3 for t in range(len(ids)))
    report = await teacher.self_test()
    assert report["stable"] and report["n_tokens"] > 0
    await teacher.endpoint.client.close()


@pytest.mark.parametrize("send", ["text", "token_ids"])
async def test_split_characters_and_the_requests_own_ids_align_with_transformers(smollm2, send):
    """Emoji and CJK split across byte-level tokens: with the student's tokenizer the teacher's values
    map one to one (text mode reads vLLM's offsets); with the request's fingerprint and prompt ids,
    the ids go as they are."""
    import torch

    from opd_sdk.feedback.teacher import tokenizer_fingerprint
    from opd_sdk.rollout.logprobs import selected_logprobs
    from providers import LogprobTeacher

    model, tok = smollm2
    text = "答案是 19 😀, très bien 🙂"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any(tok.decode(ids[: t + 1]).endswith("\ufffd") for t in range(len(ids)))  # really split
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                     tokenize=False)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    request = FeedbackRequest(prompt=QUESTION, completions=[Completion(text=text, token_ids=ids)],
                              prompt_token_ids=prompt_ids, tokenizer=tokenizer_fingerprint(tok))
    teacher = LogprobTeacher(MODEL, base_url=URL, tokenizer=tok, send=send)
    fb = await teacher.feedback(request)
    assert fb.details["per_completion"][0]["alignment"] == ("exact" if send == "text" else "token_ids")
    input_ids_BT = torch.tensor([prompt_ids + ids])
    with torch.no_grad():
        local = selected_logprobs(model, input_ids_BT, torch.ones_like(input_ids_BT))[0, len(prompt_ids):].tolist()
    assert len(fb.logprobs[0]) == len(ids)
    assert max(abs(a - b) for a, b in zip(local, fb.logprobs[0])) < 1e-3
    await teacher.aclose()
