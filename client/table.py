"""Plain-text tables for search results (the CLI's default output)."""
from __future__ import annotations

from typing import Sequence

from xmodal.client.hits import Hit

COLUMNS = ("rank", "score", "concept", "caption", "image")
CAPTION_WIDTH = 48


def _shorten(text: str, width: int) -> str:
    text = " ".join(text.split())  # one line
    return text if len(text) <= width else text[: width - 1] + "…"


def format_hits(hits: Sequence[Hit]) -> str:
    """rank, score, concept, title (first caption, or the file's name), image: one aligned row a hit."""
    if not hits:
        return "(no results)"
    rows = [
        (str(rank), f"{hit.score:.4f}", hit.concept, _shorten(hit.title, CAPTION_WIDTH),
         hit.image)
        for rank, hit in enumerate(hits, start=1)
    ]
    widths = [max(len(column), *(len(row[i]) for row in rows)) for i, column in enumerate(COLUMNS)]
    right = {0, 1}  # numbers align right

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(row) for row in rows)])
