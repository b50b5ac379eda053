"""Showing output: follow growing log files and write what they gain to the console.

Process output is stored as raw bytes (never altered); here it is decoded as UTF-8 with replacement,
incrementally, so a character split across two reads, invalid bytes, ``\\r`` progress bars and a 10 MB
line without a newline all come out right.
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
    progress bar or prompt without a newline still appears), and flushed at the end.
    """

    def __init__(self, path: str, stream: TextIO, prefix: str = "") -> None:
        self.path = path
        self.stream = stream
        self.prefix = prefix
        self._fh = None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._partial_since = 0.0

    def _write(self, text: str, final: bool = False) -> None:
        if not self.prefix:
            if text:
                write_text(self.stream, text)
            return
        if text:
            if not self._partial:
                self._partial_since = time.monotonic()
            text = self._partial + text
            cut = text.rfind("\n") + 1
            if cut:
                prefix = self.prefix
                write_text(self.stream, prefix + text[:cut - 1].replace("\n", "\n" + prefix) + "\n")
                if cut < len(text):
                    self._partial_since = time.monotonic()
            self._partial = text[cut:]
        if self._partial and (final or time.monotonic() - self._partial_since >= PARTIAL_LINE_DELAY):
            write_text(self.stream, self.prefix + self._partial + "\n")
            self._partial = ""

    def poll(self, final: bool = False, budget: int = 8 * _CHUNK) -> int:
        """Copy what was appended since the last call (at most ``budget`` bytes unless ``final``)."""
        if self._fh is None:
            try:
                self._fh = open(self.path, "rb")
            except FileNotFoundError:
                return 0
        done = 0
        while final or done < budget:
            chunk = self._fh.read(_CHUNK)
            if not chunk:
                break
            done += len(chunk)
            self._write(self._decoder.decode(chunk))
        if final:
            self._write(self._decoder.decode(b"", final=True), final=True)
        elif self._partial:
            self._write("")
        if done or final:
            self.stream.flush()
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
