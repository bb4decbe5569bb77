"""Named points where a kill is simulated, so tests can cut a run at the worst moments of its file cycle.

`point("checkpoint:deleting-old")` does nothing unless that point is armed: by `arm(name)` in a test (it then
raises Killed, a BaseException that no `except Exception` catches, and none of studio's file code has a
`finally` that would tidy up after it, so the files are left as a kill leaves them) or by
`$STUDIO_KILL_AT=name` in a child process (it then exits at once with status 137, as SIGKILL does).
"""

from __future__ import annotations

import os


class Killed(BaseException):
    """A simulated kill at a named point."""


_armed: dict[str, int] = {}  # point -> how many more passes until the kill


def arm(name: str, hit: int = 1) -> None:
    """Kill at the `hit`-th pass through point `name` from now."""
    _armed[name] = hit


def disarm() -> None:
    _armed.clear()


def point(name: str) -> None:
    if name in _armed:
        _armed[name] -= 1
        if not _armed[name]:
            del _armed[name]
            raise Killed(name)
    if os.environ.get("STUDIO_KILL_AT") == name:
        os._exit(137)
