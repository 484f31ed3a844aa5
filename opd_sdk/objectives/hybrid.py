"""`Hybrid`: a weighted sum of objectives, e.g. a token-level and a sequence-level one.

    loss = sum_k weight_k * loss_k(policy, batch, feedback from source k)

This is the two halves of the unifying view at once: a token-level
divergence to a logprob teacher (`TokenDistill`) plus a sequence-level
reward (`RewardWeighted` on a verifier or judge), or an on-policy term plus
an `SFT` anchor. The terms share one forward pass per micro-batch: the
trainer runs the policy once over the union of the rows and texts the terms
read (`opd_sdk.tensors.forward`), and each term computes its loss from that.

Where each term's feedback comes from. Terms are (objective, weight,
source): `source` indexes the teacher whose feedback the term reads.
- One source (every term has source 0, the default): `feedback` is the
  usual list, one Feedback per prompt, and every term reads it.
- Several sources: give the `Trainer` one collector per source (in YAML,
  `teachers:` with `source: N` on each term); it asks them at the same
  time and passes, for every prompt, a tuple with one Feedback per source:
  `feedback = list(zip(feedback_teacher0, feedback_teacher1))`. This keeps
  slicing by prompt (micro-batches) unchanged. `feedback_sources` says how
  many teachers the trainer must run.

In YAML the terms are declared by `HybridParams`: `params: {terms: [{type,
params, weight, source}, ...]}`, each term an objective config of its own.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from opd_sdk.errors import ConfigError
from opd_sdk.objectives.base import LossOutput, SingleObjective, Term, run_loss
from opd_sdk.objectives.params import ObjectiveContext, ObjectiveParams
from opd_sdk.rollout.batch import RolloutBatch


class HybridTerm(BaseModel):
    """One term in YAML: an objective (`type`, `params`), its `weight`, and `source`, an index into `teachers:`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)
    weight: float
    source: int = Field(0, ge=0)


class HybridParams(ObjectiveParams):
    """Hybrid's parameters (YAML `objective.params`): the terms to add up, and their metric names."""

    terms: list[HybridTerm] = Field(min_length=1)
    names: list[str] | None = None


class Hybrid:
    """Weighted sum of objectives; see the module docstring.

    terms: (objective, weight) or (objective, weight, source) tuples.
    names: metric prefixes, one per term (default: the class names, lowercased).
    """

    params_model = HybridParams

    def __init__(self, terms: Sequence[tuple], names: Sequence[str] | None = None) -> None:
        if not terms:
            raise ConfigError("Hybrid needs at least one (objective, weight[, source]) term")
        parsed = []
        for k, term in enumerate(terms):
            if len(term) not in (2, 3):
                raise ConfigError(f"Hybrid term {k}: give (objective, weight) or (objective, weight, source)")
            objective, weight, source = term[0], float(term[1]), int(term[2]) if len(term) == 3 else 0
            if not isinstance(objective, SingleObjective) or source < 0:
                raise ConfigError(f"Hybrid term {k}: needs an objective with its own plan and compute (not a "
                                  f"Hybrid; got {type(objective).__name__}) and a source index >= 0")
            parsed.append((objective, weight, source))
        self.terms: list[tuple[SingleObjective, float, int]] = parsed
        self.feedback_sources = max(s for _, _, s in parsed) + 1
        default = [type(o).__name__.lower() for o, _, _ in parsed]
        names = list(names) if names is not None else [
            n if default.count(n) == 1 else f"{n}{k}" for k, n in enumerate(default)
        ]
        if len(names) != len(parsed) or len(set(names)) != len(names):
            raise ConfigError(f"Hybrid names must be {len(parsed)} distinct strings, got {names}")
        self.names = names
        kinds: list[str] = []
        for o, _, _ in parsed:
            kinds += [k for k in o.feedback_kinds if k not in kinds]
        self.feedback_kinds = tuple(kinds)

    @classmethod
    def from_params(cls, params: HybridParams, ctx: ObjectiveContext) -> "Hybrid":
        """Each term built by `ctx.build` from its own type and params."""
        if ctx.build is None:
            raise ConfigError("Hybrid.from_params needs ctx.build, the builder of its terms")
        terms = [(ctx.build(t.type, t.params, f"terms.{i}"), t.weight, t.source) for i, t in enumerate(params.terms)]
        return cls(terms, names=params.names)

    def setup(self, policy: torch.nn.Module) -> None:
        for objective, _, _ in self.terms:
            objective.setup(policy)

    def after_step(self, step: int, policy: torch.nn.Module) -> None:
        for objective, _, _ in self.terms:
            objective.after_step(step, policy)

    def split_feedback(self, feedback: Sequence[Any]) -> list[list[Any]]:
        """Per-source feedback lists from the per-prompt tuples (or the one list)."""
        if self.feedback_sources == 1:
            return [list(feedback)]
        lists: list[list[Any]] = [[] for _ in range(self.feedback_sources)]
        for p, entry in enumerate(feedback):
            if not isinstance(entry, (tuple, list)) or len(entry) != self.feedback_sources:
                raise ConfigError(
                    f"Hybrid reads {self.feedback_sources} feedback sources: feedback[{p}] must be a tuple "
                    "with one Feedback per source, e.g. list(zip(feedback_a, feedback_b))"
                )
            for s, fb in enumerate(entry):
                lists[s].append(fb)
        return lists

    @property
    def copies_student(self) -> bool:
        return any(o.copies_student for o, _, _ in self.terms)

    @property
    def min_group_size(self) -> int:
        return max(o.min_group_size for o, _, _ in self.terms)

    @property
    def chunk_rows(self) -> int:
        return min(o.chunk_rows for o, _, _ in self.terms)

    @property
    def recompute_head(self) -> bool:
        return any(o.recompute_head for o, _, _ in self.terms)

    def split(self, feedback: Sequence[Any]) -> list[Term]:
        """The weighted terms, each with the feedback of its source (the forward layer runs them together)."""
        per_source = self.split_feedback(feedback)
        return [Term(name, o, w, per_source[s]) for (o, w, s), name in zip(self.terms, self.names, strict=True)]

    def loss(self, policy: torch.nn.Module, batch: RolloutBatch, feedback: Sequence[Any]) -> LossOutput:
        return run_loss(self, policy, batch, feedback)

    def state_dict(self) -> dict[str, Any]:
        """Each term's state under its name (terms that keep nothing left out)."""
        states = {name: o.state_dict() for (o, _, _), name in zip(self.terms, self.names, strict=True)}
        return {name: state for name, state in states.items() if state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for (o, _, _), name in zip(self.terms, self.names, strict=True):
            if name in state:
                o.load_state_dict(state[name])
