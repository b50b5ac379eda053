"""``tflaunch ui``: the live local portal over the home (:mod:`tflaunch.portal`; the parser is added to
:func:`tflaunch.cli.build_parser`'s), and the portal URL ``runs show`` prints while one runs."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs ~7 ms of start-up; annotations are strings
    from typing import Any

__all__ = ["add_command", "portal_url"]

log = logging.getLogger(__name__)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535; 0: any free port)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0: any free port)")
    return port


def add_command(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("ui", parents=[common], help="a live local portal over the runs (read-only web pages)")
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on (default 127.0.0.1; any other address requires the printed token)")
    p.add_argument("--port", type=_port, default=0, metavar="PORT", help="port (default 0: any free port)")
    p.set_defaults(func=cmd_ui)


class _Stop(Exception):
    """SIGTERM / SIGHUP: stop serving, exit 0."""


def _stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


def cmd_ui(args: argparse.Namespace) -> int:
    from ..portal.server import Portal

    portal = Portal(getattr(args, "home", None), args.host, args.port)
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    code = 0
    try:
        portal.publish()
        sys.stdout.write(portal.url + "\n")
        sys.stdout.flush()
        log.info("portal over %s at %s (%s; Ctrl-C stops it)", portal.store.home, portal.url,
                 "loopback only" if portal.loopback else "the token in the URL is required")
        portal.serve_forever()
    except _Stop:
        code = 0
    except KeyboardInterrupt:
        code = 130
    finally:
        portal.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("portal stopped")
    return code


def portal_url(record: Any) -> str | None:
    """The run's page in the live portal serving its home (None: no portal answers)."""
    from ..portal.discover import live_portal, run_page_url

    info = live_portal(record.store.home)
    return run_page_url(info, record.id) if info is not None else None
