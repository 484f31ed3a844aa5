"""TransformersRollout, RolloutBatch splitting, and selected log-probs (plain and LoRA)."""

from __future__ import annotations

import pytest
import torch

from opd_sdk.data import PromptItem
from opd_sdk.errors import ConfigError
from opd_sdk.rollout.engine import RolloutEngine, TransformersRollout
from opd_sdk.rollout.logprobs import selected_logprobs
from tests.loop_fixtures import one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [PromptItem(prompt="hi"), PromptItem(prompt="What is 2+3?"), PromptItem(prompt="ok")]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_sample_layout_masks_and_text(tok):
    model = tiny_model(tok)
    engine = TransformersRollout(model, tok, max_new_tokens=6)
    assert isinstance(engine, RolloutEngine)
    torch.manual_seed(0)
    batch = engine.sample(PROMPTS, 2)
    B, T = batch.input_ids_BT.shape
    assert B == 6 and batch.size == 6 and batch.group_size == 2
    assert T <= batch.prompt_len + 6
    # Prompts are left-padded and rendered with the chat template.
    row = batch.input_ids_BT[2, : batch.prompt_len][batch.attention_mask_BT[2, : batch.prompt_len].bool()]
    assert tok.decode(row) == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert batch.attention_mask_BT[0, 0] == 0  # "hi" is shorter: padded on the left
    assert torch.equal(batch.input_ids_BT[0, : batch.prompt_len], batch.input_ids_BT[1, : batch.prompt_len])
    assert batch.completion_mask_BT[:, : batch.prompt_len].sum() == 0
    for b, comp in enumerate(batch.completions):
        n = int(batch.completion_mask_BT[b].sum())
        assert comp.token_ids == batch.input_ids_BT[b, batch.prompt_len : batch.prompt_len + n].tolist()
        assert comp.text == tok.decode([i for i in comp.token_ids if i != tok.eos_token_id], skip_special_tokens=True)
    assert batch.completions_of(1) == batch.completions[2:4]
    assert model.training  # sampling restored the mode it found


def test_stops_at_eos_and_masks_after_it(tok):
    model = tiny_model(tok)
    eos = tok.eos_token_id
    with torch.no_grad():  # make EOS likely so some rows stop early and others do not
        model.lm_head.weight[eos] *= 0
        model.lm_head.weight[eos] += model.model.norm.weight.sign() * 0.08
    engine = TransformersRollout(model, tok, max_new_tokens=8)
    torch.manual_seed(1)
    batch = engine.sample(PROMPTS, 4)
    lengths = batch.completion_mask_BT.sum(-1).tolist()
    stopped = [b for b, c in enumerate(batch.completions) if c.token_ids and c.token_ids[-1] == eos]
    assert stopped and min(lengths) < 8, "the test needs rows that ended early"
    for b in stopped:
        ids = batch.completions[b].token_ids
        assert ids.count(eos) == 1  # nothing kept after the first EOS
        end = batch.prompt_len + len(ids)
        assert batch.attention_mask_BT[b, end:].sum() == 0
        assert (batch.input_ids_BT[b, end:] == tok.pad_token_id).all()
        assert batch.sampler_logprobs_BT[b, end:].abs().sum() == 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_recomputed(tok, temperature):
    model = tiny_model(tok)
    engine = TransformersRollout(model, tok, max_new_tokens=5, temperature=temperature, top_p=0.9)
    torch.manual_seed(2)
    batch = engine.sample(PROMPTS, 3)
    assert batch.temperature == temperature
    with torch.no_grad():
        full_BT = selected_logprobs(model, batch.input_ids_BT, batch.attention_mask_BT, temperature=temperature)
        tail_BT = selected_logprobs(
            model, batch.input_ids_BT, batch.attention_mask_BT, temperature=temperature, from_col=batch.prompt_len
        )
    m = batch.completion_mask_BT
    assert torch.allclose(full_BT * m, batch.sampler_logprobs_BT, atol=1e-5)
    assert torch.allclose(tail_BT * m, batch.sampler_logprobs_BT, atol=1e-5)
    assert (batch.sampler_logprobs_BT[m > 0] < 0).all()


def test_greedy_is_deterministic(tok):
    model = tiny_model(tok)
    engine = TransformersRollout(model, tok, max_new_tokens=5, temperature=0.0)
    a, b = engine.sample(PROMPTS, 2), engine.sample(PROMPTS, 2)
    assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
    assert a.completions[0] == a.completions[1]


@pytest.mark.parametrize("top_k", [0, 5])
def test_top_k_zero_samples_the_whole_vocabulary(tok, top_k):
    """top_k=0 must switch the filter off; transformers silently uses top-k 50 when it is left unset."""
    assert len(tok) > 60
    model = tiny_model(tok)
    with torch.no_grad():  # near-uniform next-token distribution
        model.lm_head.weight.mul_(0.01)
    torch.manual_seed(0)
    batch = TransformersRollout(model, tok, max_new_tokens=1, top_k=top_k).sample(PROMPTS[:1], 400)
    first_tokens = {c.token_ids[0] for c in batch.completions}
    if top_k == 0:
        assert len(first_tokens) > 55, len(first_tokens)
    else:
        assert len(first_tokens) <= 5


def test_micro_batches_keep_groups(tok):
    model = tiny_model(tok)
    batch = TransformersRollout(model, tok, max_new_tokens=4).sample(PROMPTS, 2)
    parts = batch.micro_batches(2)
    assert [first for first, _ in parts] == [0, 2]
    first, second = parts[0][1], parts[1][1]
    assert first.prompts == PROMPTS[:2] and second.prompts == PROMPTS[2:]
    assert first.size == 4 and second.size == 2 and second.prompt_len == batch.prompt_len
    T = second.input_ids_BT.shape[1]
    assert torch.equal(second.input_ids_BT, batch.input_ids_BT[4:, :T])
    assert batch.attention_mask_BT[4:, T:].sum() == 0  # only padding was cut
    assert second.completions == batch.completions[4:]
    with pytest.raises(ValueError):
        batch.micro_batches(0)


def test_bad_settings_raise(tok):
    model = tiny_model(tok)
    with pytest.raises(ConfigError, match="top_p"):
        TransformersRollout(model, tok, top_p=0.0)
    with pytest.raises(ConfigError, match="group_size"):
        TransformersRollout(model, tok).sample(PROMPTS, 0)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ConfigError, match="chat template"):
        TransformersRollout(model, bare).sample(PROMPTS, 1)
    raw = TransformersRollout(model, bare, use_chat_template=False, max_new_tokens=2).sample(PROMPTS[:1], 1)
    assert tok.decode(raw.input_ids_BT[0, : raw.prompt_len]) == "hi"


def test_selected_logprobs_matches_full_softmax_and_peft(tok):
    peft = pytest.importorskip("peft")
    model = tiny_model(tok)
    torch.manual_seed(3)
    ids_BT = torch.randint(4, len(tok), (3, 7))
    mask_BT = torch.ones_like(ids_BT)
    mask_BT[0, :2] = 0  # left padding
    position_ids = (mask_BT.cumsum(-1) - 1).clamp(min=0)

    def reference(m):
        logits = m(input_ids=ids_BT, attention_mask=mask_BT, position_ids=position_ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
        return torch.cat([torch.zeros(3, 1), logp], 1)

    with torch.no_grad():
        assert torch.allclose(selected_logprobs(model, ids_BT, mask_BT, chunk_rows=2), reference(model), atol=1e-5)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        got = selected_logprobs(lora, ids_BT, mask_BT)
        assert torch.allclose(got, reference(lora), atol=1e-5)
        assert not torch.allclose(got, reference(lora.get_base_model().__class__(model.config)), atol=1e-3)
    # Gradients reach the adapters, also with the head recomputed in backward.
    for recompute in (False, True):
        lora.zero_grad()
        selected_logprobs(lora, ids_BT, mask_BT, recompute_head=recompute).sum().backward()
        grads = [p.grad for n, p in lora.named_parameters() if "lora_" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_last_number_checker_and_greedy_accuracy(tok):
    from opd_sdk.train.evaluate import greedy_accuracy, last_number_matches

    item = PromptItem(prompt="What is 6 times 7?", answer="42")
    assert last_number_matches("It is 42.", item)
    assert last_number_matches("6*7 = 42", item)
    assert not last_number_matches("42 or 41", item)
    assert not last_number_matches("no idea", item)
    assert last_number_matches("1,042 - 1,000 = 42.0", item)
    with pytest.raises(ConfigError, match="answer"):
        last_number_matches("1", PromptItem(prompt="x"))
    model = tiny_model(tok)
    seen = []

    def first_two(text, p):
        seen.append(p.prompt)
        return p.prompt in ("hi", "ok")

    result = greedy_accuracy(model, tok, PROMPTS, first_two, max_new_tokens=3, batch_size=2)
    assert (result.correct, result.total) == (2, 3) and result.accuracy == pytest.approx(2 / 3)
    assert seen == ["hi", "What is 2+3?", "ok"] and len(result.completions) == 3


def test_shared_prefix_logprobs_equal_full_forward_with_gradients(tok):
    from opd_sdk.rollout.logprobs import shared_prefix_group

    model = tiny_model(tok, seed=4)
    engine = TransformersRollout(model, tok, max_new_tokens=6)
    torch.manual_seed(4)
    batch = engine.sample(PROMPTS, 3)  # left-padded prompts of different lengths, G = 3
    ids, mask, L = batch.input_ids_BT, batch.attention_mask_BT, batch.prompt_len
    assert shared_prefix_group(ids, mask, L) == 3
    mixed = [0, 3, 1, 2, 4, 5, 6, 7, 8]
    assert shared_prefix_group(ids[mixed], mask[mixed], L) == 1  # not prompt-major: no sharing
    results = {}
    for share in (False, True):
        model.zero_grad()
        lp_BT = selected_logprobs(model, ids, mask, from_col=L, share_prefix=share)
        (lp_BT * batch.completion_mask_BT).sum().backward()
        results[share] = (lp_BT.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    m = batch.completion_mask_BT
    assert torch.allclose(plain * m, shared * m, atol=1e-5)
    assert torch.allclose(shared * m, batch.sampler_logprobs_BT, atol=1e-5)
    for name, g in plain_grads.items():
        assert torch.allclose(g, shared_grads[name], atol=1e-5, rtol=1e-4), name
    assert plain_grads["model.layers.0.self_attn.q_proj.weight"].abs().sum() > 0  # prompt positions got gradient
