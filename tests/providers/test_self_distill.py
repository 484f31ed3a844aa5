"""SelfDistillTeacher on a tiny random Llama and a tokenizer built here."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from opd_sdk.errors import ConfigError, TokenizationMismatch
from opd_sdk.types import Completion, FeedbackFailure, FeedbackRequest, TokenLogprobs
from providers.self_distill import PrivilegedTemplate, SelfDistillTeacher

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Renders assistant turns differently once a system message exists (a context-dependent template).
SYSTEM_SENSITIVE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' and messages[0]['role'] == 'system' %}A: {% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """Character BPE with two merges ("1","2") and ("a","b") so boundaries can merge."""
    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = list(string.ascii_letters + string.digits + " \n.,?!:+-*=()'")
    vocab = {t: i for i, t in enumerate(specials + chars + ["12", "ab"])}
    core = Tokenizer(models.BPE(vocab, merges=[("1", "2"), ("a", "b")], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = chat_template
    return tok


def make_model(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(config)


def request(tok, prompt="What is 3 times 4?", priv="3 * 4 = 12", comps=("12", "7 is it")) -> FeedbackRequest:
    eos = tok.eos_token_id
    return FeedbackRequest(
        prompt=prompt,
        completions=[Completion(text=c, token_ids=tok(c, add_special_tokens=False)["input_ids"] + [eos]) for c in comps],
        privileged=priv,
    )


def reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> list[float]:
    """log p(completion token t | teacher prompt, earlier completion tokens): one unpadded full forward."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [logp[n - 1 + t, tok_id].item() for t, tok_id in enumerate(completion_ids)]


def flat(fb) -> list[float]:
    return [x for row in fb.logprobs for x in row]


@pytest.fixture
def tok():
    return make_tokenizer()


async def test_logprobs_match_unbatched_forward_on_the_teacher_view(tok):
    model = make_model(tok)
    teacher = SelfDistillTeacher(model, tok, mode="frozen", top_k=3)
    reqs = [request(tok), request(tok, prompt="Add 5 and 6, please.", priv="11", comps=("11", "ab", "9 or 10 maybe"))]
    out = await teacher.feedback_batch(reqs)
    for req, fb in zip(reqs, out):
        assert isinstance(fb, TokenLogprobs)
        _, teacher_prompt = teacher.prompt_ids(req)
        assert len(fb.logprobs) == len(req.completions) and len(fb.top_k) == len(req.completions)
        for comp, lp, topk in zip(req.completions, fb.logprobs, fb.top_k):
            assert len(lp) == len(comp.token_ids)
            assert lp == pytest.approx(reference_logprobs(teacher.teacher_model, teacher_prompt, comp.token_ids), abs=1e-5)
            for t, (tok_id, value) in enumerate(zip(comp.token_ids, lp)):
                best = max(topk[t].values())
                assert len(topk[t]) == 3 and value <= best + 1e-6
                if tok_id in topk[t]:
                    assert topk[t][tok_id] == pytest.approx(value, abs=1e-5)


def test_views_place_the_privileged_text(tok):
    model = make_model(tok)
    req = request(tok)
    user = SelfDistillTeacher(model, tok)
    student_ids, teacher_ids = user.prompt_ids(req)
    assert tok.decode(student_ids) == "<|im_start|>user\nWhat is 3 times 4?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(teacher_ids) == (
        "<|im_start|>user\nWhat is 3 times 4?\n\nReference solution (for the grader only):\n3 * 4 = 12"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    system = SelfDistillTeacher(model, tok, template=PrivilegedTemplate("system", "Solution: {privileged}"))
    assert tok.decode(system.prompt_ids(req)[1]) == (
        "<|im_start|>system\nSolution: 3 * 4 = 12<|im_end|>\n<|im_start|>user\nWhat is 3 times 4?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


async def test_live_mode_never_builds_a_graph_through_the_teacher(tok):
    model = make_model(tok)
    model.train()
    seen: list[bool] = []
    model.model.register_forward_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    teacher = SelfDistillTeacher(model, tok, mode="live")
    assert torch.is_grad_enabled()
    fb = await teacher.feedback(request(tok))
    assert isinstance(fb, TokenLogprobs)
    assert seen == [False]  # the one teacher forward ran without autograd
    assert model.training  # train mode restored
    assert all(p.grad is None for p in model.parameters())
    # a student loss after the teacher call backpropagates only through the student's own forward
    ids = torch.tensor([teacher.prompt_ids(request(tok))[0]])
    model(input_ids=ids).logits.sum().backward()
    assert seen == [False, True]


async def test_live_frozen_and_ema_weights(tok):
    model = make_model(tok)
    live = SelfDistillTeacher(model, tok, mode="live")
    frozen = SelfDistillTeacher(model, tok, mode="frozen")
    req = request(tok)
    before_live, before_frozen = flat(await live.feedback(req)), flat(await frozen.feedback(req))
    assert before_live == pytest.approx(before_frozen, abs=1e-6)
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    assert flat(await live.feedback(req)) != pytest.approx(before_live, abs=1e-3)
    assert flat(await frozen.feedback(req)) == pytest.approx(before_frozen, abs=1e-7)
    frozen.refresh()
    assert flat(await frozen.feedback(req)) == pytest.approx(flat(await live.feedback(req)), abs=1e-6)


def test_ema_update_by_hand(tok):
    model = make_model(tok)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.0)
    teacher = SelfDistillTeacher(model, tok, mode="ema", ema_decay=0.75)
    w = teacher.teacher_model.lm_head.weight

    def set_policy(value: float) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)

    set_policy(1.0)
    teacher.on_optimizer_step(1)
    assert torch.allclose(w, torch.full_like(w, 0.25))  # 0.75*0 + 0.25*1
    teacher.on_optimizer_step(1)  # the same step told twice: no second fold
    assert torch.allclose(w, torch.full_like(w, 0.25))
    set_policy(2.0)  # an optimizer step changes the weights
    teacher.on_optimizer_step(2)
    assert torch.allclose(w, torch.full_like(w, 0.6875))  # 0.75*0.25 + 0.25*2
    assert not any(p.requires_grad for p in teacher.teacher_model.parameters())


async def test_ema_folds_at_the_step_hook_not_when_scoring(tok):
    """Replaces the old checksum test: the EMA folds when the trainer says a step happened
    (FollowsStudent.on_optimizer_step), never by detecting weight changes while scoring."""
    from opd_sdk.feedback.teacher import FollowsStudent, notify_optimizer_step

    model = make_model(tok)
    teacher = SelfDistillTeacher(model, tok, mode="ema", ema_decay=0.5)
    assert isinstance(teacher, FollowsStudent)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    await teacher.feedback(request(tok))  # scoring does not fold
    assert torch.equal(teacher.teacher_model.lm_head.weight, start["lm_head.weight"])
    notify_optimizer_step(teacher, 1)
    expected = 0.5 * start["lm_head.weight"] + 0.5 * model.lm_head.weight
    assert torch.allclose(teacher.teacher_model.lm_head.weight, expected)
    await teacher.feedback(request(tok))
    assert torch.allclose(teacher.teacher_model.lm_head.weight, expected)


async def test_same_tokenizer_ids_are_scored_as_they_are(tok):
    """A request whose tokenizer fingerprint is the teacher's: completion ids are used as sent,
    nothing is re-rendered or re-tokenised for the student view, and the log-probs are those of
    teacher prompt + the ids (checked against an unbatched forward)."""
    from opd_sdk.feedback.teacher import tokenizer_fingerprint

    model = make_model(tok)
    teacher = SelfDistillTeacher(model, tok, mode="frozen")
    assert teacher.tokenizer_id == tokenizer_fingerprint(tok)
    ids = [list(tok("12", add_special_tokens=False)["input_ids"]), [5, 6, 7]]  # the second: any sampled ids
    base = request(tok)
    same = base.model_copy(update={
        "completions": [Completion(text="12", token_ids=ids[0]), Completion(text="?", token_ids=ids[1])],
        "tokenizer": teacher.tokenizer_id, "prompt_token_ids": teacher.prompt_ids(base)[0]})
    renders = []
    original = teacher._render
    teacher._render = lambda *a: renders.append(a) or original(*a)  # count template renders
    fb = await teacher.feedback(same)
    assert renders == []  # the teacher prompt was cached; no student view was rendered
    _, teacher_prompt = teacher.prompt_ids(base)
    for i in range(2):
        assert fb.logprobs[i] == pytest.approx(reference_logprobs(teacher.teacher_model, teacher_prompt, ids[i]),
                                               abs=1e-5)
    other = same.model_copy(update={"tokenizer": "tok:someone-else"})  # another tokenizer: re-rendered, checked
    fb_other = await teacher.feedback(other)
    assert renders and len(fb_other.logprobs[1]) == len(tok("?", add_special_tokens=False)["input_ids"])


def test_id_and_cacheability(tok):
    model = make_model(tok)
    live = SelfDistillTeacher(model, tok, mode="live", name="m")
    frozen = SelfDistillTeacher(model, tok, mode="frozen", name="m")
    system = SelfDistillTeacher(model, tok, mode="frozen", name="m", template=PrivilegedTemplate("system"))
    assert len({live.id, frozen.id, system.id}) == 3
    assert live.id.startswith("self_distill:")
    assert frozen.cacheable and not live.cacheable
    fid = frozen.id
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # what an optimizer step does
    assert frozen.id == fid  # the frozen copy did not change
    frozen.refresh()
    assert frozen.id != fid


def test_mismatched_chat_template_refuses_to_run():
    tok = make_tokenizer(SYSTEM_SENSITIVE)
    model = make_model(tok)
    with pytest.raises(TokenizationMismatch, match="differently in the student and teacher views"):
        SelfDistillTeacher(model, tok, template=PrivilegedTemplate("system"))
    teacher = SelfDistillTeacher(model, tok)  # user_suffix: both views have no system turn
    teacher.check_views(request(tok))


async def test_boundary_merge_refuses_to_run():
    """Plain-text prompts: teacher prompt ends '...= 1', completion starts '2': BPE merges '12'."""
    tok = make_tokenizer(chat_template=None)
    model = make_model(tok)
    teacher = SelfDistillTeacher(model, tok, template=PrivilegedTemplate("user_suffix", " Hint: {privileged}"))
    ok = request(tok, prompt="What is 6 + 6? ", priv="2 * 6 = 12.", comps=("12",))
    assert isinstance(await teacher.feedback(ok), TokenLogprobs)
    bad = request(tok, prompt="What is 6 + 6? ", priv="6 + 5 = 11, so 1", comps=("2 is it",))
    with pytest.raises(TokenizationMismatch, match="teacher view, completion 0"):
        await teacher.feedback(bad)


async def test_missing_privileged_is_a_failure_value_and_alignment_holds(tok):
    model = make_model(tok)
    teacher = SelfDistillTeacher(model, tok, mode="frozen")
    good = request(tok)
    none = request(tok, priv=None)
    text_only = FeedbackRequest(prompt="Say ab.", completions=[Completion(text="ab")], privileged="ab")
    out = await teacher.feedback_batch([good, none, text_only])
    assert isinstance(out[0], TokenLogprobs) and len(out[0].logprobs) == 2
    assert isinstance(out[1], FeedbackFailure) and out[1].error_type == "missing_privileged"
    assert isinstance(out[2], TokenLogprobs)
    assert len(out[2].logprobs[0]) == 1  # "ab" is one merged token
    alone = await teacher.feedback(good)
    assert flat(alone) == pytest.approx(flat(out[0]), abs=1e-5)


def test_bad_config_errors(tok):
    model = make_model(tok)
    with pytest.raises(ConfigError, match="mode"):
        SelfDistillTeacher(model, tok, mode="teacher")
    with pytest.raises(ConfigError, match="privileged"):
        SelfDistillTeacher(model, tok, template=PrivilegedTemplate("user_suffix", "no placeholder"))
    with pytest.raises(ConfigError, match="loaded torch model"):
        SelfDistillTeacher("path/to/model", tok)


SMOLLM2 = Path.home() / ".cache" / "opd-sdk" / "SmolLM2-135M-Instruct"


@pytest.mark.skipif(not (SMOLLM2 / "tokenizer.json").exists(), reason="SmolLM2 folder not converted")
@pytest.mark.parametrize("placement", ["user_suffix", "system"])
def test_real_smollm2_template_passes_the_view_check(placement):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    teacher = SelfDistillTeacher(LlamaForCausalLM(config), tok, template=PrivilegedTemplate(placement))
    req = FeedbackRequest(prompt="What is 7 times 8? Answer with just the number.",
                          completions=[Completion(text=" 56"), Completion(text="7 x 8 = 56\nAnswer: 56")],
                          privileged="56")
    teacher.check_views(req)


async def test_bf16_autocast_teacher_is_close_to_fp32(tok):
    model = make_model(tok)
    fp32 = SelfDistillTeacher(model, tok, mode="live")
    bf16 = SelfDistillTeacher(model, tok, mode="live", autocast_dtype=torch.bfloat16)
    assert fp32.id != bf16.id
    req = request(tok)
    assert flat(await bf16.feedback(req)) == pytest.approx(flat(await fp32.feedback(req)), abs=0.05)
