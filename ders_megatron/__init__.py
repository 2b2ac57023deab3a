"""ders-megatron: DeRS (shared base + light per-expert deltas) experts for megatron-core MoE."""

from ders_megatron._version_check import MEGATRON_CORE_VERSION, check_megatron_core_version

__version__ = "0.1.0"
__all__ = ["MEGATRON_CORE_VERSION", "check_megatron_core_version", "__version__"]

check_megatron_core_version()
