"""How the CLI writes: tables, JSON, durations, sizes, a spinner.

On a terminal, tables and the spinner use rich (colour, box-free tables); in
a pipe or a file the same data is plain text in aligned columns, with no
escape codes, so ``fabric ps | grep web`` and scripts see stable text.
``--json`` output is the contract's own field names: the msgspec structs
are encoded as they are.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any

import msgspec

__all__ = [
    "STATE_STYLES",
    "age",
    "human_bytes",
    "human_duration",
    "is_tty",
    "print_json",
    "print_table",
    "spinner",
]

STATE_STYLES = {
    "running": "green",
    "ready": "green",
    "healthy": "green",
    "paused": "yellow",
    "starting": "cyan",
    "pending": "cyan",
    "backoff": "yellow",
    "stopping": "yellow",
    "draining": "yellow",
    "cordoned": "yellow",
    "suspect": "yellow",
    "degraded": "yellow",
    "stopped": "dim",
    "exited": "dim",
    "failed": "red",
    "lost": "red",
    "unhealthy": "red",
}


def is_tty(stream: IO[str] | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def print_json(value: Any, stream: IO[str] | None = None) -> None:
    """Pretty JSON of structs, lists or dicts, then a newline."""
    out = sys.stdout if stream is None else stream
    data = msgspec.json.format(msgspec.json.encode(value), indent=2)
    out.write(data.decode() + "\n")
    out.flush()


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    styles: Sequence[int] = (),
    stream: IO[str] | None = None,
) -> None:
    """Rows under headers; ``styles`` lists the columns coloured by :data:`STATE_STYLES`."""
    out = sys.stdout if stream is None else stream
    if is_tty(out):
        _rich_table(headers, rows, styles, out)
        return
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in (headers, *rows):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        out.write(line.rstrip() + "\n")
    out.flush()


def _rich_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], styles: Sequence[int], out: IO[str]
) -> None:
    # Imported here: rich costs ~50 ms to import, and pipes never need it.
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, header_style="bold", pad_edge=False)
    for header in headers:
        table.add_column(header, no_wrap=True)
    for row in rows:
        cells = [
            Text(cell, style=STATE_STYLES.get(cell, "")) if i in styles else Text(cell)
            for i, cell in enumerate(row)
        ]
        table.add_row(*cells)
    # As wide as the content even past the terminal's edge: rich would
    # otherwise cut ids and states to fit, and a cut id is a wrong id.
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    console = Console(file=out)
    console.width = max(console.width, sum(widths) + 2 * (len(widths) - 1))
    console.print(table)


@contextlib.contextmanager
def spinner(text: str) -> Iterator[Any]:
    """A spinner on stderr while the block runs, only on a terminal.

    Yields an object with ``update(text)`` (a no-op off a terminal).
    """
    if not is_tty(sys.stderr):
        yield _NoStatus()
        return
    from rich.console import Console

    with Console(stderr=True).status(text) as status:
        yield status


class _NoStatus:
    def update(self, *_args: object, **_kwargs: object) -> None:
        return None


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f}{unit}" if unit == "B" else f"{size:.1f}{unit}"
        size /= 1024
    return f"{n}B"  # unreachable; keeps type checkers content


def human_duration(seconds: float | None) -> str:
    """``42s``, ``3m12s``, ``5h3m``, ``2d4h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def age(moment: datetime | None, now: datetime | None = None) -> float | None:
    """Seconds since ``moment`` (None when unknown)."""
    if moment is None:
        return None
    return ((now or datetime.now(UTC)) - moment).total_seconds()
