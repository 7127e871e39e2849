"""No module imports from a layer above it (docs/ARCHITECTURE.md, "What each layer may know"): every import in
src/vlmserve, including those inside functions, read with `ast`, checked against the layer rules. A new
import that breaks a rule fails here with the file, the line and the rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vlmserve"
TORCH = "torch"

# Layer (a package or module under vlmserve/) -> what it must never import (other layers, or torch).
APPS = {"api", "llm", "deploy", "cli", "bench", "training"}
FORBIDDEN: dict[str, set[str]] = {
    "engine": APPS,
    "runner": APPS,
    "models": APPS | {"engine", "runner"},
    "checkpoints": APPS | {"engine", "runner"},
    "media": APPS | {"engine", "runner", "models", TORCH},
    "multimodal": APPS | {"engine", "runner", "models", "media", TORCH},
    "api": {"llm", "deploy", "cli", "bench", "training", TORCH},
    "deploy": {"cli", "bench", "training"},
}


def _layer(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported layer) for every import of vlmserve.<layer> or torch in the file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "vlmserve":  # from vlmserve import llm
                modules = [f"vlmserve.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] == "vlmserve" and len(parts) > 1:
                found.append((node.lineno, parts[1]))
            elif parts[0] == TORCH:
                found.append((node.lineno, TORCH))
    return found


def _violations(files: list[Path], root: Path) -> list[str]:
    out = []
    for path in files:
        layer = _layer(path, root)
        for line, target in _imports(path):
            if target != layer and target in FORBIDDEN.get(layer, set()):
                out.append(f"{path.relative_to(root.parent)}:{line}: {layer}/ imports {target}")
    return out


def test_no_module_imports_from_a_layer_above_it() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the walk found the package
    violations = _violations(files, PACKAGE)
    assert not violations, "imports against the layer rules:\n" + "\n".join(violations)


@pytest.mark.parametrize(
    ("layer", "source", "expected"),
    [
        ("engine", "from vlmserve.api.errors import APIError\n", "engine/ imports api"),
        (
            "models",
            "def f():\n    from vlmserve.engine.inputs import EngineRequest\n",
            "models/ imports engine",
        ),
        ("media", "import torch.nn\n", "media/ imports torch"),
        ("models", "from vlmserve import llm\n", "models/ imports llm"),
    ],
)
def test_the_check_catches_a_forbidden_import(tmp_path: Path, layer: str, source: str, expected: str) -> None:
    # The same walk over a file planted in a package laid out like ours.
    root = tmp_path / "vlmserve"
    planted = root / layer / "planted.py"
    planted.parent.mkdir(parents=True)
    planted.write_text(source)
    assert any(expected in v for v in _violations([planted], root))
