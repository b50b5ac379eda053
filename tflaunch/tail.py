"""Showing output: follow growing log files and write what they gain to the console.

Process output is stored as raw bytes (never altered). A console or file gets those bytes unchanged
when they are one process's; a text-only stream (``io.StringIO``) gets them decoded as UTF-8 with
replacement, incrementally, so a character split across two reads, invalid bytes, ``\\r`` progress
bars and a 10 MB line without a newline all come out right. The lines of several processes get a
prefix each (``[rank 3] ``), and a ``\\r`` progress bar stays under it: in place on a terminal, its
last state only elsewhere.
"""
from __future__ import annotations

import codecs
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Callable, TextIO

__all__ = ["Follower", "write_text", "follow_files", "end_open_line"]

_CHUNK = 1 << 20


def write_text(stream: TextIO, text: str) -> None:
    """Write ``text``, replacing what the stream's encoding cannot represent."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "replace").decode(encoding))


PARTIAL_LINE_DELAY = 0.5  # a prefixed line without its newline yet is shown after this long
BAR_INTERVAL = 10.0  # not on a terminal: a ``\r`` line (progress bar) that goes on shows its state this often

_open_line: Follower | None = None  # the follower whose line is unfinished on the terminal


def end_open_line() -> None:
    """End the line a follower left unfinished on the terminal (a progress bar in place), so that what
    comes next (another rank's line, a log message) starts a line of its own."""
    global _open_line
    follower, _open_line = _open_line, None
    if follower is not None and follower._open:
        follower._open = False
        follower._emit(follower._nl)
        follower._flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class Follower:
    """Follows one file from its start, writing new content to ``stream`` on each :meth:`poll`.

    With a ``prefix`` (``"[rank 3] "``), every line gets it. On a terminal, output is shown as it comes,
    and a ``\r`` (a progress bar's update) is followed by the prefix again, so the bar updates in place
    under it; a line left unfinished is ended before any other follower writes (:func:`end_open_line`).
    Elsewhere (a pipe, a file, ``io.StringIO``) only the last state of a ``\r`` line is shown, when the
    line ends (or every :data:`BAR_INTERVAL` s while it goes on); a partial line is held until its newline
    comes, for at most :data:`PARTIAL_LINE_DELAY` (then it is shown as a line of its own, so a prompt
    without a newline still appears), and flushed at the end. Without a prefix the bytes are passed
    on unchanged. A stream with a binary ``buffer`` (a console, a file) gets bytes, which is exact and
    fast; other text streams get UTF-8 decoded with replacement. The file itself is never altered.
    """

    def __init__(self, path: str, stream: TextIO, prefix: str = "") -> None:
        self.path = path
        self.stream = stream
        self._fh = None
        self._buffer = getattr(stream, "buffer", None)
        self._binary = self._buffer is not None
        self._decoder = None if self._binary else codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.prefix: str | bytes = prefix.encode("utf-8") if self._binary else prefix
        self._nl: str | bytes = b"\n" if self._binary else "\n"
        self._cr: str | bytes = b"\r" if self._binary else "\r"
        self._cr_bs: str | bytes = b"\r\b" if self._binary else "\r\b"
        self._tty = _isatty(stream)
        self._open = False  # on a terminal: this follower's line is unfinished there
        self._partial = self._nl[:0]
        self._partial_since = 0.0
        self._shown = None  # not on a terminal: the state of the current \r line shown already
        self._shown_at = 0.0

    def _emit(self, data: str | bytes) -> None:
        if self._binary:
            self.stream.flush()  # whatever was written as text before goes first
            self._buffer.write(data)  # type: ignore[union-attr]
        else:
            write_text(self.stream, data)  # type: ignore[arg-type]

    def _flush(self) -> None:
        self.stream.flush()
        if self._buffer is not None:
            self._buffer.flush()

    def _end_others(self) -> None:
        """Before this follower writes on the terminal: the lines others left unfinished there end."""
        from .progress import end_line
        end_line()  # a stage's status line (tflaunch.progress) keeps its line
        if _open_line is not None and _open_line is not self:
            end_open_line()

    def _write(self, data: str | bytes, final: bool = False) -> None:
        if data and self._tty and not self.prefix:
            self._end_others()
        if not self.prefix:
            if data:
                self._emit(data)
        elif self._tty:
            self._write_tty(data, final)
        else:
            self._write_lines(data, final)

    def _write_tty(self, data: str | bytes, final: bool) -> None:
        """A terminal: at once, the prefix at each line's start and after each ``\r``; a new line's start
        without a ``\r`` is held for up to :data:`PARTIAL_LINE_DELAY` until its newline comes (whole lines
        stay whole when several ranks write)."""
        global _open_line
        nl, cr, prefix = self._nl, self._cr, self.prefix
        now = time.monotonic()
        held_since = self._partial_since if self._partial else now
        if self._partial:
            data, self._partial = self._partial + data, nl[:0]  # type: ignore[operator]
        cut = data.rfind(nl) + 1  # type: ignore[arg-type]
        tail, tail_since = data[cut:], now if cut else held_since
        if tail and not final and cr not in tail and not (self._open and not cut) \
                and now - tail_since < PARTIAL_LINE_DELAY:  # type: ignore[operator]  # a new line's start
            self._partial, self._partial_since = tail, tail_since
            data = data[:cut]
        if data:
            self._end_others()
            out = []
            pieces = data.split(nl)  # type: ignore[arg-type]
            for i, piece in enumerate(pieces):
                ends = i < len(pieces) - 1  # a newline follows this piece
                if not self._open:
                    piece = piece.lstrip(self._cr_bs)  # type: ignore[arg-type]  # at the line's start already
                crlf = ends and piece.endswith(cr)  # type: ignore[arg-type]
                if crlf:
                    piece = piece[:-1]
                if piece:
                    if not self._open:
                        out.append(prefix)
                    out.append(piece.replace(cr, cr + prefix))  # type: ignore[arg-type]
                    self._open = True
                if ends:
                    out.append(cr + nl if crlf else nl)  # type: ignore[operator]
                    self._open = False
            self._emit(nl[:0].join(out))  # type: ignore[arg-type]
        if final and self._open:
            self._emit(nl)
            self._open = False
        if self._open:
            _open_line = self
        elif _open_line is self:
            _open_line = None

    def _state(self, line: str | bytes) -> str | bytes:
        """What a terminal would show of ``line`` (no newline) at best: its text after the last ``\r``."""
        line = line.rstrip(self._cr)  # type: ignore[arg-type]  # \r\n line ends
        return line[line.rfind(self._cr) + 1:].rstrip(self._cr_bs[1:])  # type: ignore[arg-type]

    def _write_lines(self, data: str | bytes, final: bool) -> None:
        """Not a terminal: whole lines, the last state of each ``\r`` line."""
        nl, cr, prefix = self._nl, self._cr, self.prefix
        now = time.monotonic()
        if data:
            if self._partial:
                data = self._partial + data  # type: ignore[operator]
            else:
                self._partial_since = now
            cut = data.rfind(nl) + 1  # type: ignore[arg-type]
            if cut:
                body = data if cut == len(data) else data[:cut]
                if cr in body:  # type: ignore[operator]
                    lines = [self._state(line) for line in body[:-1].split(nl)]  # type: ignore[arg-type]
                    if self._shown is not None and lines[0] == self._shown:
                        lines.pop(0)  # the bar's last state was shown already
                    body = nl.join(lines + [nl[:0]]) if lines else nl[:0]  # type: ignore[arg-type]
                if body:
                    out = body.replace(nl, nl + prefix)  # type: ignore[arg-type]  # each line's end + the next prefix
                    self._emit(prefix)
                    self._emit(memoryview(out)[:len(out) - len(prefix)] if self._binary else out[:len(out) - len(prefix)])
                self._shown = None
                if cut < len(data):
                    self._partial_since = now
            self._partial = data[cut:]
            if cr in self._partial:  # type: ignore[operator]  # keep only a bar's latest state
                self._partial = cr + self._state(self._partial)  # type: ignore[operator]
        partial = self._partial
        if not partial:
            return
        if cr in partial:  # type: ignore[operator]  # a progress bar going on
            state = self._state(partial)
            if state and state != self._shown and (final or now - (self._shown_at if self._shown is not None
                                                         else self._partial_since) >= BAR_INTERVAL):
                self._emit(prefix + state + nl)  # type: ignore[operator]
                self._shown, self._shown_at = state, now
            if final:
                self._partial, self._shown = nl[:0], None
        elif final or now - self._partial_since >= PARTIAL_LINE_DELAY:
            self._emit(prefix + partial + nl)  # type: ignore[operator]
            self._partial = nl[:0]

    def poll(self, final: bool = False, budget: int = 8 * _CHUNK) -> int:
        """Copy what was appended since the last call (at most ``budget`` bytes unless ``final``)."""
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                return 0
        done = 0
        decoder = self._decoder
        while final or done < budget:
            chunk = self._fh.read(_CHUNK)
            if not chunk:
                break
            done += len(chunk)
            self._write(decoder.decode(chunk) if decoder else chunk)
        if final:
            self._write(decoder.decode(b"", final=True) if decoder else b"", final=True)
        elif self._partial:
            self._write(self._nl[:0])
        if done or final:
            self.stream.flush()
            if self._buffer is not None:
                self._buffer.flush()
        return done

    def close(self) -> None:
        if _open_line is self:
            end_open_line()
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def follow_files(pairs: Callable[[], list[tuple[str, TextIO, str]]], finished: Callable[[], bool],
                 interval: float = 0.2) -> None:
    """Follow the files ``pairs()`` names as (path, stream, line prefix), re-asked each round, until
    ``finished()``, then drain them."""
    followers: dict[str, Follower] = {}
    try:
        while True:
            done = finished()
            for path, stream, prefix in pairs():
                if path not in followers:
                    followers[path] = Follower(path, stream, prefix)
            moved = sum(f.poll(final=done) for f in followers.values())
            if done:
                return
            if not moved:
                time.sleep(interval)
    finally:
        for f in followers.values():
            f.close()


def tail_bytes(path: str, limit: int = 4096) -> bytes:
    """The last ``limit`` bytes of ``path`` (empty if missing)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read()
    except OSError:
        return b""
