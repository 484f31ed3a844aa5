"""What the installed vLLM can do: its version per rollout path, whether it imports, and the
`logprobs_mode` that returns the sampler log-probs the loop needs. Imports no vLLM itself."""

from __future__ import annotations

from opd_sdk.errors import ConfigError

VERIFIED_VLLM = "0.32.0"
# The oldest vLLM each path can work with: reload_weights(weights_iterator / weights_path)
# (reported on 0.14.0 in vLLM issue #32718); logprobs_mode and return_token_ids (0.10.2).
MIN_VLLM = {"colocate": "0.14.0", "server-full": "0.14.0", "server-lora": "0.10.2"}


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_vllm_version(path: str, version: str) -> None:
    """Raises ConfigError when vLLM `version` is older than `path` ("colocate",
    "server-full", "server-lora") needs; the message names the field to change."""
    need = MIN_VLLM[path]
    if _version_tuple(version) < _version_tuple(need):
        field = "rollout.mode" if path == "colocate" else "rollout.weight_sync"
        raise ConfigError(
            f"{field}: vLLM {version} is too old for {path} rollouts (needs >= {need}; verified on "
            f"{VERIFIED_VLLM}); upgrade vLLM, or use another mode / weight_sync"
        )


def vllm_available() -> bool:
    """Whether `import vllm` works here (it may fail beside a torch it was not built for)."""
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 (any import failure means: not usable here)
        return False
    return True


def logprobs_mode_for(temperature: float, top_p: float, top_k: int) -> str:
    """The vLLM `logprobs_mode` whose sampled-token log-probs equal log softmax(logits / T).

    Raises ConfigError (naming rollout.top_p / top_k) when a filter is on at T != 1.
    """
    filtered = top_p < 1.0 or top_k > 0
    if not filtered:
        return "processed_logprobs"
    if temperature == 1.0:
        return "raw_logprobs"
    raise ConfigError(
        f"rollout.top_p / rollout.top_k: with engine vllm at temperature {temperature}, top_p {top_p}, "
        f"top_k {top_k}, vLLM cannot return log softmax(logits / T) of the sampled tokens (its processed "
        "log-probs are renormalised over the kept tokens); use top_p 1.0 and top_k 0, or temperature 1.0"
    )
