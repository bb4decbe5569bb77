"""The library: an SQLite index under `$STUDIO_HOME` of adapters, training jobs and generations.

WAL mode, one short transaction per change, so a crash never loses a finished job and readers (the
web UI) never block the trainer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from studio.home import studio_home

SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    path TEXT PRIMARY KEY, name TEXT, kind TEXT, family TEXT, base TEXT, trigger_words TEXT, tags TEXT,
    sha256 TEXT, thumbnail TEXT, added REAL);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch TEXT, name TEXT, config TEXT, status TEXT, error TEXT,
    result TEXT, step INTEGER DEFAULT 0, created REAL, updated REAL, attempts INTEGER DEFAULT 0, worker TEXT,
    log TEXT, UNIQUE (batch, name));
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT, recipe TEXT, created REAL);
"""
JOB_STATES = ("queued", "running", "retrying", "done", "failed", "cancelled")
# columns added since the first schema, given to older databases when they open
ADDED_COLUMNS = {"jobs": {"attempts": "INTEGER DEFAULT 0", "worker": "TEXT", "log": "TEXT"}}
JOB_LOG_CHARS = 20_000  # the last lines of each job's log are kept


class Library:
    """`Library()` opens (and creates) `$STUDIO_HOME/library.db`."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else studio_home() / "library.db"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                for name, declaration in columns.items():
                    if name not in have:
                        db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

    @contextmanager
    def _connect(self):
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        try:
            with db:
                yield db
        finally:
            db.close()

    # ---------------------------------------------------------------------------------- adapters

    def add_adapter(self, path: str | Path, *, tags: list[str] | None = None, thumbnail: str | None = None) -> dict:
        """Index an adapter file, or a control model's folder (its manifest's kind, family, trigger words; its hash)."""
        from studio.adapters.base import read_manifest, read_safetensors
        from studio.hashing import hash_files

        path = Path(path).resolve()
        if path.is_dir():
            from studio.adapters.control import WEIGHTS

            _, metadata = read_safetensors(path / WEIGHTS)
        else:
            _, metadata = read_safetensors(path)
        manifest = read_manifest(metadata, path) or {}
        row = {"path": str(path), "name": manifest.get("name") or path.stem, "kind": manifest.get("kind", "lora"),
               "family": manifest.get("family", ""), "base": manifest.get("base", ""),
               "trigger_words": json.dumps(manifest.get("trigger_words", [])), "tags": json.dumps(tags or []),
               "sha256": hash_files(path), "thumbnail": thumbnail, "added": time.time()}
        with self._connect() as db:
            db.execute(f"INSERT OR REPLACE INTO adapters ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                       tuple(row.values()))
        return row

    def adapters(self, query: str = "") -> list[dict[str, Any]]:
        """Adapters whose name, kind, family, trigger words or tags contain `query`, newest first."""
        like = f"%{query}%"
        with self._connect() as db:
            rows = db.execute("SELECT * FROM adapters WHERE name LIKE ? OR kind LIKE ? OR family LIKE ? OR "
                              "trigger_words LIKE ? OR tags LIKE ? ORDER BY added DESC", (like,) * 5).fetchall()
        return [dict(r) for r in rows]

    def adapter(self, path: str | Path) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM adapters WHERE path = ?", (str(Path(path).resolve()),)).fetchone()
        return dict(row) if row else None

    # -------------------------------------------------------------------------------------- jobs

    def add_jobs(self, batch: str, jobs: dict[str, dict[str, Any]]) -> None:
        """Queue named jobs of a batch; jobs already there (from an earlier start) are kept as they are."""
        now = time.time()
        with self._connect() as db:
            for name, config in jobs.items():
                db.execute("INSERT OR IGNORE INTO jobs (batch, name, config, status, created, updated) "
                           "VALUES (?, ?, ?, 'queued', ?, ?)", (batch, name, json.dumps(config), now, now))

    def start_job(self, batch: str, name: str, config: dict[str, Any]) -> int:
        """A job queued afresh (a finished or failed one of the same name is started over); its id."""
        now = time.time()
        with self._connect() as db:
            db.execute("INSERT INTO jobs (batch, name, config, status, step, created, updated) "
                       "VALUES (?, ?, ?, 'queued', 0, ?, ?) ON CONFLICT (batch, name) DO UPDATE SET "
                       "config = excluded.config, status = 'queued', step = 0, error = NULL, result = NULL, "
                       "updated = excluded.updated", (batch, name, json.dumps(config), now, now))
            return db.execute("SELECT id FROM jobs WHERE batch = ? AND name = ?", (batch, name)).fetchone()[0]

    def job(self, job_id: int) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return dict(row) if row else None

    def jobs(self, batch: str | None = None) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE ? IS NULL OR batch = ? ORDER BY id", (batch, batch)).fetchall()
        return [dict(r) for r in rows]

    def update_job(self, job_id: int, **values: Any) -> None:
        if "status" in values and values["status"] not in JOB_STATES:
            raise ValueError(f"job status {values['status']!r} is not one of {JOB_STATES}")
        values["updated"] = time.time()
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                       (*values.values(), job_id))

    def add_job_log(self, job_id: int, line: str) -> None:
        """Append a line to a job's log (its last JOB_LOG_CHARS characters are kept)."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET log = substr(coalesce(log, '') || ? || char(10), ?), updated = ? WHERE id = ?",
                       (line, -JOB_LOG_CHARS, time.time(), job_id))

    # ------------------------------------------------------------------------------- generations

    def add_generation(self, path: str | Path, recipe_json: str) -> None:
        with self._connect() as db:
            db.execute("INSERT INTO generations (path, recipe, created) VALUES (?, ?, ?)",
                       (str(path), recipe_json, time.time()))

    def generations(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM generations ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [dict(r) for r in rows]
