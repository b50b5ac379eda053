"""A run's stages as they go (snapshot, environment, hosts connecting, ranks running, outputs collected).

The stages report through the ``tflaunch.progress`` logger (:func:`report`): a library user sees them only
with logging configured at INFO, and a detached supervisor's ``launcher.log`` gets them as lines. The
command line's console handler (:class:`tflaunch.cli.console.ConsoleHandler`) shows them on stderr: on a
terminal one status line per stage that rewrites itself (:func:`draw`), elsewhere (a pipe, CI,
``--detach``) a plain line when a stage is done, and when one that may take minutes (``slow``: an
environment build) begins (:class:`PlainStages`). A status line on the terminal is
ended (:func:`end_line`: its last state stays on screen, a newline after it) before anything else is
written there: tflaunch's messages, and the ranks' output (:mod:`tflaunch.tail`), so it is never mixed
into the script's own lines.
"""
from __future__ import annotations

import logging
import shutil
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import TextIO

__all__ = ["report", "draw", "end_line", "clear_line", "stage_of", "PlainStages", "STAGES", "REDRAW_INTERVAL"]

log = logging.getLogger("tflaunch.progress")

STAGES = ("snapshot", "environment", "hosts", "ranks", "outputs")
STAGE_ATTR, DONE_ATTR, SLOW_ATTR = "tflaunch_stage", "tflaunch_stage_done", "tflaunch_stage_slow"  # log records
REDRAW_INTERVAL = 0.1  # a terminal's status line is rewritten at most this often (a stage's end always)
_ERASE = "\x1b[K"  # erase to the end of the line (VT100; every terminal emulator in use has it)


def report(stage: str, text: str, done: bool = False, slow: bool = False) -> None:
    """Say where ``stage`` (one of :data:`STAGES`) is: ``text`` is its whole state (``hosts: 3/8
    connected``), ``done`` when the stage has ended (the status line is then kept, and a new one begins),
    ``slow`` when what begins may take minutes (a log that is no terminal shows it too)."""
    if log.isEnabledFor(logging.INFO):
        log.info("%s", text, extra={STAGE_ATTR: stage, DONE_ATTR: done, SLOW_ATTR: slow})


def stage_of(record: logging.LogRecord) -> tuple[str | None, bool]:
    """The stage a log record reports (None for any other message), and whether it is done."""
    return getattr(record, STAGE_ATTR, None), bool(getattr(record, DONE_ATTR, False))



class PlainStages(logging.Filter):
    """Lets through the record that ends a stage and the ones saying a slow step begins (every other
    record too): the plain lines of a log that is no terminal (a pipe, CI, a detached supervisor's
    ``launcher.log``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        stage, done = stage_of(record)
        return stage is None or done or bool(getattr(record, SLOW_ATTR, False))


class _Line:
    """The status line open on a terminal: its stream, stage, what it shows and what it should show."""

    def __init__(self, stream: TextIO, stage: str) -> None:
        self.stream = stream
        self.stage = stage
        self.shown = ""
        self.pending = ""
        self.drawn_at: float | None = None  # never drawn yet

    def write(self, text: str) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        if len(text) >= width:  # a line that wraps cannot be rewritten in place
            text = text[:max(width - 4, 10)] + "..."
        self.stream.write("\r" + text + _ERASE)
        self.stream.flush()
        self.shown, self.pending, self.drawn_at = text, "", time.monotonic()


_open: _Line | None = None


def draw(stream: TextIO, stage: str, text: str, done: bool) -> None:
    """Show ``text`` as ``stage``'s status line on the terminal ``stream``: rewritten in place (at most
    every :data:`REDRAW_INTERVAL` s; the latest state is kept for the next one), ended when ``done``."""
    global _open
    if _open is not None and (_open.stage != stage or _open.stream is not stream):
        end_line()
    if _open is None:
        _open = _Line(stream, stage)
    if done or _open.drawn_at is None or time.monotonic() - _open.drawn_at >= REDRAW_INTERVAL:
        _open.write(text)
    else:
        _open.pending = text
    if done:
        end_line()


def clear_line() -> None:
    """Erase the status line open on the terminal, if one is (what it said is no longer true)."""
    global _open
    line, _open = _open, None
    if line is not None:
        try:
            line.stream.write("\r" + _ERASE)
            line.stream.flush()
        except (OSError, ValueError):
            pass


def end_line() -> None:
    """End the status line open on the terminal, if one is: its latest state, then a newline."""
    global _open
    line, _open = _open, None
    if line is None:
        return
    try:
        if line.pending:
            line.write(line.pending)
        line.stream.write("\n")
        line.stream.flush()
    except (OSError, ValueError):  # the terminal is gone
        pass
