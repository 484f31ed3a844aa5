"""The protocol every teacher implements, and the optional capabilities other code reads.

A teacher has a stable `id`: a fingerprint of its model, prompt template and
parameters. The collector's cache is keyed by it, so two teachers that would
answer differently must have different ids, and an id must never contain a
secret. `feedback` answers one request; it raises a `TeacherError` subclass
(opd_sdk.errors) on a failed call; the collector retries by type and turns
the final failure into a `FeedbackFailure` value. Any other exception is a
bug and stops the run.

Optional capabilities, each a small runtime-checkable protocol (the
collector and the trainer test `isinstance(teacher, X)`, never `getattr`):

- `Pointwise`: `pointwise` is True: the collector splits a request with
  several completions into one sub-request per completion (each cached,
  retried and rate-limited on its own) and merges the Scores back in order.
- `CountsCalls`: `api_calls(request) -> int`, HTTP calls one `feedback()`
  makes (what the RPM limit charges; default 1).
- `CustomCacheKey`: `cache_key(request) -> str` (default: the request's
  canonical JSON).
- `BatchTeacher`: `async feedback_batch(requests) -> list[Feedback]`; the
  collector hands it the batch's cache misses in one call.
- `LocalTeacher`: `local` is True and `feedback_local(requests) ->
  list[Feedback]` answers a batch in process, synchronously (no network);
  `opd_sdk.feedback.factory.make_collector` then runs it in the calling thread,
  without a loop, semaphore or retries. Use `is_local(teacher)`.
- `Cacheable`: `cacheable` is False for a teacher whose answers change as the
  student trains (self-distillation in live or EMA mode: it follows the
  student's weights). The collector keeps no cache for it, and the trainer
  never asks it ahead of the step that changes it (`rollout.max_staleness`
  >= 1 is refused). Use `is_cacheable(teacher)` (default True) and
  `follows_student(teacher)`.
- `NotCached`: `uncached_reason` is a sentence (not None) when the teacher's id
  cannot cover what determines its answers (a `check=` callable whose code or
  captured values cannot be read, `callable_fingerprint`): the collector keeps
  no cache for it and logs the reason. Use `uncached_reason(teacher)`.
- `Closeable`: `async aclose()` releases HTTP clients; the collector calls it
  on close.
- `FollowsStudent`: `on_optimizer_step(step)` is called by the trainer after
  each optimizer step (step = optimizer steps done: 1, 2, ...).
- `Combinator`: `children`, the teachers a composite asks (`providers.compose`).
- `SelfTesting`: `async self_test() -> dict` checks, once before training,
  that the server can do what the teacher needs.
- `Stateful`: `state_dict()` / `load_state_dict(state)`: a teacher that learns
  during the run (GAD's discriminator); saved in every checkpoint and
  restored on resume (`opd_sdk.train.checkpoint`). Use `stateful(teachers)`.
- `ReportsMetrics`: `metrics() -> dict` of its last batch, namespaced
  (`gad/accuracy`); the trainer adds them to the step's row.
- `ChecksPrompts`: `check_prompts(prompts)` raises ConfigError, before
  training, for prompts it cannot answer (the trainer calls it).
- `OwnsCollectors`: `collectors`, the collectors a local teacher asks its own
  teachers through (GAD's reference teacher): their usage counts in the
  run's, and closing the teacher's runner closes them. Use `inner_collectors`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import re
import sys
import sysconfig
import types
from typing import Any, Protocol, Sequence, runtime_checkable

from opd_sdk.types import Completion, Feedback, FeedbackRequest

# a request with placeholders: a teacher renders its prompt templates for it into its `id`, so a
# changed template (a new version of the code) is a new id, and the cache does not serve old answers
TEMPLATE_PROBE = FeedbackRequest(prompt="{prompt}", completions=[Completion(text="{a}"), Completion(text="{b}")],
                                 privileged="{privileged}")


@runtime_checkable
class Teacher(Protocol):
    @property
    def id(self) -> str: ...

    async def feedback(self, request: FeedbackRequest) -> Feedback: ...


@runtime_checkable
class Pointwise(Protocol):
    pointwise: bool


@runtime_checkable
class CountsCalls(Protocol):
    def api_calls(self, request: FeedbackRequest) -> int: ...


@runtime_checkable
class CustomCacheKey(Protocol):
    def cache_key(self, request: FeedbackRequest) -> str: ...


@runtime_checkable
class BatchTeacher(Protocol):
    async def feedback_batch(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...


@runtime_checkable
class LocalTeacher(Protocol):
    local: bool

    def feedback_local(self, requests: Sequence[FeedbackRequest]) -> list[Feedback]: ...


@runtime_checkable
class Cacheable(Protocol):
    cacheable: bool


@runtime_checkable
class NotCached(Protocol):
    uncached_reason: str | None


@runtime_checkable
class Closeable(Protocol):
    async def aclose(self) -> None: ...


@runtime_checkable
class FollowsStudent(Protocol):
    def on_optimizer_step(self, step: int) -> None: ...


@runtime_checkable
class SelfTesting(Protocol):
    async def self_test(self) -> dict: ...


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class ReportsMetrics(Protocol):
    def metrics(self) -> dict[str, float]: ...


@runtime_checkable
class ChecksPrompts(Protocol):
    def check_prompts(self, prompts: Sequence[Any]) -> None: ...


@runtime_checkable
class OwnsCollectors(Protocol):
    collectors: list[Any]


@runtime_checkable
class Combinator(Protocol):
    children: list[Any]


def is_pointwise(teacher: Any) -> bool:
    return isinstance(teacher, Pointwise) and bool(teacher.pointwise)


def is_local(teacher: Any) -> bool:
    """True for a teacher that answers in process (`LocalTeacher` with `local` True)."""
    return isinstance(teacher, LocalTeacher) and bool(teacher.local)


def is_cacheable(teacher: Any) -> bool:
    """False only for a teacher that says its answers change from step to step."""
    return not isinstance(teacher, Cacheable) or bool(teacher.cacheable)


def uncached_reason(teacher: Any) -> str | None:
    """Why `teacher` must not be cached although its answers do not follow the student (None: it may)."""
    return teacher.uncached_reason if isinstance(teacher, NotCached) else None


def api_calls(teacher: Any, request: FeedbackRequest) -> int:
    """HTTP calls one `teacher.feedback(request)` makes (1 unless the teacher says)."""
    return int(teacher.api_calls(request)) if isinstance(teacher, CountsCalls) else 1


def leaves(teacher: Any) -> list[Any]:
    """The teachers that answer in `teacher`'s tree: itself, or recursively a `Combinator`'s children."""
    if isinstance(teacher, Combinator):
        return [leaf for child in teacher.children for leaf in leaves(child)]
    return [teacher]


def reads_student(teacher: Any, student: Any) -> list[str]:
    """Ids of the teachers in `teacher`'s tree that hold the `student` model object
    (self-distillation: live, EMA or frozen views of it)."""
    return [leaf.id for leaf in leaves(teacher)
            if hasattr(leaf, "__dict__") and any(value is student for value in vars(leaf).values())]


def follows_student(teacher: Any) -> list[str]:
    """Ids of the teachers in `teacher`'s tree whose answers change as the student trains (not
    cacheable: self-distillation in live or EMA mode). The trainer never asks such a teacher while
    a step changes those weights (`opd_sdk.train.collect.check_collectors`)."""
    return [leaf.id for leaf in leaves(teacher) if not is_cacheable(leaf)]


def stateful(teachers: Sequence[Any]) -> list[Any]:
    """The leaves of `teachers` (in order) that carry state a checkpoint must keep (`Stateful`)."""
    return [leaf for t in teachers for leaf in leaves(t) if isinstance(leaf, Stateful)]


def inner_collectors(teacher: Any) -> list[Any]:
    """The collectors the leaves of `teacher` ask their own teachers through (`OwnsCollectors`)."""
    return [c for leaf in leaves(teacher) if isinstance(leaf, OwnsCollectors) for c in leaf.collectors]


def notify_optimizer_step(teacher: Any, step: int) -> None:
    """Tell `teacher` (if it follows the student) that optimizer step `step` happened."""
    if isinstance(teacher, FollowsStudent):
        teacher.on_optimizer_step(step)


def fingerprint(kind: str, **params: Any) -> str:
    """A stable teacher id: `kind:` + a short hash of the parameters.

    Pass everything that changes the teacher's answers (model, base_url,
    template, temperature...). Never pass an API key.
    """
    blob = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A stable identity of a tokenizer: `tok:` + a short hash of its vocabulary, special
    tokens and chat template. Two tokenizers with the same fingerprint encode text to the
    same ids, so a teacher may use a request's token ids as they are. It reads the whole
    vocabulary (tens of ms): compute it once per tokenizer, not per request."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(
        {
            "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
            "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
            "chat_template": getattr(tokenizer, "chat_template", None),
        },
        sort_keys=True,
        default=str,
    )
    return f"tok:{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


log = logging.getLogger("opd_sdk.feedback.teacher")


class _Unknowable(Exception):
    """What a callable computes cannot be read (the message says what)."""


_SIMPLE = (int, float, complex, str, bytes, bool, type(None))
_LIBRARY_DIRS = tuple({sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")})


def _from_library(obj: Any) -> bool:
    """Code of the standard library or an installed package (it changes only with its version)."""
    code = getattr(obj, "__code__", None)
    filename = code.co_filename if code is not None else getattr(sys.modules.get(getattr(obj, "__module__", "")),
                                                                  "__file__", None)
    return filename is None or filename.startswith(_LIBRARY_DIRS) or "site-packages" in filename


def _version(module: str | None) -> str:
    top = (module or "").split(".")[0]
    try:
        return importlib.metadata.version(top)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return sys.version.split()[0] if top in sys.stdlib_module_names or top == "builtins" else "?"


def _named(obj: Any) -> list[str]:
    module = getattr(obj, "__module__", None)
    return [str(module), getattr(obj, "__qualname__", repr(obj)), _version(module)]


def _code(code: types.CodeType, fn: Any, seen: set[int]) -> list[Any]:
    consts = [_code(c, fn, seen) if isinstance(c, types.CodeType) else _value(c, seen) for c in code.co_consts]
    out: list[Any] = ["code", code.co_code.hex(), consts, list(code.co_names), list(code.co_varnames)]
    glob = getattr(fn, "__globals__", {})
    for name in code.co_names:  # module-level values and helpers the code reads
        if name in glob and not isinstance(glob[name], types.ModuleType):
            out.append([name, _value(glob[name], seen)])
    return out


def _value(v: Any, seen: set[int]) -> Any:
    """A JSON-able description of `v` that changes when what it computes changes; raises _Unknowable."""
    if isinstance(v, _SIMPLE):
        return [type(v).__name__, repr(v)]
    if id(v) in seen:
        return ["ref", getattr(v, "__qualname__", type(v).__name__)]
    seen.add(id(v))
    if isinstance(v, (tuple, list)):
        return [type(v).__name__, [_value(x, seen) for x in v]]
    if isinstance(v, (set, frozenset)):
        return [type(v).__name__, sorted(json.dumps(_value(x, seen)) for x in v)]
    if isinstance(v, dict):
        return ["dict", sorted([json.dumps(_value(k, seen)), _value(x, seen)] for k, x in v.items())]
    if isinstance(v, re.Pattern):
        return ["re", v.pattern, v.flags]
    if isinstance(v, types.ModuleType):
        return ["module", v.__name__, _version(v.__name__)]
    if isinstance(v, functools.partial):
        return ["partial", _value(v.func, seen), _value(v.args, seen), _value(v.keywords, seen)]
    if isinstance(v, types.MethodType):
        return ["method", _value(v.__func__, seen), _value(v.__self__, seen)]
    bound_to = getattr(v, "__self__", None)
    if isinstance(v, (types.BuiltinMethodType, types.MethodWrapperType)) and not isinstance(
            bound_to, (types.ModuleType, type, type(None))):  # "abc".startswith: the bound value counts
        return ["bound", *_named(v), _value(bound_to, seen)]
    if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                      types.MethodWrapperType, types.MethodDescriptorType, types.ClassMethodDescriptorType)) or (
            isinstance(v, (type, types.FunctionType)) and _from_library(v)):
        return ["lib", *_named(v)]
    if isinstance(v, types.FunctionType):
        cells = [_value(c.cell_contents, seen) if _filled(c) else None for c in (v.__closure__ or ())]
        return ["function", v.__qualname__, _code(v.__code__, v, seen), cells,
                _value(v.__defaults__, seen), _value(v.__kwdefaults__, seen)]
    if isinstance(v, type):  # a class of the user's: its methods' code
        return ["class", v.__qualname__, {k: _value(x, seen) for k, x in sorted(vars(v).items())
                                          if isinstance(x, (types.FunctionType, staticmethod, classmethod, *_SIMPLE))}]
    if isinstance(v, (staticmethod, classmethod)):
        return [type(v).__name__, _value(v.__func__, seen)]
    if hasattr(v, "__dict__") and not _from_library(type(v)):  # an object of the user's (a callable one too)
        return ["object", _value(type(v), seen), _value(vars(v), seen)]
    raise _Unknowable(f"it reads a {type(v).__module__}.{type(v).__qualname__} value, which cannot be hashed")


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell (a name bound later)
        return False
    return True


def callable_fingerprint(fn: Any) -> tuple[str | None, str | None]:
    """(a hash of what `fn` computes, None) or (None, why it cannot be known).

    Covers the function's bytecode and constants, its default arguments, the values its
    closure captured, and the module-level values and helper functions it reads (recursively;
    library functions by name and package version), for functions, lambdas, `functools.partial`,
    bound methods and callable objects of the user's own classes. Two runs of a function whose code
    was fixed get different hashes (the cache then asks again); a value it reads that cannot be
    hashed (a model, an open file...) makes it unknowable: the teacher is then not cached
    (`NotCached`). Line numbers and comments do not count; the Python version does.
    """
    try:
        blob = json.dumps(_value(fn, set()), sort_keys=True, separators=(",", ":"))
    except _Unknowable as exc:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        return None, f"the callable {name}: {exc}"
    except (TypeError, ValueError, RecursionError) as exc:
        name = getattr(fn, "__qualname__", type(fn).__name__)
        return None, f"the callable {name} could not be read ({type(exc).__name__})"
    return hashlib.sha256(blob.encode()).hexdigest()[:16], None
