"""Objectives: turn a batch of student samples plus teacher feedback into a loss.

The unifying view (from the survey this project grows from): on-policy
distillation minimises a divergence between teacher and student measured
on the student's own samples.

- Token-level feedback (teacher log-probs, `TokenLogprobs`):
      E_{y ~ student} [ sum_t D_f( p_T(.|x, y<t) || p_S(.|x, y<t) ) ]
  for an f-divergence D_f (forward KL, reverse KL, generalised JSD, total
  variation): `TokenDistill`.
- Sequence-level feedback (a score, a preference, a reference text):
      E_{y ~ student} [ R(y) ] - beta KL( student || reference )
  with R what the teacher says about the whole answer: `RewardWeighted`
  (policy gradient), `RejectionSampling` (fine-tune on the best samples),
  `OnlineDPO` (pairs), `SPIN` (teacher or dataset text as the "real" side).
- `SFT` is the off-policy baseline (the expectation is over the reference
  text, not the student's samples); `Hybrid` adds a token-level and a
  sequence-level objective.

Every objective follows the `Objective` protocol in `base.py` (what the trainer,
config checks and checkpoint read) and is either a `SingleObjective`, with a
`plan` (feedback -> tensors, once per batch, via `opd_sdk.tensors.targets`) and
a `compute` (its loss from the trainer's one forward pass,
`opd_sdk.tensors.forward`), or a `Composite` of weighted single ones (`Hybrid`);
the loss math is pure functions in `opd_sdk.losses`. Each objective
declares its parameters beside its class (`<Name>Params`, see `params.py`):
its constructor and the YAML `params:` are checked by that one model.
`OBJECTIVES` maps config names to classes.
"""

from opd_sdk.objectives.base import Composite, LossOutput, Objective, SingleObjective
from opd_sdk.objectives.hybrid import Hybrid
from opd_sdk.objectives.online_dpo import OnlineDPO
from opd_sdk.objectives.params import Declared, ObjectiveContext, ObjectiveParams
from opd_sdk.objectives.rejection_sampling import RejectionSampling
from opd_sdk.objectives.reward_weighted import RewardWeighted
from opd_sdk.objectives.sft import SFT
from opd_sdk.objectives.spin import SPIN
from opd_sdk.objectives.token_distill import TokenDistill

OBJECTIVES: dict[str, type[Declared]] = {
    "reward_weighted": RewardWeighted,
    "rejection_sampling": RejectionSampling,
    "sft": SFT,
    "spin": SPIN,
    "online_dpo": OnlineDPO,
    "token_distill": TokenDistill,
    "hybrid": Hybrid,
}

__all__ = [
    "OBJECTIVES",
    "Composite",
    "Hybrid",
    "LossOutput",
    "Objective",
    "ObjectiveContext",
    "ObjectiveParams",
    "OnlineDPO",
    "RejectionSampling",
    "RewardWeighted",
    "SFT",
    "SPIN",
    "SingleObjective",
    "TokenDistill",
]
