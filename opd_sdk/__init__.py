"""opd-sdk: on-policy distillation from black-box API teachers, and without any teacher.

The package is one folder per layer of the data flow; a module imports only from its own
layer or the layers below (tests/test_layers.py checks it):

    app/         opd train / eval / demo, the runner, the TRL bridge
    train/       the loop: sample -> collect -> loss -> step; micro-batches, pipeline, checkpoints, metrics
    config/      settings, the YAML run config, teacher and objective declarations, checks
    objectives/  plan + compute: feedback and one forward pass -> a loss
    tensors/     targets (Feedback -> tensors) and forward (one policy pass per micro-batch)
    losses/      pure functions of tensors
    providers/   (top-level package) every concrete Teacher
    feedback/    Teacher protocol, requests, FeedbackCollector, cache, retry, limits, usage
    rollout/     RolloutBatch, engines (transformers, vLLM colocated, vLLM server), log-probs
    parallel/    launch, Distributed, FSDP2, ZeRO, the parallel strategies
    errors, constants, redact, types, data, tasks, models: the vocabulary every layer shares

This module re-exports the public names; code inside the package imports from the layers.
"""

from opd_sdk.app.trl import as_reward_func
from opd_sdk.config.run import RunConfig, load_config
from opd_sdk.config.settings import LoopSettings, OptimizerSettings, RolloutSettings
from opd_sdk.data import PromptItem, PromptSampler, load_prompts
from opd_sdk.errors import (
    AuthenticationFailed,
    BadResponse,
    ClientError,
    ConfigError,
    CorruptedFile,
    OPDError,
    RateLimited,
    Refused,
    ServerError,
    TeacherConnectionError,
    TeacherError,
    TeacherTimeout,
    TokenizationMismatch,
    TrainingFailed,
    TrainingStopped,
    Truncated,
    Unsupported,
)
from opd_sdk.feedback.cache import FeedbackCache
from opd_sdk.feedback.calls import BudgetReached
from opd_sdk.feedback.collector import FeedbackCollector
from opd_sdk.feedback.factory import Collector, make_collector
from opd_sdk.feedback.local import LocalRunner
from opd_sdk.feedback.requests import build_requests
from opd_sdk.feedback.teacher import (
    FollowsStudent,
    LocalTeacher,
    Teacher,
    fingerprint,
    tokenizer_fingerprint,
)
from opd_sdk.feedback.usage import Usage
from opd_sdk.objectives import (
    OBJECTIVES,
    SFT,
    SPIN,
    Hybrid,
    LossOutput,
    Objective,
    OnlineDPO,
    RejectionSampling,
    RewardWeighted,
    TokenDistill,
)
from opd_sdk.rollout.batch import RolloutBatch
from opd_sdk.rollout.build import build_rollout_engine
from opd_sdk.rollout.engine import RolloutEngine, TransformersRollout
from opd_sdk.rollout.logprobs import selected_logprobs
from opd_sdk.rollout.vllm_colocated import VLLMRollout
from opd_sdk.train.evaluate import EvalResult, greedy_accuracy, last_number_matches
from opd_sdk.train.metrics import MetricsLogger, read_metrics
from opd_sdk.train.trainer import Trainer
from opd_sdk.types import (
    MISSING,
    CallUsage,
    ChatMessage,
    Completion,
    Feedback,
    FeedbackFailure,
    FeedbackRequest,
    Preference,
    PreferencePair,
    Reference,
    Score,
    TokenLogprobs,
)

__all__ = [
    "AuthenticationFailed",
    "BadResponse",
    "BudgetReached",
    "ClientError",
    "Collector",
    "CorruptedFile",
    "FollowsStudent",
    "LocalRunner",
    "LocalTeacher",
    "LoopSettings",
    "MISSING",
    "OptimizerSettings",
    "RateLimited",
    "Refused",
    "RolloutSettings",
    "ServerError",
    "TeacherConnectionError",
    "TeacherTimeout",
    "TrainingFailed",
    "TrainingStopped",
    "Truncated",
    "Unsupported",
    "make_collector",
    "tokenizer_fingerprint",
    "OBJECTIVES",
    "LossOutput",
    "Objective",
    "RewardWeighted",
    "SFT",
    "SPIN",
    "Hybrid",
    "OnlineDPO",
    "RejectionSampling",
    "TokenDistill",
    "CallUsage",
    "ChatMessage",
    "Completion",
    "ConfigError",
    "Feedback",
    "FeedbackCache",
    "FeedbackCollector",
    "FeedbackFailure",
    "FeedbackRequest",
    "OPDError",
    "Preference",
    "PreferencePair",
    "PromptItem",
    "Reference",
    "RolloutBatch",
    "Score",
    "Teacher",
    "TeacherError",
    "TokenLogprobs",
    "TokenizationMismatch",
    "Usage",
    "fingerprint",
    "EvalResult",
    "MetricsLogger",
    "PromptSampler",
    "RolloutEngine",
    "Trainer",
    "TransformersRollout",
    "VLLMRollout",
    "build_rollout_engine",
    "build_requests",
    "greedy_accuracy",
    "last_number_matches",
    "load_prompts",
    "read_metrics",
    "selected_logprobs",
    "RunConfig",
    "as_reward_func",
    "load_config",
]
