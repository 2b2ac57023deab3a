"""Pin the megatron-core release whose internals this package relies on.

The experts contract (``transformer/moe/moe_layer.py:67-97``), the expert
parameter attributes (``tensor_parallel/layers.py:960-1013``) and the CUDA call
sites the CPU runtime redirects are all read from megatron-core 0.19.2. Another
minor release may move them, so importing ders_megatron against one fails
loudly instead of computing something subtly wrong.
"""

from importlib.metadata import PackageNotFoundError, version

MEGATRON_CORE_VERSION = "0.19"  # major.minor this package is written against (0.19.2 tested)


def check_megatron_core_version() -> str:
    try:
        found = version("megatron-core")
    except PackageNotFoundError as err:
        raise ImportError(
            "ders_megatron needs megatron-core==0.19.2; it is not installed. "
            "Run ./test.sh (creates .venv) or `pip install megatron-core==0.19.2`."
        ) from err
    if ".".join(found.split(".")[:2]) != MEGATRON_CORE_VERSION:
        raise ImportError(
            f"ders_megatron is pinned to megatron-core {MEGATRON_CORE_VERSION}.x (tested with "
            f"0.19.2) but found {found}; its internals differ. Install megatron-core==0.19.2."
        )
    return found
