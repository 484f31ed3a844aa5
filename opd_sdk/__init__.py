"""opd-sdk: on-policy distillation from black-box API teachers, and without any teacher."""

from opd_sdk.batch import RolloutBatch
from opd_sdk.cache import FeedbackCache
from opd_sdk.collector import FeedbackCollector, make_collector
from opd_sdk.config import RunConfig, load_config
from opd_sdk.data import PromptItem, PromptSampler, load_prompts
from opd_sdk.errors import (
    BadResponse,
    ClientError,
    ConfigError,
    OPDError,
    RateLimited,
    ServerError,
    TeacherConnectionError,
    TeacherError,
    TeacherTimeout,
    TokenizationMismatch,
    TrainingStopped,
    Truncated,
    Unsupported,
)
from opd_sdk.local import LocalRunner
from opd_sdk.evaluate import EvalResult, greedy_accuracy, last_number_matches
from opd_sdk.logprobs import selected_logprobs
from opd_sdk.metrics import MetricsLogger, read_metrics
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
from opd_sdk.rollout import RolloutEngine, TransformersRollout, build_rollout_engine
from opd_sdk.vllm_rollout import VLLMRollout
from opd_sdk.teacher import FollowsStudent, LocalTeacher, Teacher, fingerprint, tokenizer_fingerprint
from opd_sdk.settings import LoopSettings, OptimizerSettings, RolloutSettings
from opd_sdk.feedback import build_requests
from opd_sdk.trainer import Trainer
from opd_sdk.trl import as_reward_func
from opd_sdk.types import (
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
    MISSING,
    TokenLogprobs,
)
from opd_sdk.usage import Usage

__all__ = [
    "BadResponse",
    "ClientError",
    "FollowsStudent",
    "LocalRunner",
    "LocalTeacher",
    "LoopSettings",
    "MISSING",
    "OptimizerSettings",
    "RateLimited",
    "RolloutSettings",
    "ServerError",
    "TeacherConnectionError",
    "TeacherTimeout",
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
