"""Install into a CUDA container without replacing its torch, and a megatron-core from a
source checkout: setup.py states ranges, the version check reads megatron.core itself."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent


def install_requires() -> dict[str, Requirement]:
    """setup.py's INSTALL_REQUIRES, read without running setup()."""
    tree = ast.parse((REPO / "setup.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "INSTALL_REQUIRES")
    return {Requirement(r).name: Requirement(r) for r in ast.literal_eval(node.value)}


@pytest.mark.parametrize("torch_version", ["2.14.1", "2.9.0a0+50eac811a6.nv25.09", "2.6.0"])
def test_a_containers_torch_satisfies_the_requirement(torch_version):
    """pip keeps an installed torch that satisfies the requirement; NVIDIA's containers carry
    pre-release builds such as 2.9.0a0+...nv25.09 (the pin torch==2.14.1 replaced them)."""
    requires = install_requires()
    assert requires["torch"].specifier.contains(torch_version, prereleases=True)
    assert not any(str(r.specifier).startswith("==") for r in requires.values()), "pins belong in constraints.txt"


@pytest.mark.parametrize("version, ok", [("0.19.0", True), ("0.19.2", True), ("0.19.9", True),
                                          ("0.18.3", False), ("0.20.0", False)])
def test_megatron_core_range(version, ok):
    assert install_requires()["megatron-core"].specifier.contains(version) == ok


def fake_checkout(root: Path, minor: int) -> Path:
    """A Megatron-LM source tree as clusters put on PYTHONPATH: no pip metadata."""
    core = root / "megatron" / "core"
    core.mkdir(parents=True)
    (core / "__init__.py").write_text("raise RuntimeError('the version check must not import megatron.core')\n")
    (core / "package_info.py").write_text(f"MAJOR = 0\nMINOR = {minor}\nPATCH = 5\nPRE_RELEASE = 'rc1'\n")
    return root


@pytest.mark.parametrize("minor, ok", [(19, True), (20, False)])
def test_version_check_reads_the_megatron_core_on_the_path(tmp_path, minor, ok):
    checkout = fake_checkout(tmp_path / "Megatron-LM", minor)
    code = "from ders_megatron._version_check import check_megatron_core_version as c; print(c())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{REPO}"})
    if ok:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "0.19.5rc1"
    else:
        assert result.returncode != 0 and "megatron.core on the import path is 0.20.5rc1" in result.stderr


def test_constraints_pin_what_the_venv_has():
    """./test.sh installs with constraints.txt: every pin is what this environment runs."""
    from importlib.metadata import version

    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, pinned = line.split("==")
            assert version(name) == pinned, name
