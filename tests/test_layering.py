"""Dependency direction (issue 16): the pruning core imports torch and transformers, never ``llava`` or the toy
world; ``llava/`` builds on the core and never imports the toy world; ``toyworld/`` sits on top of both.

Imports are read with ``ast`` from every module, so a lazy import inside a function counts as well, and
relative imports are resolved against the module's own package."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"learnpruner_ext": {"llava", "toyworld"}, "llava": {"toyworld"}}


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """Top-level package of every module ``path`` imports (``import a.b`` / ``from a.b import c`` -> ``a``)."""
    package = path.relative_to(root).parts[:-1]  # the package the module is in, e.g. ("llava", "serve")
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):  # relative: ``level - 1`` packages up from the module's own
            base = package[: len(package) - node.level + 1] if node.level else ()
            found.add((base + tuple((node.module or "").split(".")))[0])
    return found


def violations(top: str, root: Path = ROOT) -> list[str]:
    return sorted(f"{path.relative_to(root).as_posix()} imports {name}"
                  for path in (root / top).rglob("*.py")
                  for name in imported_packages(path, root) & FORBIDDEN[top])  # fmt: skip


@pytest.mark.parametrize("top", sorted(FORBIDDEN))
def test_no_upward_imports(top):
    assert (ROOT / top / "__init__.py").is_file()
    assert violations(top) == [], f"{top}/ must not import {sorted(FORBIDDEN[top])}"


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
    """A checker that read only top-level statements, or took relative imports for third-party ones,
    would miss ``lazy.py`` or misplace ``fine.py``'s ``from .. import config``."""
    pkg = tmp_path / "learnpruner_ext" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "lazy.py").write_text("def f():\n    from llava.mm_utils import expand2square\n")
    (pkg / "nested.py").write_text("class A:\n    def f(self):\n        import toyworld.generate as g\n")
    (pkg / "fine.py").write_text("import torch\nfrom .. import config\nfrom . import x\nfrom transformers import AutoConfig\n")
    assert imported_packages(pkg / "lazy.py", tmp_path) == {"llava"}
    assert imported_packages(pkg / "fine.py", tmp_path) == {"torch", "learnpruner_ext", "transformers"}
    assert violations("learnpruner_ext", tmp_path) == ["learnpruner_ext/sub/lazy.py imports llava",
                                                       "learnpruner_ext/sub/nested.py imports toyworld"]  # fmt: skip
