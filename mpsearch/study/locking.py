"""One driver per study: a second ``mpsearch optimize`` on a running study stops with one line.

A study's driver replays its search and appends trials in a fixed order; a second driver on the
same study would append the same trials again. Two mechanisms, by storage:

* SQLite (the default): an exclusive lock (``filelock``: flock on Unix, msvcrt on Windows) on a
  lock file next to the database file, with the holder named in a file beside it. It
  covers every study in that file, because SQLite serializes writers and breaks on network file
  systems; drivers that must run at the same time (one per seed, algorithm or model, on several
  nodes) share a PostgreSQL or MySQL storage instead. The operating system drops the lock when its process
  dies, so a study killed with ``kill -9`` resumes at once.
* Server databases (PostgreSQL, MySQL) and journal files: a lease in the study's user
  attributes, renewed by a heartbeat thread ``BEATS_PER_LEASE`` times per lease time. Another driver may
  take the study over only when the lease is older than the holder's lease time (its driver is
  gone): 90 s, or ``MPSEARCH_LEASE_S`` seconds in the holder's environment.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from mpsearch.errors import UserError

if TYPE_CHECKING:
    import optuna

__all__ = ["StudyLock", "check_lease", "lease_s", "sqlite_path", "LEASE_ATTR", "HEARTBEAT_S", "BEATS_PER_LEASE", "LEASE_S",
           "LEASE_ENV"]

LEASE_ATTR = "mpsearch_driver"
LEASE_S = 90.0
BEATS_PER_LEASE = 4.5  # heartbeats a lease outlives: a few missed beats (a slow database) do not lose it
HEARTBEAT_S = LEASE_S / BEATS_PER_LEASE
LEASE_ENV = "MPSEARCH_LEASE_S"


def lease_s() -> float:
    """How long this driver's lease lives without a heartbeat (``MPSEARCH_LEASE_S``, else ``LEASE_S``)."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UserError(f"{LEASE_ENV}={text!r}: give the lease time in seconds (> 0), or unset it for {LEASE_S:g} s")
    return value


def sqlite_path(url: str) -> Path | None:
    """The database file of an ``sqlite:///`` URL; None for other storages and in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path = url[len("sqlite:///"):].split("?")[0]
    return None if path in ("", ":memory:") else Path(path)


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex[:12]}


class StudyLock:
    """Held while a driver writes ``study_name`` in the storage at ``url``; a context manager.

    :meth:`acquire_file` runs before the study is opened (SQLite); :meth:`acquire_lease` after
    (other storages), since the lease lives in the study itself.
    """

    def __init__(self, url: str, study_name: str) -> None:
        self.url = url
        self.study_name = study_name
        self.owner = {**_me(), "lease_s": lease_s()}
        self._file_lock: FileLock | None = None
        self._study: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- SQLite --------------------------------------------------------------------------------
    def acquire_file(self) -> None:
        db = sqlite_path(self.url)
        if db is None:
            return
        lock_path = db.with_name(f".{db.name}.lock")
        holder_path = db.with_name(f".{db.name}.driver")  # who holds it: the lock file itself is truncated by each contender
        file_lock = FileLock(lock_path, timeout=0)
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            file_lock.acquire()
        except Timeout:
            try:
                holder = holder_path.read_text(errors="replace").strip()
            except OSError:
                holder = ""
            raise UserError(
                f"study storage {db} is in use by another mpsearch driver ({holder or 'unknown'}); wait for it or stop it. "
                "SQLite takes one driver at a time: to run several at once, give each run.storage postgresql://... "
                "(docs/studies.md)", fields=("run.storage",)
            ) from None
        except OSError as exc:
            raise UserError(f"cannot create the lock file {lock_path} ({exc.strerror}); choose a writable run.out_dir or run.storage",
                            fields=("run.out_dir", "run.storage")) from None
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        holder_path.write_text(json.dumps({**self.owner, "study": self.study_name, "since": since}))
        self._file_lock = file_lock

    # -- server databases ------------------------------------------------------------------------
    def acquire_lease(self, study: optuna.Study) -> None:
        if self.url.startswith("sqlite"):  # the file lock covers it
            return
        check_lease(study, self.study_name, self.owner)
        self._renew(study)
        # Two drivers that checked at the same moment both wrote a lease: the last write stands,
        # and the driver that reads back another's lease steps back (leaving that lease alone).
        time.sleep(0.2)
        check_lease(study, self.study_name, self.owner)
        self._study = study
        self._thread = threading.Thread(target=self._heartbeat, name="mpsearch-lease", daemon=True)
        self._thread.start()

    def _renew(self, study: optuna.Study) -> None:
        study.set_user_attr(LEASE_ATTR, {**self.owner, "heartbeat": time.time()})

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.owner["lease_s"] / BEATS_PER_LEASE):
            try:
                self._renew(self._study)
            except Exception:  # noqa: BLE001 - a dropped connection must not kill the driver; the next beat retries
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._study is not None:
            try:  # an expired lease tells the next driver it may start at once
                self._study.set_user_attr(LEASE_ATTR, {**self.owner, "heartbeat": 0.0})
            except Exception:  # noqa: BLE001 - best effort; the lease expires on its own
                pass
            self._study = None
        if self._file_lock is not None:
            self._file_lock.release()
            self._file_lock = None

    def __enter__(self) -> StudyLock:
        self.acquire_file()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def check_lease(study: optuna.Study, study_name: str, owner: dict[str, Any], now: float | None = None) -> None:
    """Raise a UserError when another driver holds a live lease on ``study``."""
    lease = study.user_attrs.get(LEASE_ATTR)
    if not isinstance(lease, dict) or lease.get("id") == owner["id"]:
        return
    age = (time.time() if now is None else now) - float(lease.get("heartbeat", 0.0))
    held_for = float(lease.get("lease_s", LEASE_S))
    if age < held_for:
        raise UserError(
            f"study {study_name!r} is being run by another driver (pid {lease.get('pid')} on {lease.get('host')}, "
            f"heartbeat {age:.0f} s ago); one driver per study: wait for it, or if it is gone, retry in {held_for - age:.0f} s"
        )
