"""The `Objective` protocols list exactly what the code reads: every registered objective satisfies them,
and an objective that shows the code nothing but the protocol's members trains, is checked and checkpoints.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

import pytest
import torch

from opd_sdk.config.registry import _objective_problems, build_objective
from opd_sdk.config.run import ObjectiveConfig, validate_config
from opd_sdk.data import PromptItem
from opd_sdk.objectives import OBJECTIVES, SPIN, Composite, Hybrid, Objective, RewardWeighted, SingleObjective
from opd_sdk.parallel.distributed import launch_problems
from opd_sdk.train.trainer import Trainer
from tests.loop_fixtures import tiny_model, tiny_tokenizer

PARAMS = {  # every registered objective, built the way a config builds it
    "reward_weighted": {},
    "rejection_sampling": {},
    "sft": {},
    "spin": {"source": "answer"},
    "online_dpo": {},
    "token_distill": {},
    "hybrid": {"terms": [{"type": "token_distill", "weight": 1.0}, {"type": "spin", "weight": 0.5, "source": 1}]},
}


def members(protocol: type) -> set[str]:
    """The names a protocol declares (its own and its protocol bases')."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names |= set(klass.__dict__.get("__annotations__", {}))
        names |= {n for n, v in klass.__dict__.items() if callable(v) and not n.startswith("_")}
    return names


def test_the_protocols_name_these_members():
    common = {"feedback_kinds", "chunk_rows", "recompute_head", "min_group_size", "copies_student", "setup",
              "after_step", "loss", "state_dict", "load_state_dict"}
    assert members(Objective) == common
    assert members(SingleObjective) == common | {"temperature", "frozen_models", "plan", "compute"}
    assert members(Composite) == common | {"terms", "feedback_sources", "split"}


def test_every_registered_objective_satisfies_the_protocol():
    assert set(PARAMS) == set(OBJECTIVES), "a new objective: add it to PARAMS"
    for name, params in PARAMS.items():
        objective = build_objective(ObjectiveConfig(type=name, params=params))
        assert isinstance(objective, Objective), name
        composite = name == "hybrid"
        assert isinstance(objective, Composite) is composite, name
        assert isinstance(objective, SingleObjective) is not composite, name
        if name not in ("spin", "hybrid"):
            assert objective.state_dict() == {}, f"{name} keeps no state between steps"
    hybrid = build_objective(ObjectiveConfig(type="hybrid", params=PARAMS["hybrid"]))
    assert hybrid.state_dict() == {"spin": {"refreshes": 0}}  # its stateless term left out
    assert hybrid.feedback_sources == 2 and hybrid.feedback_kinds == ("token_logprobs", "reference")
    assert hybrid.copies_student is True and hybrid.min_group_size == 1 and hybrid.recompute_head is False


def test_a_hybrid_term_must_be_a_single_objective():
    with pytest.raises(Exception, match="own plan and compute"):
        Hybrid([(Hybrid([(RewardWeighted(), 1.0)]), 1.0)])


class OnlyProtocol:
    """Shows the code nothing of `inner` but `protocol`'s members (any other name: AttributeError), and
    records which it read (a `runtime_checkable` isinstance check's probes are not reads)."""

    def __init__(self, inner: Any, protocol: type) -> None:
        self.__dict__.update(inner=inner, allowed=members(protocol), read=set())

    def __getattr__(self, name: str) -> Any:
        if name not in self.allowed:
            raise AttributeError(f"{name!r} is read but the protocol does not list it")
        if sys._getframe(1).f_globals.get("__name__") != "typing":
            self.read.add(name)
        return getattr(self.inner, name)


def test_the_code_reads_every_member_and_nothing_else(tmp_path):
    tok = tiny_tokenizer()
    objective = OnlyProtocol(SPIN(tok, source="answer", refresh_every=1), SingleObjective)
    prompts = [PromptItem(prompt=f"Say seven {d}", answer="7") for d in range(2)]

    def trainer() -> Trainer:
        return Trainer(tiny_model(tok, seed=0), tok, objective, None, prompts, group_size=2, prompts_per_step=2,
                       max_steps=1, lr=1e-2, max_new_tokens=4, seed=0, precision="fp32", output_dir=str(tmp_path))

    first = trainer()
    first.train()
    saved = first.save_checkpoint()
    first.close()
    trainer().resume(saved)  # the opponent and the refresh count come back through load_state_dict
    cfg = validate_config({"student": {"model": "smollm2"}, "data": {"task": "times_table"},
                           "objective": {"type": "spin", "params": {"source": "answer"}}})
    assert _objective_problems(cfg, objective) == []  # kinds and group size
    assert launch_problems(world_size=1, fsdp=True, prompts_per_step=2, objective=objective) != []  # the copy
    assert callable(objective.loss)  # the entry point for use outside the trainer: read by users, not by the package
    assert objective.read == members(SingleObjective)
    assert objective.inner.refreshes == 1
    assert isinstance(torch.load(saved / "objective.pt", weights_only=True)["refreshes"], int)
