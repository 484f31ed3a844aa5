"""Launched by tests/parallel/test_fsdp.py under `torchrun --nproc_per_node N` (N = 1 or 2, gloo on CPU).

Every rank also runs the single-process reference on an unsharded copy of the same model
(tiny, so cheap) and checks the sharded run against it. Prints `FSDP_OK rank=R` at the end;
any mismatch raises (non-zero exit).

argv: [output folder shared by the ranks]
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from opd_sdk.parallel.fsdp import (  # noqa: E402
    full_state_dict,
    grad_norm_clip,
    load_sharded,
    save_sharded,
    shard_model,
)
from opd_sdk.rollout.logprobs import Support, sequence_logprobs  # noqa: E402
from tests.loop_fixtures import tiny_model, tiny_tokenizer  # noqa: E402

ATOL = 1e-5
ROWS = 4


def batch(tok):
    """4 rows: one left-padded prompt shared by all, completions of 5, 3, 4, 1 tokens, right-padded."""
    pad = tok.pad_token_id
    prompt = [pad, pad] + tok("What is 2+3?")["input_ids"]
    completions = ["5.\n", "5!", "five", "6"]
    ids = [tok(c)["input_ids"] + [tok.eos_token_id] for c in completions]
    C = max(len(c) for c in ids)
    input_ids = torch.tensor([prompt + c + [pad] * (C - len(c)) for c in ids])
    attention = torch.tensor([[0, 0] + [1] * (len(prompt) - 2) + [1] * len(c) + [0] * (C - len(c)) for c in ids])
    completion = attention.clone()
    completion[:, : len(prompt)] = 0
    return input_ids, attention, completion, len(prompt)


def loss_of(model, rows, data, global_count):
    """Sum of the completion tokens' log-probs of `rows`, divided by the whole batch's token count.

    The LoRA model recomputes the head chunks in backward (recompute_head), the plain one does not.
    """
    input_ids, attention, completion, L = data
    recompute = hasattr(model, "get_base_model")
    lp = sequence_logprobs(model, input_ids[rows], attention[rows], from_col=L, chunk_rows=1,
                           recompute_head=recompute)
    return -(lp.selected[1.0] * completion[rows]).sum() / global_count


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def named_grads(model):
    return {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def named_weights(model):
    return {n: full(p.data).detach().clone() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict, what: str, atol: float = ATOL) -> None:
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want)))
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{what}: {name} differs by {diff:.3g}"


def as_dict(out) -> dict:
    return {f"t={t}": out.selected[t] for t in out.selected} | {"support": out.support_MK, "tail": out.log_tail_M}


def make_model(tok, lora: bool, seed: int = 0):
    model = tiny_model(tok, seed=seed)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed + 100)
        # init_lora_weights=False: B is random too, so A gets a gradient from the first step.
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.train()
    return model


def check(tok, lora: bool, folder: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batch(tok)
    count = float(data[2].sum())
    mine = list(range(rank * ROWS // world, (rank + 1) * ROWS // world))
    tag = "lora" if lora else "full"

    reference = make_model(tok, lora)
    sharded = shard_model(copy.deepcopy(reference))

    # 1. one backward: summed sharded gradients == single-process gradient over all rows
    ref_loss = loss_of(reference, list(range(ROWS)), data, count)
    ref_loss.backward()
    loss = loss_of(sharded, mine, data, count)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert abs(total.item() - ref_loss.item()) < ATOL, (tag, total.item(), ref_loss.item())
    want = named_grads(reference)
    assert any(g.abs().max() > 1e-4 for g in want.values()), "reference gradients are all zero"
    assert_close(named_grads(sharded), want, f"{tag} gradients")

    # no-grad reads: two temperatures and a top-k support, the rank's rows (the root reshards after)
    input_ids, attention, completion, L = data
    cols = torch.arange(L, input_ids.shape[1])
    support = Support(torch.zeros_like(cols), cols, torch.tensor([[5, 9, 11]] * len(cols)),
                      torch.tensor([[True, True, False]] * len(cols)))
    with torch.no_grad():
        kw = dict(temperatures=(1.0, 0.7), support=support, from_col=L, chunk_rows=1)
        got = sequence_logprobs(sharded, input_ids[mine], attention[mine], **kw)
        want = sequence_logprobs(reference, input_ids[mine], attention[mine], **kw)
    assert_close(as_dict(got), as_dict(want), f"{tag} no-grad log-probs")

    # 2. global grad norm and clipping, then AdamW steps: same weights as single process
    params_ref = [p for p in reference.parameters() if p.requires_grad]
    params = [p for p in sharded.parameters() if p.requires_grad]
    ref_norm = float(torch.nn.utils.clip_grad_norm_(params_ref, 0.05))
    norm = grad_norm_clip(params, 0.05)
    assert abs(norm - ref_norm) < ATOL * max(1.0, ref_norm), (tag, norm, ref_norm)
    assert_close(named_grads(sharded), named_grads(reference), f"{tag} clipped gradients")
    # lr 1e-3: AdamW's g / sqrt(v) magnifies float-rounding differences of small gradients (at lr 1e-2,
    # even the unsharded model fed the batch as two halves ends 5e-6 away from the whole batch; sharded 1.4e-5).
    opt_ref = torch.optim.AdamW(params_ref, lr=1e-3)
    opt = torch.optim.AdamW(params, lr=1e-3)
    before = named_weights(reference)
    for step in range(3):
        if step:
            loss_of(reference, list(range(ROWS)), data, count).backward()
            loss_of(sharded, mine, data, count).backward()
            torch.nn.utils.clip_grad_norm_(params_ref, 1.0)
            grad_norm_clip(params, 1.0)
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    after = named_weights(reference)
    moved = max((after[n] - before[n]).abs().max().item() for n in after)
    assert moved > 1e-3, f"{tag}: weights did not move ({moved})"
    assert_close(named_weights(sharded), after, f"{tag} weights after AdamW")

    # 3. full state dict: rank 0 only, equal to the reference's
    state = full_state_dict(sharded)
    if rank == 0:
        want_state = reference.state_dict()
        assert_close(state, {k: want_state[k] for k in state}, f"{tag} full state dict")
        tied = {k for k in want_state if k.endswith("lm_head.weight")}  # the embeddings' second name
        assert tied and set(want_state) - set(state) == tied, (tag, sorted(set(want_state) ^ set(state)))
        assert all(v.device.type == "cpu" for v in state.values())
    else:
        assert state == {}, f"rank {rank} got a state dict"

    # 4. sharded model + optimizer state round-trips into a fresh model: the next step is identical
    optim_dir = os.path.join(folder, f"sharded-{tag}")
    save_sharded(sharded, opt, optim_dir)
    restored = shard_model(make_model(tok, lora, seed=3))
    opt_restored = torch.optim.AdamW([p for p in restored.parameters() if p.requires_grad], lr=1e-3)
    load_sharded(restored, opt_restored, optim_dir)
    assert_close(named_weights(restored), named_weights(sharded), f"{tag} weights after load_sharded", atol=0.0)
    for model, optimizer in ((sharded, opt), (restored, opt_restored)):
        loss_of(model, mine, data, count).backward()
        optimizer.step()
        optimizer.zero_grad()
    loss_of(reference, list(range(ROWS)), data, count).backward()
    opt_ref.step()
    assert_close(named_weights(restored), named_weights(sharded), f"{tag} step after load_sharded", atol=0.0)
    assert_close(named_weights(sharded), named_weights(reference), f"{tag} step after save_sharded")

    # 5. save_pretrained from rank 0 with the full state dict; reload and compare
    state = full_state_dict(sharded)
    if rank == 0:
        out = os.path.join(folder, f"saved-{tag}")
        unwrapped = make_model(tok, lora, seed=2)
        unwrapped.save_pretrained(out, state_dict=state)
        if lora:
            from peft import PeftModel

            loaded = PeftModel.from_pretrained(tiny_model(tok, seed=0), out)
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(out)
        want_state = reference.state_dict()
        got_state = loaded.state_dict()
        assert_close({k: got_state[k] for k in want_state}, want_state, f"{tag} save_pretrained round trip")
    print(f"{tag} ok rank={rank}", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        tok = tiny_tokenizer()
        for lora in (False, True):
            check(tok, lora, sys.argv[1])
        dist.barrier()
        print(f"FSDP_OK rank={dist.get_rank()}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
