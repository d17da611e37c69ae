"""The study store: one SQLite file per study with job states, result rows and per-item records. Each job's results
are written in one transaction, so a killed run never leaves half a job behind.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError
from .graph import Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (key TEXT PRIMARY KEY, kind TEXT, name TEXT, status TEXT, started REAL,
  finished REAL, error TEXT, result TEXT);
CREATE TABLE IF NOT EXISTS rows (job_key TEXT, kind TEXT, domain TEXT, seed INTEGER, row TEXT);
CREATE TABLE IF NOT EXISTS items (job_key TEXT, task TEXT, idx INTEGER, record TEXT);
CREATE INDEX IF NOT EXISTS rows_job ON rows(job_key);
CREATE INDEX IF NOT EXISTS items_job ON items(job_key);
"""
# Columns added after the first release; a store written before gets them on open.
ADDED_COLUMNS = {"jobs": (("pid", "INTEGER"), ("host", "TEXT"))}
STATES = ("pending", "running", "interrupted", "done", "failed", "blocked")


def _alive(pid: int | None, host: str | None) -> bool | None:
    """Whether the process that owns a running job still exists; None when it runs on another host (unknowable)."""
    if pid is None or host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class StudyStore:
    """One SQLite file per study: job states, result rows and per-item records; each job commits atomically."""

    def __init__(self, path: Path, create: bool = True) -> None:
        """Open (and with ``create``, make) the store at ``path``; without ``create`` a missing store is an error."""
        self.path = path
        if not create and not path.is_file():
            raise InputError(f"{path.parent}: not a study folder (no {path.name}); give the folder `kdscope run` "
                             "wrote, or the study YAML")
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.executescript(SCHEMA)
            for table, columns in ADDED_COLUMNS.items():
                have = {row[1] for row in c.execute(f"PRAGMA table_info({table})")}
                for name, kind in columns:
                    if name not in have:
                        c.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=60)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def status(self, key: str) -> str | None:
        with self._conn() as c:
            row = c.execute("SELECT status FROM jobs WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def mark(self, job: Job, status: str, error: str | None = None) -> None:
        """Record a job's state; a running job records its owner (this process and host), so that `kdscope status`
        can tell a job that is running from one whose run was killed."""
        now = time.time()
        owner = (os.getpid(), socket.gethostname()) if status == "running" else (None, None)
        with self._conn() as c:
            c.execute(
                "INSERT INTO jobs(key, kind, name, status, started, finished, error, pid, host) "
                "VALUES(?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET status=excluded.status, error=excluded.error, "
                "started=CASE WHEN excluded.status='running' THEN excluded.started ELSE jobs.started END, "
                "finished=excluded.finished, pid=excluded.pid, host=excluded.host",
                (job.key, job.kind, job.name, status, now, None if status == "running" else now, error, *owner),
            )

    def complete(self, job: Job, result: dict[str, Any]) -> None:
        """Record a finished job and its rows / items in one transaction."""
        now = time.time()
        with self._conn() as c:
            c.execute("DELETE FROM rows WHERE job_key=?", (job.key,))
            c.execute("DELETE FROM items WHERE job_key=?", (job.key,))
            for kind, rows in result.get("rows", {}).items():
                c.executemany("INSERT INTO rows VALUES(?,?,?,?,?)",
                              [(job.key, kind, job.params.get("domain"), job.params.get("seed"), json.dumps(r))
                               for r in rows])
            c.executemany("INSERT INTO items VALUES(?,?,?,?)",
                          [(job.key, r["task"], r["index"], json.dumps(r)) for r in result.get("items", [])])
            summary = {k: v for k, v in result.items() if k not in ("rows", "items")}
            c.execute(
                "INSERT INTO jobs(key, kind, name, status, started, finished, result) VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(key) DO UPDATE SET status='done', finished=excluded.finished, error=NULL, "
                "result=excluded.result",
                (job.key, job.kind, job.name, "done", now, now, json.dumps(summary)),
            )

    def result(self, key: str) -> dict[str, Any]:
        with self._conn() as c:
            row = c.execute("SELECT result FROM jobs WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row and row[0] else {}

    def rows(self, kind: str, keys: list[str] | None = None) -> list[dict[str, Any]]:
        with self._conn() as c:
            found = c.execute("SELECT job_key, domain, seed, row FROM rows WHERE kind=? ORDER BY rowid",
                              (kind,)).fetchall()
        wanted = None if keys is None else set(keys)
        return [{"_job": k, "_domain": d, "_seed": s, **json.loads(r)} for k, d, s, r in found
                if wanted is None or k in wanted]

    def items(self, key: str) -> list[dict[str, Any]]:
        with self._conn() as c:
            found = c.execute("SELECT record FROM items WHERE job_key=? ORDER BY task, idx", (key,)).fetchall()
        return [json.loads(r[0]) for r in found]

    def jobs(self) -> list[dict[str, Any]]:
        """Every recorded job; a ``running`` job whose owner process is gone is ``interrupted`` (killed)."""
        with self._conn() as c:
            found = c.execute("SELECT key, kind, name, status, started, finished, error, pid, host FROM jobs "
                              "ORDER BY rowid").fetchall()
        cols = ("key", "kind", "name", "status", "started", "finished", "error", "pid", "host")
        jobs = [dict(zip(cols, r)) for r in found]
        for job in jobs:
            if job["status"] == "running" and _alive(job["pid"], job["host"]) is False:
                job["status"] = "interrupted"
        return jobs
