"""The checkpoint error every tool catches (and exits 2 on), below the modules that raise it.

It lives apart from :mod:`ders_megatron.io.checkpoint` so that
:mod:`ders_megatron.io.safe_load`, which ``checkpoint`` uses, can raise it too.
"""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or not what the caller needs."""
