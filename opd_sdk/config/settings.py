"""The training settings, declared once: defaults, bounds and meaning.

The YAML config uses these models as its sections (`optimizer:`,
`rollout:`, and the top-level loop fields), and the `Trainer` receives them
validated; nothing else restates a default. `Trainer(..., lr=3e-6,
group_size=8)` keyword arguments are routed to the model that declares the
field (`settings_from_kwargs`).
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from opd_sdk.errors import ConfigError


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class OptimizerSettings(_Settings):
    """AdamW and its schedule.

    lr: peak learning rate. betas, weight_decay: AdamW's.
    max_grad_norm: clip the global gradient L2 norm to this (None: no clipping).
    warmup_steps: linear warmup from ~0 to lr. schedule: after warmup,
        constant, linear decay to 0, or cosine decay to 0 at the last step.
    grad_accum: micro-batches per optimizer step (prompt groups are split
        evenly; the gradient equals the one big batch's).
    """

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    grad_accum: int = Field(1, gt=0)


class RolloutSettings(_Settings):
    """How the student samples: P prompts a step, G samples each.

    temperature / top_p / top_k: the sampler's (top_k 0: off).
    max_new_tokens: completion length cap (tokens, EOS included).
    tis_cap: truncated importance sampling: policy-gradient terms are
        weighted per token by min(p_trainer / p_sampler, tis_cap), detached
        (corrects samples whose sampler log-probs differ from the trainer's:
        another engine, or stale weights). None: on (2.0) when the engine's
        log-probs are not the trainer's own (`RolloutEngine.exact_logprobs`
        False), else off. 0: off.
    max_staleness: 0 (default): sample, collect, update in turn. k >= 1:
        keep the rollouts and feedback of the next k steps in flight while
        the current step updates (opd_sdk.train.pipeline); truncated importance
        sampling is then on (tis_cap 2.0 unless set).

    Engine (see README "Fast rollouts on vLLM"):
    engine: "transformers" (`generate` on the trainer's model), "vllm", or
        "auto" (vLLM when it imports and the device suits it, else
        transformers; the choice is logged).
    mode: vLLM only. "colocate": a `vllm.LLM` in the training process; the
        new weights are loaded into it in place after every step.
        "server": a separate vLLM OpenAI-compatible server at `base_url`.
    base_url: the server's OpenAI base URL (".../v1"); mode "server" only.
    served_model: the model name the server answers to (None: its first).
    weight_sync: how the new weights reach vLLM after a step. "full": every
        weight (LoRA merged into it; colocate: in memory; server: a
        safetensors file in `sync_dir` and the server's `reload_weights`
        RPC, which needs VLLM_SERVER_DEV_MODE=1 there). "lora": the LoRA
        adapter only (server: /v1/load_lora_adapter, which needs
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 and --enable-lora there;
        colocate: a LoRARequest per step). "auto": colocate "full";
        server "lora" for a LoRA student, else "full".
    sync_dir: where weights for a server are written (a folder both
        processes can read; None: a temporary folder, in /dev/shm when it
        exists).
    gpu_memory_utilization: colocate on GPU: the share of GPU memory vLLM
        may take (weights + KV cache); the trainer needs the rest.
    sleep_mode: colocate on GPU: vLLM frees its KV cache and offloads its
        weights while the trainer updates (no sleep mode on CPU).
    max_model_len: vLLM's context cap in tokens (prompt + completion).
    enforce_eager: colocate: skip vLLM's compilation (CPU default True:
        starts in seconds instead of minutes).
    kv_cache_gb: CPU only: the KV cache size (VLLM_CPU_KVCACHE_SPACE).
"""

    prompts_per_step: int = Field(8, gt=0)
    group_size: int = Field(4, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(0, ge=0)
    tis_cap: float | None = Field(None, ge=0)
    max_staleness: int = Field(0, ge=0)
    engine: Literal["transformers", "vllm", "auto"] = "transformers"
    mode: Literal["colocate", "server"] = "colocate"
    base_url: str | None = None
    served_model: str | None = None
    weight_sync: Literal["auto", "full", "lora"] = "auto"
    sync_dir: str | None = None
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1.0)
    sleep_mode: bool = False
    max_model_len: int = Field(1024, gt=0)
    enforce_eager: bool | None = None
    kv_cache_gb: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _engine_fields_agree(self) -> "RolloutSettings":
        if self.mode == "server" and self.engine != "transformers" and not self.base_url:
            raise ValueError("rollout.base_url: mode 'server' needs the vLLM server's URL (http://host:port/v1)")
        if self.base_url and self.mode != "server":
            raise ValueError("rollout.base_url: only used with mode 'server'; set mode: server or drop base_url")
        if self.engine == "transformers" and (self.mode != "colocate" or self.weight_sync != "auto"):
            raise ValueError("rollout.engine: mode and weight_sync are vLLM settings; set engine: vllm (or auto)")
        if self.engine != "transformers" and self.max_model_len <= self.max_new_tokens:
            raise ValueError(
                f"rollout.max_model_len: {self.max_model_len} leaves no room for the prompt with "
                f"max_new_tokens {self.max_new_tokens}; raise it"
            )
        return self


class LoopSettings(_Settings):
    """The loop around the steps.

    steps: optimizer steps to run. seed: sampling, shuffling and init.
    save_every: checkpoint every N steps (None or 0: only at the end). A checkpoint
        is also written at the end, on Ctrl-C / SIGTERM, and when training
        stops for lack of signal or budget.
    keep_checkpoints: how many of the newest step-N/ checkpoints to keep.
    max_no_signal_steps: after this many consecutive steps in which failed
        teacher calls left no sample with a learning signal, save a
        checkpoint and stop with an error naming the failures.
    max_failed_step_share: a run whose failed steps (teacher failures left no sample with
        a learning signal, so no weight moved) are more than this share of its steps did not
        learn: it ends with `TrainingFailed` (exit status 2 from `opd train`) after saving a
        checkpoint, and saves no final/ (a run shorter than max_no_signal_steps whose every
        teacher call failed included). 1.0: off.
    flat_group_tolerance: a prompt group whose valid rewards span at most
        this (max - min) is flat: advantage exactly 0, counted as no signal.
    shuffle: shuffle the prompts each epoch.
    """

    steps: int = Field(100, ge=0)
    seed: int = 0
    save_every: int | None = Field(25, ge=0)
    keep_checkpoints: int = Field(3, gt=0)
    max_no_signal_steps: int = Field(3, gt=0)
    max_failed_step_share: float = Field(0.5, ge=0.0, le=1.0)
    flat_group_tolerance: float = Field(1e-6, ge=0)
    shuffle: bool = True


# Older Trainer keyword names, kept working.
ALIASES = {"max_steps": "steps", "lr_schedule": "schedule"}
SETTINGS_MODELS = (OptimizerSettings, RolloutSettings, LoopSettings)


def settings_from_kwargs(
    optimizer: OptimizerSettings | None = None,
    rollout: RolloutSettings | None = None,
    loop: LoopSettings | None = None,
    **kwargs: Any,
) -> tuple[OptimizerSettings, RolloutSettings, LoopSettings]:
    """Validated settings from given models plus flat keyword overrides.

    Raises ConfigError naming an unknown keyword (with the closest valid
    name) or a value out of bounds.
    """
    given = [optimizer or OptimizerSettings(), rollout or RolloutSettings(), loop or LoopSettings()]
    updates: list[dict[str, Any]] = [{}, {}, {}]
    known = [name for m in SETTINGS_MODELS for name in m.model_fields] + list(ALIASES)
    for name, value in kwargs.items():
        field = ALIASES.get(name, name)
        for i, model in enumerate(SETTINGS_MODELS):
            if field in model.model_fields:
                updates[i][field] = value
                break
        else:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"Trainer: unknown setting {name!r}{hint}")
    out = []
    for model, current, update in zip(SETTINGS_MODELS, given, updates, strict=True):
        try:
            out.append(model.model_validate({**current.model_dump(), **update}))
        except ValidationError as exc:
            names = {ALIASES.get(k, k): k for k in kwargs}

            def where(loc: tuple) -> str:  # a field's error names the keyword given; a model check names its own
                return f"{names.get(str(loc[0]), loc[0])}: " if loc else ""

            problems = "; ".join(
                where(e["loc"]) + e["msg"].removeprefix("Value error, ") for e in exc.errors(include_input=False)
            )
            raise ConfigError(f"Trainer: {problems}") from None
    return out[0], out[1], out[2]
