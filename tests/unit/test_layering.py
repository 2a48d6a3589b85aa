"""The layers of runner/ and what each may import, checked on the source (AST), not by convention.

Every ``import`` and ``from ... import`` counts, wherever it is (inside a function, under
``TYPE_CHECKING``): a lazy import is still an edge. The rules are the ones the package
docstrings state; the checker is tested on a planted tree so that it cannot pass by finding
nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import runner

#: Modules every part may import: the exception tree, the task model and codec, events.
BASE = (
    "runner.errors",
    "runner.model",
    "runner.codec",
    "runner.events",
    "runner.eventlog",
    "runner.loader",
    "runner.middleware.base",
)
EVERYTHING = ("runner",)

#: Part (a module or package) -> what it may import from runner. The longest matching part wins.
ALLOWED: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(BASE, BASE),
    "runner.config": (*BASE, "runner.config"),
    "runner.brokers": (*BASE, "runner.brokers", "runner.deadletter"),
    "runner.deadletter": (*BASE, "runner.deadletter", "runner.brokers.base"),
    "runner.engine": (*BASE, "runner.engine", "runner.brokers.base"),
    "runner.middleware": (*BASE, "runner.middleware"),
    "runner.observe": (*BASE, "runner.observe", "runner.config", "runner.brokers.base"),
    "runner.testing": (*BASE, "runner.brokers.base", "runner.testing"),  # see DEV_ONLY
    "runner.app": tuple(
        f"runner.{name}"
        for name in (
            *(m.removeprefix("runner.") for m in BASE),
            "app",
            "backends",
            "config",
            "brokers",
            "deadletter",
            "engine",
            "middleware",
            "observe",
        )
    ),
    "runner.backends": tuple(
        f"runner.{name}"
        for name in (
            *(m.removeprefix("runner.") for m in BASE),
            "config",
            "brokers",
            "deadletter",
        )
    ),
    "runner.ops": EVERYTHING,
    "runner.__main__": EVERYTHING,
    "runner": EVERYTHING,  # runner/__init__.py: the public names
}

#: Part -> third-party packages it must not import (the engine and the brokers get plain values).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "runner.engine": ("pydantic", "pydantic_settings", "yaml"),
    "runner.brokers": ("pydantic", "pydantic_settings", "yaml"),
    "runner.deadletter": ("pydantic", "pydantic_settings", "yaml"),
}

#: Imports that need a dev dependency (pytest) -> the one part that may make them, so that the
#: runner runs where only its own dependencies are installed.
DEV_ONLY: dict[str, str] = {"pytest": "runner.testing", "runner.testing": "runner.testing"}


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(
    tree: ast.AST, module: str, is_package: bool, modules: set[str]
) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``tree``. ``from a import b`` counts as
    importing a.b when that is one of ``modules``, else as importing a."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((node.lineno, submodule if submodule in modules else base))
    return sorted(set(found))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _part(module: str) -> str:
    matches = [part for part in ALLOWED if _within(module, part)]
    return max(matches, key=len)


def layering_violations(root: Path) -> list[str]:
    """Every import under the package directory ``root`` that breaks ALLOWED or FORBIDDEN."""
    modules = {_module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    problems: list[str] = []
    for module, path in modules.items():
        part = _part(module)
        tree = ast.parse(path.read_text(), str(path))
        for line, target in _imports(tree, module, path.name == "__init__.py", set(modules)):
            where = f"{path.relative_to(root.parent)}:{line}"
            top = target.partition(".")[0]
            if top in FORBIDDEN.get(part, ()):
                problems.append(f"{where}: {module} imports {target}")
            owner = next((o for dev, o in DEV_ONLY.items() if _within(target, dev)), None)
            if owner is not None and not _within(module, owner):
                problems.append(f"{where}: {module} imports {target} (dev only)")
                continue
            if top != root.name:
                continue
            if not any(_within(target, allowed) for allowed in ALLOWED[part]):
                problems.append(f"{where}: {module} imports {target}")
    return problems


def test_runner_keeps_its_layers() -> None:
    assert layering_violations(Path(runner.__file__).parent) == []


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "runner" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "runner"


def test_the_checker_reports_each_kind_of_forbidden_import(tmp_path: Path) -> None:
    package = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "errors.py": "",
            "config/__init__.py": "",
            "config/models.py": "import pydantic\n",
            "engine/__init__.py": "",
            # A lazy import inside a function still counts.
            "engine/worker.py": "def f():\n    from runner.config.models import X\n",
            # So does one under TYPE_CHECKING, and a third-party package the part may not use.
            "brokers/__init__.py": "",
            "brokers/memory.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from runner.engine import worker\n"
                "import pydantic\n"
            ),
            # A relative import is resolved before it is checked.
            "observe/__init__.py": "",
            "observe/logs.py": "from ..ops import cli\n",
            "ops/__init__.py": "",
            "ops/cli.py": "from runner.engine.worker import f\n",  # ops may import anything
            # ... but pytest and the contract suite only where pytest is installed.
            "ops/check.py": "import pytest\nfrom runner.testing import contract\n",
            "app.py": "from runner.ops import cli\n",
        },
    )
    problems = layering_violations(package)
    assert problems == [
        "runner/app.py:1: runner.app imports runner.ops.cli",
        "runner/brokers/memory.py:3: runner.brokers.memory imports runner.engine.worker",
        "runner/brokers/memory.py:4: runner.brokers.memory imports pydantic",
        "runner/engine/worker.py:2: runner.engine.worker imports runner.config.models",
        "runner/observe/logs.py:1: runner.observe.logs imports runner.ops.cli",
        "runner/ops/check.py:1: runner.ops.check imports pytest (dev only)",
        "runner/ops/check.py:2: runner.ops.check imports runner.testing (dev only)",
    ]


def test_the_checker_passes_a_tree_that_keeps_the_rules(tmp_path: Path) -> None:
    package = _plant(
        tmp_path,
        {
            "__init__.py": "from runner.app import build\n",
            "errors.py": "",
            "model.py": "from runner import errors\n",
            "engine/__init__.py": "",
            "engine/worker.py": "from runner.errors import X\nfrom runner.brokers.base import B\n",
            "brokers/__init__.py": "",
            "brokers/base.py": "from runner.model import Task\n",
            "testing/__init__.py": "import pytest\n",
            "testing/contract.py": "import pytest\nfrom runner.brokers.base import Broker\n",
            "app.py": "from runner.engine.worker import W\nimport pydantic\n",
        },
    )
    assert layering_violations(package) == []
