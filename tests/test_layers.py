"""The package's layers: a module imports only from its own layer or the layers below it.

Order, bottom to top (opd_sdk/__init__.py's docstring draws it): the shared vocabulary
(errors, constants, redact, types, data, tasks, models), parallel, rollout, feedback,
providers, losses, tensors, objectives, config, train, app. Lazy imports inside
functions count too: a circle hidden in a function is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VOCABULARY = {"errors", "constants", "redact", "types", "data", "tasks", "models"}
ORDER = ["vocabulary", "parallel", "rollout", "feedback", "providers", "losses", "tensors", "objectives",
         "config", "train", "app"]


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "providers":
        return "providers"
    if parts[0] != "opd_sdk" or len(parts) == 1:
        return None  # `opd_sdk` itself: the public re-exports, for users, not for the package
    if parts[1] == "__main__":
        return "app"  # `python -m opd_sdk` is the CLI
    return "vocabulary" if parts[1] in VOCABULARY else parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def test_every_module_has_a_known_layer():
    for path in sorted((ROOT / "opd_sdk").rglob("*.py")) + sorted((ROOT / "providers").rglob("*.py")):
        name = module_name(path)
        assert name == "opd_sdk" or layer_of(name) in ORDER, f"{name}: not in a known layer; add it to ORDER"


def test_imports_only_go_down():
    wrong = []
    for path in sorted((ROOT / "opd_sdk").rglob("*.py")) + sorted((ROOT / "providers").rglob("*.py")):
        name = module_name(path)
        mine = layer_of(name)
        if mine is None:
            continue
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is not None and ORDER.index(theirs) > ORDER.index(mine):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {mine} imports {target} ({theirs}, a layer above)")
    assert not wrong, "\n".join(wrong)


def test_nothing_below_the_package_imports_its_public_root():
    """`from opd_sdk import X` inside the package would import every layer from any one of them."""
    wrong = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "opd_sdk").rglob("*.py"))
             for line, target in imports_of(path) if target == "opd_sdk" and path.name != "__init__.py"]
    wrong += [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "providers").rglob("*.py"))
              for line, target in imports_of(path) if target == "opd_sdk"]
    assert not wrong, "\n".join(wrong)


def test_each_top_level_package_imports_first_in_a_fresh_interpreter():
    import subprocess
    import sys

    for module in ("providers", "opd_sdk", "providers.gad", "opd_sdk.config.teachers"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                              check=False)
        assert done.returncode == 0, f"import {module} first:\n{done.stderr[-2000:]}"
