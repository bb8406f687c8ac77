"""The package's layers, checked from the source (ast), so a wrong import fails here
and not in a review: imports run one way along the flow

    data -> model -> train -> evaluate -> orchestration (orchestrate.py, cluster/, bench/) -> cli

with config.py, io.py and checkpoint.py at the bottom, usable by all; evaluate/
never imports train/ (the orchestration starts both); nothing under model/ imports
Ray; nothing under data/ imports torch.distributed. And only checkpoint.py names
checkpoint files."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Iterator, Optional

import pytest

import distnmt

PACKAGE = Path(distnmt.__file__).resolve().parent
BOTTOM = {"distnmt", "distnmt.config", "distnmt.io", "distnmt.checkpoint"}
LAYERS = ["data", "model", "train", "evaluate", "orchestration", "cli"]
ORCHESTRATION = {"distnmt.orchestrate", "distnmt.cluster", "distnmt.bench"}
# Names of checkpoint files and folders: only distnmt/checkpoint.py may spell them.
CHECKPOINT_NAMES = re.compile(r"meta\.json|state\.pt|(^|/)rng/|^checkpoint_(\d|\*|\{|$)")


def _modules(package: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def layer(module: str) -> Optional[str]:
    """The layer of a distnmt module (None: the bottom, usable by all)."""
    if module in BOTTOM:
        return None
    if any(module == m or module.startswith(m + ".") for m in ORCHESTRATION):
        return "orchestration"
    if module == "distnmt.cli":
        return "cli"
    return module.split(".")[1]


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import in the file, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")[: len(module.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from distnmt import evaluate`: the submodule is the import
                if name == "distnmt":
                    yield node.lineno, f"distnmt.{alias.name}"


def violations(package: Path = PACKAGE) -> list[str]:
    found = []
    for module, path in _modules(package):
        own = layer(module)
        for line, name in _imports(path, module):
            where = f"{path.relative_to(package.parent)}:{line}"
            if own == "model" and (name == "ray" or name.startswith("ray.")):
                found.append(f"{where}: model/ imports {name} (the model knows no Ray)")
            if own == "data" and name.startswith("torch.distributed"):
                found.append(f"{where}: data/ imports {name}")
            if not name.startswith("distnmt"):
                continue
            target = layer(name)
            if own is None and target is not None:
                found.append(f"{where}: {module} (bottom) imports {name} ({target})")
            elif own is not None and target is not None:
                if LAYERS.index(target) > LAYERS.index(own):
                    found.append(f"{where}: {module} ({own}) imports {name} ({target}), against the flow")
                elif own == "evaluate" and target == "train":
                    found.append(f"{where}: evaluate/ imports {name}: train/ and evaluate/ never import each other")
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def file_name_literals(package: Path = PACKAGE) -> list[str]:
    """Strings (f-string parts included, docstrings not) naming checkpoint files, outside checkpoint.py."""
    found = []
    for module, path in _modules(package):
        if module == "distnmt.checkpoint":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if CHECKPOINT_NAMES.search(node.value):
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno}: {node.value!r}")
    return found


def test_imports_follow_the_flow() -> None:
    assert violations() == []


def test_only_checkpoint_py_names_checkpoint_files() -> None:
    assert file_name_literals() == []


@pytest.mark.parametrize("module, expected", [
    ("distnmt.train.trainer", "train"), ("distnmt.evaluate.hook", "evaluate"), ("distnmt.bench.train", "orchestration"),
    ("distnmt.orchestrate", "orchestration"), ("distnmt.cli", "cli"), ("distnmt.checkpoint", None),
])
def test_layers_are_assigned(module: str, expected: Optional[str]) -> None:
    assert layer(module) == expected


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """On a package with one wrong import of each kind and a stray file name, both checks fire."""
    package = tmp_path / "distnmt"
    for folder in ("train", "model", "evaluate", "data"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text("from distnmt.train import loop\n")
    (package / "train/loop.py").write_text('from distnmt.evaluate.translator import X\nNAME = f"checkpoint_{1:08d}"\n')
    (package / "model/net.py").write_text('"""Writes meta.json (a docstring: fine)."""\nimport ray\n')
    (package / "evaluate/score.py").write_text('from ..train import loop\nPATH = "x/meta.json"\n')
    (package / "data/load.py").write_text("import torch.distributed as dist\nfrom distnmt import model\n")
    assert sorted(v.split(": ", 1)[0] for v in violations(package)) == [
        "distnmt/config.py:1", "distnmt/data/load.py:1", "distnmt/data/load.py:2",
        "distnmt/evaluate/score.py:1", "distnmt/model/net.py:2", "distnmt/train/loop.py:1",
    ]
    assert [v.split(": ", 1)[0] for v in file_name_literals(package)] == [
        "distnmt/evaluate/score.py:2", "distnmt/train/loop.py:2"]
