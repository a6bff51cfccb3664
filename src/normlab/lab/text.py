"""Plain-text tables for the command line."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]],
               width: int | None = None) -> str:
    """Left-aligned columns under a header and a rule.

    A newline in a cell of the last column starts a new line there; with `width`, that
    column also wraps so that every line fits in `width` characters.
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header) - 1)]
    room = None if width is None else width - sum(w + 2 for w in widths)
    blocks = [(row[:-1], [piece for part in row[-1].split("\n")
                          for piece in (textwrap.wrap(part, room) if room else [part]) or [""]])
              for row in cells]
    widths.append(max(len(line) for _, lines in blocks for line in lines))
    out = []
    for first, lines in blocks:
        out += ["  ".join(c.ljust(w) for c, w in zip([*first, line], widths)).rstrip()
                for first, line in zip([first] + [[""] * len(first)] * (len(lines) - 1), lines)]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
