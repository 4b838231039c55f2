"""The benchmark's results store: one SQLite file, one row per measurement, committed as it lands.

Every row carries its run id, the time, the machine (host, CPU, GPU, torch version), the method, its
options (JSON), the pattern, the size (JSON), the backend actually used, the metrics (JSON), a status
(``ok`` / ``n-a`` / ``oom`` / ``fail``), a reason for anything not ``ok``, and the wall time.
A row is identified inside a run by its ``key`` (tier, task, method, pattern, variant, size), so a
crash or an interrupt loses nothing already measured and ``--resume`` skips what is there.
"""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATUSES = ("ok", "n-a", "oom", "fail")
FILENAME = "results.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started REAL, preset TEXT, device TEXT, machine TEXT, config TEXT);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL, key TEXT NOT NULL, time REAL, host TEXT, cpu TEXT, gpu TEXT, torch TEXT,
    tier TEXT, task TEXT, method TEXT, kind TEXT, family TEXT, options TEXT, pattern TEXT,
    q_len INTEGER, k_len INTEGER, size TEXT, variant TEXT, backend TEXT, metrics TEXT,
    status TEXT, reason TEXT, wall_s REAL,
    UNIQUE (run_id, key));
"""


@dataclass
class Row:
    """One measurement. ``size`` holds every other dimension (batch, heads, head_dim, width...)."""

    tier: str
    method: str
    pattern: str
    task: str = ""
    variant: str = ""
    kind: str = ""
    family: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    q_len: int | None = None
    k_len: int | None = None
    size: dict[str, Any] = field(default_factory=dict)
    backend: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"
    reason: str = ""
    wall_s: float = 0.0
    # filled by the store
    run_id: str = ""
    time: float = 0.0
    host: str = ""
    cpu: str = ""
    gpu: str = ""
    torch: str = ""

    @property
    def key(self) -> str:
        return row_key(self.tier, self.task, self.method, self.pattern, self.variant, self.q_len,
                       self.k_len, self.size)


def row_key(tier: str, task: str, method: str, pattern: str, variant: str, q_len, k_len,
            size: dict[str, Any]) -> str:
    """The identity of a measurement inside a run (what ``--resume`` skips)."""
    return "|".join([tier, task, method, pattern, variant, f"{q_len}x{k_len}",
                     json.dumps(size, sort_keys=True, default=str)])


def _json(x: Any) -> str:
    return json.dumps(x, sort_keys=True, default=_jsonable)


SMALL_ARRAY = 64  # larger tensors (e.g. learned embeddings given as options) are stored as a summary


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        if getattr(x, "numel", lambda: SMALL_ARRAY)() > SMALL_ARRAY:
            return {"tensor_shape": list(x.shape), "dtype": str(x.dtype), "sum": float(x.double().sum())}
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    return repr(x)


class Store:
    """``Store(path)`` opens or creates the SQLite file (a directory means ``DIR/results.sqlite``)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.suffix != ".sqlite":
            path.mkdir(parents=True, exist_ok=True)
            path = path / FILENAME
        self.path = path
        self.db = sqlite3.connect(str(path))
        self.db.executescript(_SCHEMA)
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    # -- runs ---------------------------------------------------------------------------------
    def new_run(self, preset: str, device: str, machine: dict[str, Any], config: dict[str, Any]) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.db.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, time.time(), preset, device, _json(machine), _json(config)))
        self.db.commit()
        return run_id

    def runs(self) -> list[dict[str, Any]]:
        """Every run, oldest first."""
        cur = self.db.execute("SELECT run_id, started, preset, device, machine, config FROM runs ORDER BY started")
        return [{"run_id": r[0], "started": r[1], "preset": r[2], "device": r[3],
                 "machine": json.loads(r[4]), "config": json.loads(r[5])} for r in cur]

    def run(self, run_id: str | None = None) -> dict[str, Any] | None:
        """A run by id, or the latest one."""
        runs = self.runs()
        if run_id is None:
            return runs[-1] if runs else None
        return next((r for r in runs if r["run_id"] == run_id), None)

    # -- rows ---------------------------------------------------------------------------------
    def keys(self, run_id: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT key FROM results WHERE run_id = ?", (run_id,))}

    def add(self, row: Row) -> None:
        """Insert (or replace) one row and commit it at once."""
        if row.status not in STATUSES:
            raise ValueError(f"row status {row.status!r} is not one of {STATUSES}")
        d = asdict(row)
        d["key"] = row.key
        for name in ("options", "size", "metrics"):
            d[name] = _json(d[name])
        cols = list(d)
        self.db.execute(f"INSERT OR REPLACE INTO results ({', '.join(cols)}) VALUES "
                        f"({', '.join('?' for _ in cols)})", [d[c] for c in cols])
        self.db.commit()

    def rows(self, run_id: str, tier: str | None = None) -> list[Row]:
        sql = "SELECT * FROM results WHERE run_id = ?" + (" AND tier = ?" if tier else "") + " ORDER BY id"
        cur = self.db.execute(sql, (run_id, tier) if tier else (run_id,))
        names = [c[0] for c in cur.description]
        return [_row(dict(zip(names, r))) for r in cur]

    def __iter__(self) -> Iterator[Row]:
        run = self.run()
        return iter(self.rows(run["run_id"]) if run else [])


def _row(d: dict[str, Any]) -> Row:
    d.pop("id")
    d.pop("key")
    for name in ("options", "size", "metrics"):
        d[name] = json.loads(d[name]) if d[name] else {}
    return Row(**d)
