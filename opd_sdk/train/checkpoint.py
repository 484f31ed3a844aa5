"""Training checkpoints that resume exactly.

A checkpoint folder `step-N/` holds:
    model/ or adapter/    save_pretrained output (full model, or the LoRA adapter only)
    optimizer.pt          optimizer state (one process, data parallel)
    sharded/              instead of the two above, for an FSDP-sharded student: model and
                          optimizer state as torch.distributed.checkpoint shards, one set
                          per rank (`opd_sdk.parallel.fsdp.FSDPStrategy`)
    deepspeed/            instead of optimizer.pt under DeepSpeed ZeRO: each rank's optimizer
                          partitions (`opd_sdk.parallel.zero.ZeroStrategy`)
    scheduler.pt          LR scheduler state
    rng.pt                python, numpy and torch (CPU + CUDA) RNG states (rank 0's in a launched job)
    rng-rank{r}.pt        rank r's RNG states, r >= 1 (multi-process jobs: each rank samples its own stream)
    objective.pt          the objective's state_dict(), when it has one (e.g. a SPIN opponent)
    teachers.pt           the state_dict() of each teacher that learns during the run (a GAD
                          discriminator: weights, optimizer, teacher texts), in order, when any
    trainer_state.json    step, the launch's world_size and zero_stage, prompt-sampler position,
                          anything else the trainer keeps

The optimizer state (and a sharded student) is the parallel strategy's to save and
load (`opd_sdk.parallel.strategy`); the rest is written here by rank 0.

A folder is written under a temporary name and renamed when complete, so a
crash mid-save never leaves a checkpoint that looks whole. Loading restores
all of it into an already-built trainer (same model architecture, same
optimizer setup); the next sampled batch is then the one the uninterrupted
run would have drawn.

Weights are safetensors; optimizer, scheduler, RNG and objective states are
plain tensors and numbers read back with `torch.load(weights_only=True)`, so
loading a checkpoint never runs arbitrary pickled code. JSON files saved next
to a model never hold an absolute path of this machine (`scrub_machine_paths`).
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from opd_sdk.errors import ConfigError
from opd_sdk.models import is_peft
from opd_sdk.objectives.base import Objective
from opd_sdk.parallel.strategy import ParallelStrategy
from opd_sdk.train.metrics import read_metrics

STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors, ints and tuples (loadable with weights_only=True)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
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

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
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
    parallel: ParallelStrategy,
    model: torch.nn.Module,
    scheduler: Any,
    state: dict[str, Any],
    rngs: list[dict[str, Any]],
    objective: Objective | None = None,
    tokenizer: Any = None,
    teachers: Sequence[Any] = (),
) -> Path:
    """Write a checkpoint folder at `path` (atomically; machine paths scrubbed). Every rank calls it:
    each writes its share of the strategy's state (`parallel.save`), then rank 0 writes the rest.

    state: JSON-serialisable (the launch's world_size and zero_stage are added, for `check_launch`).
    rngs: every rank's RNG state, in rank order.
    teachers: the `Stateful` teachers (`opd_sdk.feedback.teacher.stateful`), whose states rank 0 saves.
    """
    dist = parallel.dist
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    dist.on_main(lambda: _empty_folder(tmp))
    parallel.save(tmp)
    dist.barrier()
    if not dist.is_main:
        return final
    if not parallel.shards_student:
        model.save_pretrained(tmp / ("adapter" if is_peft(model) else "model"))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp / "tokenizer")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rngs[0], tmp / "rng.pt")
    for r, state_r in enumerate(rngs[1:], start=1):
        torch.save(state_r, tmp / f"rng-rank{r}.pt")
    objective_state = objective.state_dict() if objective is not None else {}
    if objective_state:  # a stateless objective writes no file
        torch.save(objective_state, tmp / "objective.pt")
    if teachers:
        torch.save([t.state_dict() for t in teachers], tmp / "teachers.pt")
    state = {**state, "world_size": dist.world_size, "zero_stage": dist.zero_stage}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    scrub_machine_paths(final)
    return final


def _empty_folder(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


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


def layout_name(fsdp: bool, zero_stage: int) -> str:
    return "FSDP" if fsdp else f"DeepSpeed ZeRO-{zero_stage}" if zero_stage else "plain (one process or data parallel)"


def check_launch(folder: Path, *, world_size: int, fsdp: bool, zero_stage: int) -> dict[str, Any]:
    """The checkpoint's trainer_state.json; ConfigError when a job of another process count, or
    of another layout (FSDP's sharded/, the ZeRO stage in trainer_state.json, or neither), saved it."""
    state = json.loads((Path(folder) / STATE_FILE).read_text(encoding="utf-8"))
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        raise ConfigError(
            f"{folder} was saved by a job of {saved_world} process(es) and this one has {world_size}; "
            f"resume with the same number (`accelerate launch --num_processes {saved_world}` / "
            f"`torchrun --nproc_per_node {saved_world}`)"
        )
    saved = layout_name((Path(folder) / "sharded").exists(), int(state.get("zero_stage", 0)))
    if saved != layout_name(fsdp, zero_stage):
        raise ConfigError(f"{folder} was saved by a {saved} job and this one is {layout_name(fsdp, zero_stage)}; "
                          "resume with the accelerate config the run was started with")
    return state


def load_checkpoint(
    path: str | Path,
    *,
    parallel: ParallelStrategy,
    model: torch.nn.Module,
    scheduler: Any,
    objective: Objective | None = None,
    teachers: Sequence[Any] = (),
) -> dict[str, Any]:
    """Restore model and optimizer (the strategy's state), scheduler, RNG (this rank's) and objective
    state; returns trainer_state.json. Every rank calls it. Raises ConfigError for an incomplete
    folder, or one another launch saved (`check_launch`: each process's sampling stream resumes
    exactly only on the same process count, and each layout reads its own state)."""
    folder = Path(path)
    if not (folder / STATE_FILE).exists():
        raise ConfigError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    dist = parallel.dist
    state = check_launch(folder, world_size=dist.world_size, fsdp=parallel.shards_student, zero_stage=dist.zero_stage)
    if not parallel.shards_student:
        _load_model_weights(model, folder)
    parallel.load(folder)
    device = next(model.parameters()).device
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if objective is not None and (folder / "objective.pt").exists():
        objective.load_state_dict(torch.load(folder / "objective.pt", map_location=device, weights_only=True))
    if teachers:  # the ranks that ask the teachers (rank 0) restore them
        _load_teachers(folder, teachers)
    set_rng_state(torch.load(folder / ("rng.pt" if dist.rank == 0 else f"rng-rank{dist.rank}.pt"), weights_only=True))
    return state


def _load_teachers(folder: Path, teachers: Sequence[Any]) -> None:
    path = folder / "teachers.pt"
    states = torch.load(path, weights_only=True) if path.exists() else []
    if len(states) != len(teachers):
        raise ConfigError(f"{folder} holds the state of {len(states)} learning teacher(s) (teachers.pt) and this run "
                          f"has {len(teachers)}; resume with the teachers the run was started with")
    for teacher, state in zip(teachers, states, strict=True):
        teacher.load_state_dict(state)


def resolve_checkpoint(path: str | Path, output_dir: Path | None) -> Path:
    """`path`, or for "latest" the newest complete checkpoint under output_dir. Raises ConfigError
    when there is none, or no output_dir to look in."""
    if str(path) != "latest":
        return Path(path)
    if output_dir is None:
        raise ConfigError('resume_from="latest" needs output_dir')
    found = latest_checkpoint(output_dir)
    if found is None:
        raise ConfigError(f"nothing to resume: {output_dir} holds no step-N/ checkpoint; start without resuming")
    return found


def refuse_an_earlier_run(output_dir: Path | None) -> None:
    """A fresh run never writes over another run's steps (the CLI's --overwrite deletes them first):
    ConfigError when output_dir holds a checkpoint or a metrics row past step 0."""
    if output_dir is None:
        return
    path = output_dir / "metrics.jsonl"
    trained = latest_checkpoint(output_dir) is not None or (
        path.exists() and any(row.get("step", 0) > 0 for row in read_metrics(path))
    )
    if trained:
        raise ConfigError(
            f"output_dir {output_dir} already holds a run; continue it with "
            "trainer.train(resume_from='latest'), or give another output_dir"
        )


def save_student(path: str | Path, *, parallel: ParallelStrategy, model: torch.nn.Module, tokenizer: Any,
                 merge_lora: bool = False) -> Path:
    """The student (or its LoRA adapter; merged into the base with merge_lora=True) and tokenizer,
    with no absolute path of this machine (`scrub_machine_paths`). In a launched job only rank 0
    writes; where the ranks hold shards (FSDP) every rank must call: the weights are gathered to
    rank 0 first. Raises ConfigError for merge_lora under FSDP."""
    path = Path(path)
    if merge_lora and parallel.shards_student:
        raise ConfigError("merge_lora is not available under FSDP; save the adapter, then merge it in one process")
    weights = parallel.full_state_dict()
    if not parallel.dist.is_main:
        return path
    if merge_lora and is_peft(model):
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(path, state_dict=weights)
    tokenizer.save_pretrained(path)
    scrub_machine_paths(path)
    return path


def prune_checkpoints(output_dir: str | Path, *, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete step-N/ folders (and stale .tmp ones); returns the deleted."""
    root = Path(output_dir)
    found = sorted(
        (int(p.name.split("-", 1)[1]), p)
        for p in root.glob("step-*")
        if p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).exists()
    )
    doomed = [p for _, p in found[: max(0, len(found) - keep)]] + list(root.glob("step-*.tmp"))
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


_PATH_KEYS = ("base_model_name_or_path", "_name_or_path", "name_or_path")


def scrub_machine_paths(folder: str | Path) -> None:
    """Replace absolute paths that save_pretrained wrote (a LoRA adapter's base model, say) by
    their last component, in every JSON and README under `folder`: a saved model names its base,
    it does not carry this machine's directory layout. Load a LoRA folder with the base given
    explicitly (`opd eval` takes it from the config's student.model)."""
    root = Path(folder)
    absolute: set[str] = set()
    for f in root.rglob("*.json"):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(data, dict):
            absolute |= {data[k] for k in _PATH_KEYS if isinstance(data.get(k), str) and Path(data[k]).is_absolute()}
    if not absolute:
        return
    for f in list(root.rglob("*.json")) + list(root.rglob("README.md")):
        text = f.read_text(encoding="utf-8")
        new = text
        for a in sorted(absolute, key=len, reverse=True):
            new = new.replace(json.dumps(a)[1:-1], Path(a).name).replace(a, Path(a).name)
        if new != text:
            f.write_text(new, encoding="utf-8")
