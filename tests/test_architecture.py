"""The package's architecture rules (docs/design.md "Where things live"), enforced:

* ``lint-imports`` keeps the contracts in ``.importlinter``: folders are layers that
  import only downwards, nothing imports ``ders_megatron.testing``, and no import
  cycle exists between sibling modules at any depth (imports inside functions count);
* no private name (``_x``) of one of our modules is used by another module.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ders_megatron"


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache", str(ROOT / ".importlinter")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _private_definitions(tree: ast.Module) -> set[str]:
    """Private names a module defines: module-level names, methods, and ``self._x`` attributes."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if _is_private(n)}


def _private_uses(tree: ast.Module) -> list[tuple[int, str]]:
    """``from ders_megatron... import _x`` and ``obj._x`` on anything but self/cls/ctx."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ders_megatron"):
            uses += [(node.lineno, a.name) for a in node.names if _is_private(a.name)]
        elif isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.ctx, ast.Load):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "ctx")):
                uses.append((node.lineno, node.attr))
    return uses


def test_no_private_name_crosses_a_module():
    modules = list(_modules())
    defined = {path: _private_definitions(tree) for path, tree in modules}
    ours = set().union(*defined.values())
    crossing = []
    for path, tree in modules:
        for line, name in _private_uses(tree):
            if name in ours and name not in defined[path]:
                crossing.append(f"{path.relative_to(ROOT)}:{line} uses {name}")
    assert not crossing, "private names used outside their module:\n" + "\n".join(crossing)
