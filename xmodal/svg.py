"""SVG images rendered to PNG with cairosvg (the `data` extra): the OpenMoji and Iconify corpora,
and the SVG files of a folder the indexer walks.

Rendering never reaches outside the SVG itself: an SVG from a user's folder may reference other
files or URLs (``<image href="file:///…">``, ``http://…``), and reading them would leave the roots
the user declared (or the machine). cairosvg with ``unsafe=False`` (its default, kept here on
purpose) reads only ``data:`` URLs, draws every other reference as empty, and resolves no XML
entities; ``tests/test_index_folder.py`` checks that a file and a URL referenced are not read.
"""
from __future__ import annotations

# The indexer renders a folder's SVG files at this size (square); preprocessing then
# resizes to the model's input, which is smaller for every model xmodal trains.
INDEX_RENDER_SIZE = 256


class SVGError(ValueError):
    """The bytes are not an SVG cairosvg can render."""


def render_svg(svg: bytes, size: int) -> bytes:
    """PNG bytes (RGBA) of `svg`, `size` x `size` (a drawing with a viewBox keeps its aspect
    ratio inside, as SVG's default ``preserveAspectRatio`` says; a fixed size bounds the work
    whatever the file claims). SVGError for what cannot be rendered."""
    import cairosvg  # imported here: loading libcairo costs time that PNG-only callers need not pay

    try:
        png = cairosvg.svg2png(bytestring=svg, unsafe=False, output_width=size, output_height=size)
    except Exception as exc:  # cairosvg raises parser, value, type and cairo errors alike on bad input
        raise SVGError(f"cannot render SVG: {type(exc).__name__}: {exc}") from None
    if not png:
        raise SVGError("cannot render SVG: cairosvg produced no output")
    return png
