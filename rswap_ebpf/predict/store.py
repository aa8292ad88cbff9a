"""Task profiles that survive restarts: an embedded SQLite database (stdlib ``sqlite3``, WAL).

Layout, per series (a task's stable identity x a resource key):

* ``sample``: every tick's units, one transaction per tick.  Rows are kept only until the series'
  next checkpoint covers them; then they are folded into ``rollup`` and deleted.
* ``state``: the :class:`~.profile.TaskProfile` (history, forecaster, errors) at its last
  checkpoint, as data (:mod:`~.checkpoint`: compressed JSON, never pickle), with the serving
  model and its MAE in plain columns for inspection.
* ``rollup_day``: the long-term history downsampled to ``rollup_s`` buckets (mean, max, count),
  kept ``retention_days``: one row per series and UTC day, its buckets packed in a blob
  (float32 mean, float32 max, uint32 count per bucket, zlib), a tenth of the bytes of one row
  per bucket.  (``rollup``, one row per bucket, is what older databases hold: still read and
  pruned, no longer written.)

Loading a series gives its checkpoint plus the samples written after it; replaying them restores
the profile exactly, so a restart or ``kill -9`` loses at most the tick that was being written.
The database and its directory must be root's and not writable by anyone else
(:func:`~rswap_ebpf.paths.check_private`), or it is refused.  A damaged database (found by
``PRAGMA quick_check`` at open) is moved aside to ``profiles.db.corrupt-<time>`` and started
empty, with a warning that names the copy.
WAL with ``synchronous=NORMAL`` makes every committed tick survive a crash of the process (a
power loss may lose the last few ticks; ``synchronous="FULL"`` trades speed for that).
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import sqlite3
import time
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rswap_ebpf import paths
from rswap_ebpf.errors import ConfigError, RswapError

log = logging.getLogger(__name__)

DB_FILE = "profiles.db"

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    identity TEXT NOT NULL,
    resource TEXT NOT NULL,
    first_seen REAL NOT NULL,
    last_seen REAL NOT NULL,
    UNIQUE (identity, resource)
);
CREATE TABLE IF NOT EXISTS sample (
    series INTEGER NOT NULL,
    t REAL NOT NULL,
    units REAL NOT NULL,
    PRIMARY KEY (series, t)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (
    series INTEGER PRIMARY KEY,
    t REAL NOT NULL,
    model TEXT,
    mae REAL,
    blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS rollup (
    series INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    mean REAL NOT NULL,
    max REAL NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (series, bucket)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rollup_day (
    series INTEGER NOT NULL,
    day INTEGER NOT NULL,
    buckets BLOB NOT NULL,
    PRIMARY KEY (series, day)
);
"""

DAY_S = 86400


def _pack(nb: int, buckets: dict[int, tuple[float, float, int]]) -> bytes:
    """A day's buckets (index -> (mean, max, count)) as a blob; empty buckets have count 0."""
    means, maxes, counts = array("f", bytes(4 * nb)), array("f", bytes(4 * nb)), \
        array("I", bytes(4 * nb))
    for i, (mean, mx, n) in buckets.items():
        means[i], maxes[i], counts[i] = mean, mx, n
    return zlib.compress(means.tobytes() + maxes.tobytes() + counts.tobytes(), 6)


def _unpack(blob: bytes) -> dict[int, tuple[float, float, int]]:
    raw = zlib.decompress(blob)
    nb = len(raw) // 12
    means, maxes, counts = array("f"), array("f"), array("I")
    means.frombytes(raw[:4 * nb])
    maxes.frombytes(raw[4 * nb:8 * nb])
    counts.frombytes(raw[8 * nb:])
    return {i: (means[i], maxes[i], counts[i]) for i in range(nb) if counts[i]}


@dataclass(frozen=True)
class StoredProfile:
    identity: str
    resource: str
    checkpoint_t: float | None
    state: bytes | None
    samples: tuple[float, ...]  # written after the checkpoint, oldest first
    last_t: float | None = None  # time of the newest sample (or of the checkpoint)


@dataclass(frozen=True)
class Retention:
    """How much history the database keeps: ``rollup_s`` buckets for ``days`` days."""

    days: float = 7.0
    rollup_s: int = 300

    def __post_init__(self):
        if not self.days > 0:
            raise ConfigError("daemon.retention_days", "must be positive")
        if int(self.rollup_s) < 1:
            raise ConfigError("daemon.rollup_s", "must be at least 1 second")


def task_identity(name: str | None, command: Sequence[str] = ()) -> str:
    """A task's stable identity: its configured name, else its command line.

    The same identity next time means the profile of earlier runs is loaded before the first
    sample.  Long command lines are shortened with a hash so the key stays small.
    """
    if name:
        return name
    if not command:
        raise ConfigError("task", "needs a name or a command to be recognised across runs")
    text = " ".join(command)
    if len(text) <= 120:
        return "cmd:" + text
    return "cmd:" + text[:80] + "#" + hashlib.sha256(text.encode()).hexdigest()[:16]


class ProfileStore:
    def __init__(self, path: str, retention: Retention | None = None, synchronous: str = "NORMAL"):
        self.path = path
        self.retention = retention or Retention()
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigError("synchronous", "NORMAL or FULL")
        folder, name = os.path.split(os.path.abspath(path))
        # checkpoints are data, never code, but a planted database still steers what root does
        paths.check_private(folder, (name, name + "-wal", name + "-shm"))
        #: where a damaged database was moved to before this one was started afresh
        self.moved_aside: str | None = None
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as err:
            raise RswapError(f"{path}: cannot open the profile database: {err}") from err
        damage = self._open(synchronous)
        if damage:
            self.close()
            self.moved_aside = self._move_aside()
            log.warning("%s is damaged (%s): moved aside to %s and started empty; what earlier "
                        "runs learnt is in that copy", path, damage, self.moved_aside)
            damage = self._open(synchronous)
            if damage:
                raise RswapError(f"{path}: cannot open the profile database: {damage}")
        self._ids: dict[tuple[str, str], int] = {}
        self._last_prune = 0.0

    def _open(self, synchronous: str) -> str:
        """Connect and check the whole file (``PRAGMA quick_check`` reads every page, so damage
        inside is found too, not only a bad header); what is wrong, or "" when it is sound."""
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as err:
            raise RswapError(f"{self.path}: cannot open the profile database: {err}") from err
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={synchronous}")
            problems = [r[0] for r in self.db.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                return "; ".join(problems)
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as err:  # not a database, malformed, truncated
            return str(err)
        except sqlite3.Error as err:
            raise RswapError(f"{self.path}: cannot open the profile database: {err}") from err
        return ""

    def _move_aside(self) -> str:
        """Rename the database (and its WAL) to ``<path>.corrupt-<UTC time>``: kept for a look."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest, n = f"{self.path}.corrupt-{stamp}", 1
        while os.path.exists(dest):
            n += 1
            dest = f"{self.path}.corrupt-{stamp}.{n}"
        try:
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.rename(self.path + suffix, dest + suffix)
        except OSError as err:
            raise RswapError(f"{self.path} is damaged and cannot be moved aside: "
                             f"{err.strerror}; move it away by hand") from err
        return dest

    @classmethod
    def in_dir(cls, state_dir: str, retention: Retention | None = None) -> ProfileStore:
        return cls(os.path.join(state_dir, DB_FILE), retention)

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __enter__(self) -> ProfileStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def _series(self, identity: str, resource: str, now: float) -> int:
        key = (identity, resource)
        sid = self._ids.get(key)
        if sid is None:
            row = self.db.execute("SELECT id FROM series WHERE identity=? AND resource=?",
                                  key).fetchone()
            if row is None:
                cur = self.db.execute("INSERT INTO series (identity, resource, first_seen, "
                                      "last_seen) VALUES (?, ?, ?, ?)", (*key, now, now))
                sid = cur.lastrowid
            else:
                sid = row[0]
            self._ids[key] = sid
        return sid

    def write_tick(self, now: float, samples: Iterable[tuple[str, str, float]],
                   states: Iterable[tuple[str, str, bytes, str, float | None]] = ()) -> None:
        """One tick in one transaction: its samples, and the checkpoints that are due."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                seen = set()
                rows = []
                for identity, resource, units in samples:
                    sid = self._series(identity, resource, now)
                    seen.add(sid)
                    rows.append((sid, now, float(units)))
                self.db.executemany("INSERT OR REPLACE INTO sample VALUES (?, ?, ?)", rows)
                states = list(states)
                for identity, resource, blob, model, mae in states:
                    sid = self._series(identity, resource, now)
                    seen.add(sid)
                    self.db.execute("INSERT OR REPLACE INTO state VALUES (?, ?, ?, ?, ?)",
                                    (sid, now, model, mae, blob))
                if seen:
                    self.db.executemany("UPDATE series SET last_seen=? WHERE id=?",
                                        [(now, s) for s in seen])
                if states:
                    self._fold(now, [self._ids[(i, r)] for i, r, *_ in states])
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            raise RswapError(f"{self.path}: cannot write profiles: {err}") from err
        if now - self._last_prune >= self.retention.rollup_s:
            self.prune(now)

    def _fold(self, now: float, sids: list[int]) -> None:
        """Move samples a checkpoint now covers into the rollup buckets (inside the transaction)."""
        b = int(self.retention.rollup_s)
        nb = math.ceil(DAY_S / b)  # buckets start at the day's first second
        for sid in sids:
            rows = self.db.execute(
                "SELECT CAST(t / ? AS INTEGER), CAST((t % ?) / ? AS INTEGER), SUM(units), "
                "MAX(units), COUNT(*) FROM sample WHERE series=? AND t<=? GROUP BY 1, 2",
                (DAY_S, DAY_S, b, sid, now)).fetchall()
            days: dict[int, list] = {}
            for day, i, total, mx, n in rows:
                days.setdefault(day, []).append((i, total, mx, n))
            for day, items in days.items():
                old = self.db.execute("SELECT buckets FROM rollup_day WHERE series=? AND day=?",
                                      (sid, day)).fetchone()
                buckets = _unpack(old[0]) if old else {}
                for i, total, mx, n in items:
                    if i in buckets:
                        m0, x0, n0 = buckets[i]
                        total, mx, n = total + m0 * n0, max(mx, x0), n + n0
                    buckets[i] = (total / n, mx, n)
                self.db.execute("INSERT OR REPLACE INTO rollup_day VALUES (?, ?, ?)",
                                (sid, day, _pack(nb, buckets)))
            self.db.execute("DELETE FROM sample WHERE series=? AND t<=?", (sid, now))

    def prune(self, now: float | None = None) -> int:
        """Drop rollups older than the retention, and series with nothing left; rows deleted."""
        now = time.time() if now is None else now
        self._last_prune = now
        cutoff = now - self.retention.days * 86400
        try:
            with self.db:
                n = self.db.execute("DELETE FROM rollup WHERE bucket < ?", (cutoff,)).rowcount
                # a day goes once all of it is older than the retention: the history kept is
                # retention_days plus at most the part of a day that straddles the cutoff
                n += self.db.execute("DELETE FROM rollup_day WHERE (day + 1) * ? <= ?",
                                     (DAY_S, cutoff)).rowcount
                stale = [r[0] for r in self.db.execute(
                    "SELECT id FROM series WHERE last_seen < ?", (cutoff,))]
                for sid in stale:
                    for table in ("sample", "rollup", "rollup_day"):
                        self.db.execute(f"DELETE FROM {table} WHERE series=?", (sid,))
                    self.db.execute("DELETE FROM state WHERE series=?", (sid,))
                    self.db.execute("DELETE FROM series WHERE id=?", (sid,))
                self._ids = {k: v for k, v in self._ids.items() if v not in stale}
        except sqlite3.Error as err:
            raise RswapError(f"{self.path}: cannot prune profiles: {err}") from err
        return n + len(stale)

    # -- reading -------------------------------------------------------------------------------
    def identities(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT identity FROM series ORDER BY 1")]

    def resources_of(self, identity: str) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT resource FROM series WHERE identity=? ORDER BY 1", (identity,))]

    def load(self, identity: str, resource: str) -> StoredProfile | None:
        row = self.db.execute("SELECT id FROM series WHERE identity=? AND resource=?",
                              (identity, resource)).fetchone()
        if row is None:
            return None
        sid = row[0]
        st = self.db.execute("SELECT t, blob FROM state WHERE series=?", (sid,)).fetchone()
        t0 = st[0] if st else None
        samples = self.db.execute("SELECT t, units FROM sample WHERE series=? AND t>? ORDER BY t",
                                  (sid, t0 if t0 is not None else float("-inf"))).fetchall()
        last_t = samples[-1][0] if samples else t0
        return StoredProfile(identity, resource, t0, st[1] if st else None,
                             tuple(u for (_, u) in samples), last_t)

    def history(self, identity: str, resource: str) -> list[tuple[float, float, float, int]]:
        """(time, mean, max, samples) oldest first: rollup buckets, then raw recent samples."""
        row = self.db.execute("SELECT id FROM series WHERE identity=? AND resource=?",
                              (identity, resource)).fetchone()
        if row is None:
            return []
        out = [tuple(r) for r in self.db.execute(
            "SELECT bucket, mean, max, n FROM rollup WHERE series=? ORDER BY bucket", (row[0],))]
        b = int(self.retention.rollup_s)
        for day, blob in self.db.execute(
                "SELECT day, buckets FROM rollup_day WHERE series=? ORDER BY day", (row[0],)):
            out += [(day * DAY_S + i * b, mean, mx, n)
                    for i, (mean, mx, n) in sorted(_unpack(blob).items())]
        out += [(t, u, u, 1) for t, u in self.db.execute(
            "SELECT t, units FROM sample WHERE series=? ORDER BY t", (row[0],))]
        return out

    def size_bytes(self) -> int:
        """Database plus its WAL, as it is on disk now."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

    def vacuum(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
