"""Concrete teachers (adapters). Each engineer adds their own export lines."""

# The core first: importing any opd_sdk module runs opd_sdk/__init__.py, whose config layer imports the
# providers below; begun from inside providers.client, that would find providers.client half-initialized.
import opd_sdk.constants  # noqa: F401

from providers.client import Endpoint
from providers.compose import (
    Gate,
    PreferenceScores,
    WeightedSum,
    bradley_terry,
    win_rates,
)
from providers.gad import DiscriminatorTeacher
from providers.judge import JudgeTeacher
from providers.logprob import LogprobTeacher
from providers.preference import PreferenceTeacher
from providers.reference import ReferenceTeacher
from providers.reward_model import RewardModelTeacher
from providers.self_distill import PrivilegedTemplate, SelfDistillTeacher
from providers.verifier import VerifierTeacher, extract_number, last_boxed

__all__ = [
    "Endpoint",
    "Gate",
    "JudgeTeacher",
    "LogprobTeacher",
    "PreferenceScores",
    "PreferenceTeacher",
    "ReferenceTeacher",
    "RewardModelTeacher",
    "VerifierTeacher",
    "WeightedSum",
    "bradley_terry",
    "extract_number",
    "last_boxed",
    "win_rates",
    "PrivilegedTemplate",
    "SelfDistillTeacher",
    "DiscriminatorTeacher",
]
