"""Training checkpoints that resume exactly.

A checkpoint folder `step-N/` holds:
    model/ or adapter/    save_pretrained output (full model, or the LoRA adapter only)
    optimizer.pt          optimizer state
    scheduler.pt          LR scheduler state
    rng.pt                python, numpy and torch (CPU + CUDA) RNG states
    objective.pt          the objective's state_dict(), when it has one (e.g. a SPIN opponent)
    trainer_state.json    step, prompt-sampler position, anything else the trainer keeps

A folder is written under a temporary name and renamed when complete, so a
crash mid-save never leaves a checkpoint that looks whole. Loading restores
all of it into an already-built trainer (same model architecture, same
optimizer setup); the next sampled batch is then the one the uninterrupted
run would have drawn.

Checkpoint files are pickles of our own state: load only checkpoints you wrote.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from opd_sdk.errors import ConfigError

STATE_FILE = "trainer_state.json"


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # numpy is optional
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"step-{step}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under output_dir, or None."""
    root = Path(output_dir)
    if not root.exists():
        return None
    found = [
        (int(p.name.split("-", 1)[1]), p)
        for p in root.glob("step-*")
        if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).exists()
    ]
    return max(found)[1] if found else None


def save_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    objective: Any = None,
    tokenizer: Any = None,
) -> Path:
    """Write a checkpoint folder at `path` (atomically); `state` must be JSON-serialisable."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / ("adapter" if is_peft(model) else "model"))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    if objective is not None and hasattr(objective, "state_dict"):
        torch.save(objective.state_dict(), tmp / "objective.pt")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _load_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors weights; is it a checkpoint written by opd-sdk?")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def _load_model_weights(model: torch.nn.Module, folder: Path) -> None:
    if is_peft(model):
        from peft import set_peft_model_state_dict

        if not (folder / "adapter").exists():
            raise ConfigError(f"{folder} holds a full model but the trainer's model is a LoRA model")
        weights = _load_safetensors_dir(folder / "adapter")
        result = set_peft_model_state_dict(model, weights)
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"{folder}: adapter weights do not fit this model: {result.unexpected_keys[:5]}")
        return
    if not (folder / "model").exists():
        raise ConfigError(f"{folder} holds a LoRA adapter but the trainer's model is not a LoRA model")
    weights = _load_safetensors_dir(folder / "model")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise ConfigError(f"{folder}: weights not in this model: {unexpected[:5]}; build the same architecture")
    # save_pretrained drops tied copies (lm_head = embeddings); anything else missing is an error.
    params = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    loaded_ptrs = {params[k].data_ptr() for k in weights if k in params}
    untied = [k for k in missing if k in params and params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ConfigError(f"{folder}: checkpoint lacks weights {untied[:5]}")


def load_checkpoint(
    path: str | Path,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    objective: Any = None,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, RNG and objective state; returns trainer_state.json."""
    folder = Path(path)
    if not (folder / STATE_FILE).exists():
        raise ConfigError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    _load_model_weights(model, folder)
    device = next(model.parameters()).device
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=False))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    if objective is not None and hasattr(objective, "load_state_dict") and (folder / "objective.pt").exists():
        objective.load_state_dict(torch.load(folder / "objective.pt", map_location=device, weights_only=False))
    set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
