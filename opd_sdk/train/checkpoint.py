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

A folder is written under a temporary name (`step-N.tmp/`), flushed to disk
(fsync) and renamed when complete, so a kill or a power cut mid-save never
leaves a checkpoint that looks whole. trainer_state.json, written last, lists
every other file with its size: a folder whose state does not parse, or whose
files are missing or cut short, is damaged (`checkpoint_problem`), and so is one
whose file fails to load. Resuming from "latest" moves a damaged folder aside
(`step-N.damaged`), says so, and takes the newest intact one
(`resume_checkpoint`). Bytes changed in place at the same size are not detected
(no checksums: hashing the weights and optimizer state at every save costs
seconds a gigabyte). Loading restores all of it into an already-built trainer
(same model architecture, same optimizer setup); the next sampled batch is then
the one the uninterrupted run would have drawn.

Weights are safetensors; optimizer, scheduler, RNG and objective states are
plain tensors and numbers read back with `torch.load(weights_only=True)`, so
loading a checkpoint never runs arbitrary pickled code. JSON files saved next
to a model never hold an absolute path of this machine (`scrub_machine_paths`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from opd_sdk.errors import ConfigError, CorruptedFile, OPDError
from opd_sdk.models import is_peft
from opd_sdk.objectives.base import Objective
from opd_sdk.parallel.strategy import OPTIMIZER_FILE, ParallelStrategy
from opd_sdk.train.metrics import read_metrics

STATE_FILE = "trainer_state.json"
FILES_KEY = "files"  # in trainer_state.json: every other file of the folder (posix path) -> its size in bytes

log = logging.getLogger("opd_sdk.train.checkpoint")


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


def step_folders(output_dir: str | Path) -> list[Path]:
    """Every step-N/ folder under output_dir, newest first (intact or not; never a .tmp or set-aside one)."""
    root = Path(output_dir)
    if not root.exists():
        return []
    found = [(int(p.name[5:]), p) for p in root.glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_problem(folder: str | Path) -> str | None:
    """What is wrong with a checkpoint folder, naming the file; None when it looks intact: its
    trainer_state.json parses and every file it lists is there with the size written (a checkpoint
    of an earlier version lists none: only its state is checked)."""
    folder = Path(folder)
    path = folder / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        return f"{path} does not parse ({_first_line(exc)})"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{path} holds no step number"
    files = state.get(FILES_KEY) or {}
    for name, size in files.items() if isinstance(files, dict) else ():
        p = folder / name
        if not p.is_file():
            return f"{p} is missing"
        if p.stat().st_size != size:
            return f"{p} is {p.stat().st_size} bytes, {size} were written"
    return None


def damaged_checkpoints(output_dir: str | Path) -> list[str]:
    """"step-N: what is wrong" for each damaged step-N/ folder under output_dir, newest first."""
    return [f"{p.name}: {problem}" for p in step_folders(output_dir) if (problem := checkpoint_problem(p)) is not None]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The intact checkpoint with the highest step under output_dir (`checkpoint_problem`), or None."""
    return next((p for p in step_folders(output_dir) if checkpoint_problem(p) is None), None)


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
    scrub_machine_paths(tmp)  # before the sizes are taken: it rewrites JSON files
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    state = {**state, "world_size": dist.world_size, "zero_stage": dist.zero_stage, FILES_KEY: files}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    _flush_to_disk(tmp)
    _replace_folder(tmp, final)
    return final


def _empty_folder(folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk; where a folder cannot be opened (Windows) nothing is done."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder on a platform or file system that does not sync them
        pass
    finally:
        os.close(fd)


def _flush_to_disk(folder: Path) -> None:
    """Every file and folder under `folder`, and it, on disk: a power cut after the rename finds them whole."""
    for p in sorted(folder.rglob("*")):
        _fsync(p)
    _fsync(folder)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`: an earlier `final` is set aside first and deleted after, so at every moment
    one whole folder exists under a name a resume reads (`final`, or the previous `final` as `.old`...
    which a resume ignores: the older checkpoints remain)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def _reading(folder: Path, path: Path) -> Iterator[None]:
    """DamagedCheckpoint naming `path` (in checkpoint `folder`) for a file that does not load (what
    torch.load raises for junk or a cut file); bad input of ours (ConfigError: another model, another
    layout) and a state that does not fit the optimizer (ValueError, KeyError) pass through."""
    try:
        yield
    except OPDError:
        raise
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise DamagedCheckpoint(folder, f"{path} cannot be read ({_first_line(exc)})") from exc


class DamagedCheckpoint(CorruptedFile):
    """A checkpoint folder that cannot be resumed from. `problem` names the file and what is wrong."""

    def __init__(self, folder: str | Path, problem: str) -> None:
        folder = Path(folder)
        super().__init__(f"checkpoint {folder} is damaged: {problem}; move it aside (`mv {folder} {folder}.damaged`) "
                         "and resume again: it continues from the newest older checkpoint", folder)
        self.problem = problem

    def __reduce__(self) -> tuple:
        return (DamagedCheckpoint, (self.path, self.problem))


def _load_safetensors_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no .safetensors weights; is it a checkpoint written by opd-sdk?")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError) as exc:
            raise DamagedCheckpoint(folder.parent, f"{f} cannot be read ({_first_line(exc)})") from exc
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
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise DamagedCheckpoint(Path(folder), problem)
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
    exactly only on the same process count, and each layout reads its own state); CorruptedFile,
    naming the file, for a damaged one (`checkpoint_problem`, or a file that does not load; what
    was loaded before it stays loaded: load another checkpoint over it)."""
    folder = Path(path)
    if not (folder / STATE_FILE).exists():
        raise ConfigError(f"{folder} is not a complete checkpoint (no {STATE_FILE})")
    dist = parallel.dist
    state = check_launch(folder, world_size=dist.world_size, fsdp=parallel.shards_student, zero_stage=dist.zero_stage)
    if not parallel.shards_student:
        _load_model_weights(model, folder)
    optimizer = folder / OPTIMIZER_FILE if (folder / OPTIMIZER_FILE).exists() else folder
    with _reading(folder, optimizer):
        parallel.load(folder)
    device = next(model.parameters()).device
    with _reading(folder, folder / "scheduler.pt"):
        scheduler_state = torch.load(folder / "scheduler.pt", weights_only=True)
    scheduler.load_state_dict(scheduler_state)
    if objective is not None and (folder / "objective.pt").exists():
        with _reading(folder, folder / "objective.pt"):
            objective_state = torch.load(folder / "objective.pt", map_location=device, weights_only=True)
        objective.load_state_dict(objective_state)
    if teachers:  # the ranks that ask the teachers (rank 0) restore them
        _load_teachers(folder, teachers)
    rng = folder / ("rng.pt" if dist.rank == 0 else f"rng-rank{dist.rank}.pt")
    with _reading(folder, rng):
        rng_states = torch.load(rng, weights_only=True)
    set_rng_state(rng_states)
    return state


def _load_teachers(folder: Path, teachers: Sequence[Any]) -> None:
    path = folder / "teachers.pt"
    with _reading(folder, path):
        states = torch.load(path, weights_only=True) if path.exists() else []
    if len(states) != len(teachers):
        raise ConfigError(f"{folder} holds the state of {len(states)} learning teacher(s) (teachers.pt) and this run "
                          f"has {len(teachers)}; resume with the teachers the run was started with")
    for teacher, state in zip(teachers, states, strict=True):
        teacher.load_state_dict(state)


def resume_checkpoint(path: str | Path, output_dir: Path | None, *, parallel: ParallelStrategy,
                      model: torch.nn.Module, scheduler: Any, objective: Objective | None = None,
                      teachers: Sequence[Any] = ()) -> dict[str, Any]:
    """`load_checkpoint` of `path`, or for "latest" of the newest intact checkpoint under output_dir:
    a damaged newer one is moved aside to step-N.damaged (by rank 0) and a warning names it and
    the one resumed from. In a launched job a file that fails to load is an error instead (every
    rank must load the same checkpoint). Raises ConfigError when there is nothing to resume
    from (CorruptedFile when only damaged checkpoints are there)."""
    if str(path) != "latest":
        return load_checkpoint(path, parallel=parallel, model=model, scheduler=scheduler, objective=objective,
                               teachers=teachers)
    if output_dir is None:
        raise ConfigError('resume_from="latest" needs output_dir')
    damaged: list[str] = []
    for folder in step_folders(output_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            try:
                state = load_checkpoint(folder, parallel=parallel, model=model, scheduler=scheduler,
                                        objective=objective, teachers=teachers)
            except DamagedCheckpoint as exc:
                if parallel.dist.enabled:
                    raise
                problem = exc.problem
            else:
                if damaged:
                    log.warning("opd: %s; resuming from %s", "; ".join(damaged), folder.name)
                return state
        aside = _set_aside(folder) if parallel.dist.is_main else folder
        damaged.append(f"checkpoint {folder.name} is damaged ({problem}), moved aside to {aside.name}")
    if damaged:
        raise CorruptedFile(f"nothing intact to resume from in {output_dir}: {'; '.join(damaged)}; start the run "
                            "again with --overwrite (the feedback cache is kept)", Path(output_dir))
    raise ConfigError(f"nothing to resume: {output_dir} holds no step-N/ checkpoint; start without resuming")


def _set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint folder to step-N.damaged (or .damaged-2, ...): kept for the user, out of the way."""
    aside, n = folder.with_name(folder.name + ".damaged"), 1
    while aside.exists():
        n += 1
        aside = folder.with_name(f"{folder.name}.damaged-{n}")
    folder.rename(aside)
    return aside


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
    trained = bool(step_folders(output_dir)) or (
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
    """Delete all but the newest `keep` intact step-N/ folders, and stale .tmp / .old ones (never a
    damaged one: a resume sets it aside for the user); returns the deleted."""
    root = Path(output_dir)
    intact = [p for p in step_folders(root) if checkpoint_problem(p) is None]
    doomed = intact[keep:] + list(root.glob("step-*.tmp")) + list(root.glob("step-*.old"))
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
