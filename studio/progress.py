"""Progress text shared by the CLI's job bars (studio.cli.JobProgress) and the batch driver's lines
(studio.jobs.Recorder)."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """A duration as M:SS, or H:MM:SS from an hour."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
