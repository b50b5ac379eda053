"""The launcher's side of the rank wrapper's frames (:mod:`tflaunch.remote.rank`): mpirun's (or an srun step's)
single output stream split back into each rank's stdout and stderr, the ranks' start and exit reports,
and what the launcher process wrote itself."""
from __future__ import annotations

from ..remote.rank import MARK, SEP, unescape

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Callable

__all__ = ["Demux"]


class Demux:
    """Splits the one launcher process's output (fd 1 and 2) into per-rank streams.

    ``write(rank, fd, data)`` receives a rank's output, ``other(fd, data)`` what mpirun itself wrote,
    ``event(rank, kind, text)`` the ``s``/``x`` reports.
    """

    def __init__(self, write: Callable[[int, int, bytes], None], other: Callable[[int, bytes], None],
                 event: Callable[[int, str, str], None]) -> None:
        self.write = write
        self.other = other
        self.event = event
        self.pending = {1: b"", 2: b""}

    def feed(self, fd: int, data: bytes) -> None:
        buf = self.pending[fd] + data
        lines = buf.split(b"\n")
        self.pending[fd] = lines.pop()
        for line in lines:
            self._line(fd, line)

    def close(self) -> None:
        for fd, rest in self.pending.items():
            if rest:
                self._line(fd, rest)
            self.pending[fd] = b""

    def _line(self, fd: int, line: bytes) -> None:
        cut = line.find(MARK, 1)
        if cut > 0:  # a frame cut by a reader upstream, then another rank's frame: keep that one whole
            self.other(fd, line[:cut] + b"\n")
            self._line(fd, line[cut:])
            return
        if line.startswith(MARK):
            head, sep, body = line[1:].partition(SEP)
            if sep and head.isdigit() and body:
                rank, kind, payload = int(head), body[:1], body[1:]
                if kind == b"l":
                    self.write(rank, fd, unescape(payload) + b"\n")
                    return
                if kind == b"p":
                    self.write(rank, fd, unescape(payload))
                    return
                if kind in (b"s", b"x"):
                    self.event(rank, kind.decode(), payload.decode("utf-8", "replace"))
                    return
        self.other(fd, line + b"\n")
