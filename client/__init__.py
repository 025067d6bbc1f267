"""The xmodal client SDK: ``Client`` (text or image -> Triton -> Milvus), its asyncio twin
``AsyncClient``, ``Hit``, ``format_hits``, ``Retry`` (the retry policy for Triton calls).

Importing it loads neither torch nor ray. The names load on first use, so the indexer's Ray
workers can import ``xmodal.triton`` without pymilvus.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xmodal.client.aio import AsyncClient
    from xmodal.client.hits import Hit
    from xmodal.retry import Retry
    from xmodal.client.sdk import Client
    from xmodal.client.table import format_hits

__all__ = ["AsyncClient", "Client", "Hit", "Retry", "format_hits"]
_HOMES = {"Client": "xmodal.client.sdk", "AsyncClient": "xmodal.client.aio", "Hit": "xmodal.client.hits",
          "Retry": "xmodal.retry", "format_hits": "xmodal.client.table"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'xmodal.client' has no attribute {name!r}")
