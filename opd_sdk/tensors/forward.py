"""The forward layer: one policy pass per micro-batch, read by every objective term.

The trainer asks each objective (each `Hybrid` term) for a `Plan` once per
batch: which sampled rows its loss reads, which extra text rows (reference
answers) it scores, the teacher's top-k support, and the whole batch's unit
count its loss is divided by. For a micro-batch (a range of whole prompt
groups) `forward_micro` takes the union of what the terms need, runs the
policy ONCE over those sequences (sampled rows, then text rows; trunk once,
LM head per temperature and on the support), runs each frozen model an
objective declares (reference, SPIN opponent) once without gradients, and
hands each term a `View` of the outputs in its own row order.

Also measured here, on the sampled rows at the sampling temperature: the
mismatch between the trainer's and the sampler's log-probs (mean |delta|,
max ratio), and the truncated importance weights when `tis_cap` is set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from opd_sdk.losses.policy_gradient import truncated_importance_weights
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.logprobs import SequenceLogprobs, Support, sequence_logprobs
from opd_sdk.tensors.targets import TeacherSupport, text_rows


@dataclass
class Plan:
    """What one objective's loss reads from a batch, from its feedback, built once per step.

    rows_B: bool [B]: sampled rows whose log-probs the loss reads (others are not run).
    normaliser: the whole batch's unit count (tokens, rows or pairs) the loss sum is divided by.
    signal: how many samples / pairs / tokens carry a learning signal (0: nothing to learn).
    metrics: whole-batch numbers for the log (counters and means, final values).
    texts: (prompt index, student token ids) of extra rows to score (reference answers).
    support: the teacher's top-k support (top-k divergences), positions in batch rows.
    data: the objective's own whole-batch tensors (rewards, masks, pairs...).
    """

    rows_B: torch.Tensor
    normaliser: float
    signal: int
    metrics: dict[str, float]
    texts: list[tuple[int, list[int]]] = field(default_factory=list)
    support: TeacherSupport | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Part:
    """A micro-batch's share of a Plan (prompt groups [start, stop)).

    rows: long [R]: batch rows, ascending. texts: indices into plan.texts.
    support_M: long [M']: indices into the plan's support positions.
    """

    rows: torch.Tensor
    texts: list[int]
    support_M: torch.Tensor

    @staticmethod
    def of(plan: Plan, start: int, stop: int, group_size: int) -> "Part":
        lo, hi = start * group_size, stop * group_size
        rows = plan.rows_B.nonzero().squeeze(-1)
        rows = rows[(rows >= lo) & (rows < hi)]
        texts = [k for k, (p, _) in enumerate(plan.texts) if start <= p < stop]
        if plan.support is None:
            support_M = torch.zeros(0, dtype=torch.long)
        else:
            r = plan.support.rows_M.cpu()
            support_M = ((r >= lo) & (r < hi)).nonzero().squeeze(-1)
        return Part(rows.cpu(), texts, support_M)

    def empty(self) -> bool:
        return self.rows.numel() == 0 and not self.texts


class View:
    """One term's view of a micro-batch's forward outputs.

    T: columns of the sampled rows (the micro-batch's longest completion);
    text tensors have their own width. Row order is `part.rows` / `part.texts`.
    """

    def __init__(self, outputs: dict, row_index: torch.Tensor, text_index: torch.Tensor, T: int, T_text: int,
                 text_mask: torch.Tensor, support_index: torch.Tensor, weights: torch.Tensor | None) -> None:
        self._outputs = outputs  # key -> SequenceLogprobs over all sequences of the micro-batch
        self._rows = row_index
        self._texts = text_index
        self.T = T
        self._T_text = T_text
        self.text_mask = text_mask  # float [K, T_text]: 1 on the text tokens
        self._support = support_index
        self.weights = weights  # float [R, T] truncated importance weights, or None

    def policy(self, temperature: float = 1.0, model: str = "policy") -> torch.Tensor:
        """Log-probs of the part's sampled rows -> [R, T] (with gradients for the policy)."""
        return self._outputs[model].selected[temperature][self._rows, : self.T]

    def texts(self, temperature: float = 1.0, model: str = "policy") -> torch.Tensor:
        """Log-probs of the part's text rows -> [K, T_text]."""
        return self._outputs[model].selected[temperature][self._texts, : self._T_text]

    def support(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs on the part's support positions -> (logprobs_MK, log_tail_M)."""
        out = self._outputs["policy"]
        return out.support_MK[self._support], out.log_tail_M[self._support]


def idle_loss(policy: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A zero loss (scalar) from one policy pass over the batch's first row and one completion
    token: what a rank with nothing to run in a micro-batch backpropagates when its peers run
    theirs, so that a sharded model's (FSDP) per-pass collectives line up."""
    T = min(batch.prompt_len + 1, batch.input_ids_BT.shape[1])
    out = sequence_logprobs(policy, batch.input_ids_BT[:1, :T], batch.attention_mask_BT[:1, :T], from_col=T - 1)
    return out.selected[1.0].sum() * 0.0


def _pad_cols(x: torch.Tensor, T: int, value: int | float) -> torch.Tensor:
    if x.shape[1] >= T:
        return x
    return torch.nn.functional.pad(x, (0, T - x.shape[1]), value=value)


def forward_micro(
    policy: torch.nn.Module,
    batch: RolloutBatch,
    start: int,
    stop: int,
    entries: list[tuple[Any, Plan]],
    *,
    pad_id: int = 0,
    chunk_rows: int = 4,
    recompute_head: bool = False,
    tis_cap: float | None = None,
) -> tuple[list[tuple[View, Part] | None], dict[str, float]]:
    """Run the policy (once) and the declared frozen models over prompt groups [start, stop).

    entries: (objective, plan) per term. Returns one (View, Part) per term (None where
    the term reads nothing in this range) and mismatch statistics as sums:
    {"logprob_abs_diff_sum", "logprob_tokens", "max_ratio", "policy_passes"}.
    """
    G, L = batch.group_size, batch.prompt_len
    parts = [Part.of(plan, start, stop, G) for _, plan in entries]
    stats = {"logprob_abs_diff_sum": 0.0, "logprob_tokens": 0.0, "max_ratio": 0.0, "policy_passes": 0.0}
    if all(p.empty() for p in parts):
        return [None] * len(entries), stats
    device = batch.input_ids_BT.device
    rows_U = sorted({r for p in parts for r in p.rows.tolist()})
    position = {b: n for n, b in enumerate(rows_U)}
    used = batch.attention_mask_BT[rows_U].sum(0) > 0 if rows_U else torch.zeros(0, dtype=torch.bool)
    T = max(int(used.nonzero().max()) + 1, L) if used.any() else L
    texts = [plan.texts[k] for (_, plan), part in zip(entries, parts, strict=True) for k in part.texts]
    ids, attn = [batch.input_ids_BT[rows_U, :T]], [batch.attention_mask_BT[rows_U, :T]]
    T_text = L
    if texts:
        text_ids, text_attn, text_mask_all = text_rows(batch, texts, pad_id)
        T_text = text_ids.shape[1]
        ids.append(text_ids)
        attn.append(text_attn)
    T_all = max(T, T_text)
    ids_N = torch.cat([_pad_cols(x, T_all, pad_id) for x in ids])
    attn_N = torch.cat([_pad_cols(x, T_all, 0) for x in attn])

    # the support of every term, with rows renumbered into the sequences
    supports, support_slices = [], []
    for (_, plan), part in zip(entries, parts, strict=True):
        begin = sum(len(s[0]) for s in supports)
        if plan.support is not None and part.support_M.numel():
            sel = part.support_M.to(plan.support.rows_M.device)
            rows = torch.tensor([position[int(b)] for b in plan.support.rows_M[sel]], dtype=torch.long, device=device)
            supports.append((rows, plan.support.cols_M[sel], plan.support.ids_MK[sel], plan.support.mask_MK[sel]))
        support_slices.append(slice(begin, sum(len(s[0]) for s in supports)))
    support = None
    if supports:
        K = max(s[2].shape[1] for s in supports)
        support = Support(
            torch.cat([s[0] for s in supports]), torch.cat([s[1] for s in supports]),
            torch.cat([_pad_cols(s[2], K, 0) for s in supports]), torch.cat([_pad_cols(s[3], K, False) for s in supports]),
        )

    sampling_temperature = batch.temperature if batch.temperature > 0 else 1.0
    temps = {"policy": {sampling_temperature}}
    frozen: dict[str, torch.nn.Module] = {}
    for objective, _ in entries:
        t = objective.temperature(batch)
        temps["policy"].add(t)
        for name, model in objective.frozen_models().items():
            key = f"{name}@{id(model)}"
            frozen[key] = model
            temps.setdefault(key, set()).add(t)
    common = dict(chunk_rows=chunk_rows, recompute_head=recompute_head, from_col=L)
    outputs: dict[str, SequenceLogprobs] = {
        "policy": sequence_logprobs(policy, ids_N, attn_N, temperatures=tuple(sorted(temps["policy"])),
                                    support=support, **common)
    }
    stats["policy_passes"] = 1.0
    with torch.no_grad():
        for key, model in frozen.items():
            outputs[key] = sequence_logprobs(model, ids_N, attn_N, temperatures=tuple(sorted(temps[key])), **common)

    n_rows = len(rows_U)
    weights_UT = None
    if n_rows:
        lp_UT = outputs["policy"].selected[sampling_temperature][:n_rows, :T].detach()
        sampler_UT = batch.sampler_logprobs_BT[rows_U, :T].to(lp_UT.dtype)
        mask_UT = batch.completion_mask_BT[rows_U, :T] > 0
        delta_UT = torch.where(mask_UT, lp_UT - sampler_UT, torch.zeros_like(lp_UT))
        stats["logprob_abs_diff_sum"] = float(delta_UT.abs().sum())
        stats["logprob_tokens"] = float(mask_UT.sum())
        stats["max_ratio"] = float(torch.exp(delta_UT).max()) if mask_UT.any() else 0.0
        if tis_cap:
            weights_UT = truncated_importance_weights(lp_UT, sampler_UT, mask_UT.float(), tis_cap)

    views: list[tuple[View, Part] | None] = []
    text_offset = 0
    for (objective, plan), part, s_slice in zip(entries, parts, support_slices, strict=True):
        if part.empty():
            views.append(None)
            text_offset += len(part.texts)
            continue
        row_index = torch.tensor([position[int(b)] for b in part.rows], dtype=torch.long, device=device)
        text_index = torch.arange(n_rows + text_offset, n_rows + text_offset + len(part.texts), device=device)
        text_mask = text_mask_all[text_offset : text_offset + len(part.texts)] if texts else torch.zeros(0, T_text)
        text_offset += len(part.texts)
        support_index = torch.arange(s_slice.start, s_slice.stop, device=device)
        weights = weights_UT[row_index] if weights_UT is not None else None
        outs = {"policy": outputs["policy"]}
        outs.update({name: outputs[f"{name}@{id(m)}"] for name, m in objective.frozen_models().items()})
        views.append((View(outs, row_index, text_index, T, T_text, text_mask, support_index, weights), part))
    return views, stats
