"""How values look in the CLI's tables and the HTML report: timestamps, durations, metric values, columns."""
from __future__ import annotations

import json
import math

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any, Sequence

__all__ = ["timestamp", "duration", "value", "table", "size_text"]

_NONFINITE = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}  # as --json output writes them


def timestamp(text: Any) -> str:
    """``2026-11-23T10:15:30.123Z`` -> ``2026-11-23 10:15:30``; ``-`` when missing."""
    return str(text)[:19].replace("T", " ") if text else "-"


def duration(seconds: Any) -> str:
    """``12.5s``, ``3.2m``, ``1.5h``; ``-`` for anything that is not a finite number."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def value(v: Any) -> str:
    """A metric value for a table cell: floats to 6 significant digits, lists and rows as short JSON."""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    if v is None:
        return "-"
    if isinstance(v, str) and v in _NONFINITE:
        return _NONFINITE[v]
    if isinstance(v, (list, dict)):
        text = json.dumps(v, ensure_ascii=False, default=str)
        return text if len(text) <= 40 else text[:37] + "..."
    return str(v)


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, one line per row (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n" for row in rows)


def size_text(n: float) -> str:
    """``512 bytes``, ``4.0 KB``, ``14.2 MB``, ``1.2 GB`` (powers of 1024, as the snapshot limits count)."""
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} byte{'s' if n != 1 else ''}"
