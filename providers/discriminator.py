"""The GAD discriminator: a causal LM with a scalar head, trained with the Bradley-Terry loss.

Generative Adversarial Distillation (Ye et al. 2025, "Black-Box On-Policy
Distillation of Large Language Models", arXiv 2511.10643): the discriminator
D(x, y) reads a prompt and an answer and returns one number; it is trained so
that the teacher's answer y_t scores above the student's y_s for the same
prompt x, with the Bradley-Terry loss

    L_D = E_x E_{y_t, y_s} [ -log sigmoid( D(x, y_t) - D(x, y_s) ) ]

averaged here over every (teacher answer, student answer) pair of every
prompt of the batch. As in the paper, D is the student's network (or a model
the user names) with a linear head on the final hidden state of the answer's
last token (we append the tokenizer's EOS to every answer, teacher's and
student's alike, so the score is read at the same kind of token).

`Discriminator` is the module; `bt_loss` the loss (a pure function of scores);
`bt_update` one optimizer step on a batch; `check_fits` the memory check run
before training.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from opd_sdk.errors import ConfigError


class Discriminator(torch.nn.Module):
    """backbone (a Hugging Face causal LM) + head: Linear(hidden_size, 1).

    forward(input_ids_BT, attention_mask_BT) -> scores_B (float32): the head on the last
    hidden state at each row's last real token. Rows are right-padded (mask 1 then 0).
    lora: None (every backbone weight trains) or a dict of peft `LoraConfig` arguments (the
    backbone is frozen but for the adapter; the head always trains).
    """

    def __init__(self, backbone: torch.nn.Module, *, lora: dict[str, Any] | None = None) -> None:
        super().__init__()
        hidden = getattr(getattr(backbone, "config", None), "hidden_size", None)
        if not isinstance(hidden, int):
            raise ConfigError("the discriminator model has no config.hidden_size; give a Hugging Face causal LM")
        if lora:
            from peft import LoraConfig, get_peft_model

            backbone = get_peft_model(backbone, LoraConfig(**{"task_type": "CAUSAL_LM", **lora}))
        else:
            for p in backbone.parameters():
                p.requires_grad_(True)
        self.backbone = backbone.eval()  # no dropout: scores and their gradients come from the same function
        param = next(backbone.parameters())
        self.head = torch.nn.Linear(hidden, 1, device=param.device, dtype=torch.float32)
        torch.nn.init.normal_(self.head.weight, std=hidden ** -0.5)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
        kwargs = {"input_ids": input_ids_BT, "attention_mask": attention_mask_BT, "output_hidden_states": True,
                  "use_cache": False}
        try:  # the LM head only at one position: its [B, T, V] logits are never needed
            out = self.backbone(**kwargs, logits_to_keep=1)
        except TypeError:
            out = self.backbone(**kwargs)
        hidden_BTH = out.hidden_states[-1]
        last_B = attention_mask_BT.sum(-1) - 1
        hidden_BH = hidden_BTH[torch.arange(hidden_BTH.shape[0], device=hidden_BTH.device), last_B]
        return self.head(hidden_BH.float()).squeeze(-1)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer moves (all of them, or LoRA's and the head's), by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}


def bt_loss(scores_R: torch.Tensor, teacher_K: torch.Tensor, student_K: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Bradley-Terry loss over K pairs: mean_k -log sigmoid(s[teacher_k] - s[student_k]).

    scores_R: one score per row (teacher and student answers together); teacher_K, student_K:
    row indices of each pair's teacher and student answer. Returns (loss, metrics) with
    accuracy = fraction of pairs where the teacher's answer scores strictly higher, and
    margin = mean(s_teacher - s_student).
    """
    diff_K = scores_R[teacher_K] - scores_R[student_K]
    loss = F.softplus(-diff_K).mean()  # -log sigmoid(d) = softplus(-d)
    d_K = diff_K.detach()
    stats = {"loss": float(loss.detach()), "accuracy": float((d_K > 0).float().mean()), "margin": float(d_K.mean())}
    return loss, stats


def score_rows(model: Discriminator, rows: list[list[int]], *, pad_id: int, chunk_rows: int,
               grad_R: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of `rows` (token id lists), `chunk_rows` at a time: scores_R (float32, detached).

    With grad_R, also backpropagates sum_r grad_R[r] * score_r chunk by chunk (the gradient of
    a loss of the scores, given d loss / d score): memory stays one chunk's activations.
    """
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start:start + chunk_rows]
        width = max(len(r) for r in chunk)
        ids_BT = torch.tensor([r + [pad_id] * (width - len(r)) for r in chunk], device=device)
        mask_BT = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=device)
        if grad_R is None:
            with torch.no_grad():
                out.append(model(ids_BT, mask_BT))
        else:
            scores_B = model(ids_BT, mask_BT)
            (scores_B * grad_R[start:start + len(chunk)].to(scores_B.device)).sum().backward()
            out.append(scores_B.detach())
    return torch.cat(out).float()


def bt_update(model: Discriminator, optimizer: torch.optim.Optimizer, rows: list[list[int]],
              teacher_K: torch.Tensor, student_K: torch.Tensor, *, pad_id: int, chunk_rows: int,
              max_grad_norm: float | None) -> tuple[torch.Tensor, dict]:
    """One optimizer step of the Bradley-Terry loss on `rows`; returns (scores_R before the step,
    their metrics: loss, accuracy, margin). Two passes: scores without a graph, d loss / d score
    from them, then the graph one chunk at a time (`score_rows` with grad_R)."""
    scores_R = score_rows(model, rows, pad_id=pad_id, chunk_rows=chunk_rows)
    s_R = scores_R.clone().requires_grad_(True)
    loss, stats = bt_loss(s_R, teacher_K, student_K)
    (grad_R,) = torch.autograd.grad(loss, s_R)
    optimizer.zero_grad(set_to_none=True)
    score_rows(model, rows, pad_id=pad_id, chunk_rows=chunk_rows, grad_R=grad_R)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(model.trainable().values()), max_grad_norm)
    optimizer.step()
    return scores_R, stats


def free_memory_bytes(device: torch.device) -> int:
    """Free memory where the discriminator lives: the GPU's (torch.cuda.mem_get_info) or the
    machine's available RAM (/proc/meminfo's MemAvailable, else sysconf)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def needed_bytes(model: torch.nn.Module, *, lora: bool) -> int:
    """Bytes a discriminator built from `model` adds: a copy of its weights, and for every weight
    that trains a gradient and AdamW's two moments (with LoRA, the adapter: counted as 2% of the
    weights, an upper bound for the usual ranks)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = weights // 50 if lora else weights
    return weights + 3 * trainable


def check_fits(model: torch.nn.Module, device: torch.device, *, lora: bool, free_bytes: int | None = None) -> None:
    """ConfigError, before anything is copied, when a discriminator built from `model` cannot fit
    in the free memory of `device` (`needed_bytes`; free_bytes: measured when None)."""
    need = needed_bytes(model, lora=lora)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    if need > free:
        gib = 1024 ** 3
        raise ConfigError(
            f"the GAD discriminator needs about {need / gib:.2f} GiB on {device} (a copy of the weights, "
            f"gradients and AdamW state) and {free / gib:.2f} GiB is free; train it with LoRA (lora: {{r: 16}} "
            "in the gad teacher section), name a smaller discriminator model (discriminator: NAME), or free memory"
        )
