"""The xmodal client SDK: ``Client`` (text or image -> Triton -> Milvus), ``Hit``, ``format_hits``.

Importing it loads neither torch nor ray. The names load on first use, so the indexer's Ray
workers can import ``xmodal.client.triton`` without pymilvus.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmodal.client.hits import Hit
    from xmodal.client.sdk import Client
    from xmodal.client.table import format_hits

__all__ = ["Client", "Hit", "format_hits"]
_HOMES = {"Client": "xmodal.client.sdk", "Hit": "xmodal.client.hits", "format_hits": "xmodal.client.table"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'xmodal.client' has no attribute {name!r}")
