"""Showing output: follow growing log files and write what they gain to the console.

Process output is stored as raw bytes (never altered). A console or file gets those bytes unchanged;
a text-only stream (``io.StringIO``) gets them decoded as UTF-8 with replacement, incrementally, so a
character split across two reads, invalid bytes, ``\\r`` progress bars and a 10 MB line without a
newline all come out right.
"""
from __future__ import annotations

import codecs
import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Callable, TextIO

__all__ = ["Follower", "write_text", "follow_files"]

_CHUNK = 1 << 20


def write_text(stream: TextIO, text: str) -> None:
    """Write ``text``, replacing what the stream's encoding cannot represent."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "replace").decode(encoding))


PARTIAL_LINE_DELAY = 0.5  # a prefixed line without its newline yet is shown after this long


class Follower:
    """Follows one file from its start, writing new content to ``stream`` on each :meth:`poll`.

    With a ``prefix`` (``"[rank 3] "``), every line gets it; a partial line is held until its newline
    comes, for at most :data:`PARTIAL_LINE_DELAY` (then it is shown as a line of its own, so a
    progress bar or prompt without a newline still appears), and flushed at the end. A stream with a
    binary ``buffer`` (a console, a file) gets the bytes as they are, which is exact and fast; other
    text streams get UTF-8 decoded with replacement.
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
        self._partial = self._nl[:0]
        self._partial_since = 0.0

    def _emit(self, data: str | bytes) -> None:
        if self._binary:
            self.stream.flush()  # whatever was written as text before goes first
            self._buffer.write(data)  # type: ignore[union-attr]
        else:
            write_text(self.stream, data)  # type: ignore[arg-type]

    def _write(self, data: str | bytes, final: bool = False) -> None:
        if not self.prefix:
            if data:
                self._emit(data)
            return
        nl = self._nl
        if data:
            if self._partial:
                data = self._partial + data  # type: ignore[operator]
            else:
                self._partial_since = time.monotonic()
            cut = data.rfind(nl) + 1  # type: ignore[arg-type]
            if cut:
                prefix = self.prefix
                body = data if cut == len(data) else data[:cut]
                out = body.replace(nl, nl + prefix)  # type: ignore[arg-type]  # each line's end + the next prefix
                self._emit(prefix)
                self._emit(memoryview(out)[:len(out) - len(prefix)] if self._binary else out[:len(out) - len(prefix)])
                if cut < len(data):
                    self._partial_since = time.monotonic()
            self._partial = data[cut:]
        if self._partial and (final or time.monotonic() - self._partial_since >= PARTIAL_LINE_DELAY):
            self._emit(self.prefix + self._partial + nl)  # type: ignore[operator]
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
