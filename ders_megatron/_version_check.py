"""The megatron-core releases whose internals this package relies on.

The experts contract (``transformer/moe/moe_layer.py:67-97``), the expert
parameter attributes (``tensor_parallel/layers.py:960-1013``) and the CUDA call
sites the CPU runtime redirects are all read from megatron-core 0.19.2. Another
minor release may move them, so importing ders_megatron against one fails
loudly instead of computing something subtly wrong.

The version is read from ``megatron/core/package_info.py`` of the ``megatron.core``
that Python would import, not from pip's metadata: clusters usually put a
Megatron-LM source checkout on ``PYTHONPATH`` (no pip metadata at all), and a
checkout shadows an installed wheel. The file is parsed, not executed, so this
check imports neither megatron-core nor torch.
"""

import ast
import importlib.util
from pathlib import Path

MEGATRON_CORE_VERSION = "0.19"  # major.minor this package is written against (0.19.2 tested)
SUPPORTED = ">=0.19.0,<0.20"  # the range setup.py declares


def megatron_core_version() -> str | None:
    """``MAJOR.MINOR.PATCH[PRE]`` of the ``megatron.core`` on the import path, or None."""
    try:
        spec = importlib.util.find_spec("megatron.core")  # imports the namespace package only
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    info = Path(spec.origin).with_name("package_info.py")
    if not info.is_file():
        return None
    fields = {}
    for node in ast.parse(info.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in ("MAJOR", "MINOR", "PATCH", "PRE_RELEASE"):
                    fields[target.id] = node.value.value
    if not {"MAJOR", "MINOR", "PATCH"} <= fields.keys():
        return None
    return f"{fields['MAJOR']}.{fields['MINOR']}.{fields['PATCH']}{fields.get('PRE_RELEASE', '')}"


def check_megatron_core_version() -> str:
    found = megatron_core_version()
    if found is None:
        raise ImportError(
            f"ders_megatron needs megatron-core {SUPPORTED} (tested: 0.19.2); no megatron.core was found on "
            "the import path. Run ./test.sh (creates .venv), `pip install 'megatron-core>=0.19,<0.20'`, "
            "or put a Megatron-LM 0.19 checkout on PYTHONPATH."
        )
    if ".".join(found.split(".")[:2]) != MEGATRON_CORE_VERSION:
        raise ImportError(
            f"ders_megatron supports megatron-core {SUPPORTED} (tested with 0.19.2) but the megatron.core "
            f"on the import path is {found}; its internals differ. Install megatron-core 0.19.x or point "
            "PYTHONPATH at a 0.19 Megatron-LM checkout."
        )
    return found
