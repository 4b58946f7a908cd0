"""
The run and model registry: one SQLite file that ties the runs of a base dir together, and what
`python -m scripts.lab` reads (docs/lab.md).

    <base_dir>/lab.sqlite             the registry ($NANOCHAT_REGISTRY or an argument overrides it; "off" disables)
    <ckpt_dir>/run/run.json           a run's registry row (RunState writes it with the row)
    <ckpt_dir>/run/metrics.jsonl      its step and evaluation rows (RunState)
    <ckpt_dir>/run/evals.jsonl        evaluations of its checkpoints by chat_eval / base_eval

The run folders are the source of truth: reindex(base_dir) rebuilds the runs and evals tables from
them and gives the rows the live registry holds, so the database may be deleted at any time. The
registry is never required to train: RunRecorder turns every registry error into one warning line.

Tables (schema version SCHEMA_VERSION, migrated on open): runs (one row per run id: name, stage,
checkpoint, parent, resolved config, git, tokenizer, data recipe, host/device/pid, times, status,
summary), evals (run id, step, metric, value, n, stderr, interval kind, bucket, source, chance baseline), models
(NAME:vN -> a checkpoint and the sha256 of its model.pt), aliases (NAME@ALIAS -> a version), notes
(notes and tags of runs and model versions), reports (the best values each `lab report` saw).

Concurrency: WAL journal, a busy timeout, and every write one short BEGIN IMMEDIATE transaction, so
processes that write at once wait for each other instead of failing or losing rows. A run whose
status is "running" but whose process no longer exists on this host is reported "killed" (and
marked so by every write-capable open). WAL needs a local file system (not NFS).
"""

import contextlib
import datetime
import glob
import hashlib
import json
import os
import re
import socket
import sqlite3
import sys
import time

from nanochat.common import NanochatError, atomic_write_bytes, get_base_dir
from nanochat.report import process_wall_time, summarize_metrics

REGISTRY_ENV = "NANOCHAT_REGISTRY"
STATUSES = ("running", "done", "failed", "killed", "stopped")
BUSY_TIMEOUT_S = 60.0  # a writer waits this long for another's transaction (they take milliseconds)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # run, model and alias names
AUTO_NAME_RE = re.compile(r"e(\d+)")  # runs without --name: e001, e002, ...
# Keys of a RunState.log row that are evaluations (they go to the evals table as well).
TRAIN_EVAL_RE = re.compile(r"val_bpb|val_loss|core|eval_pass@\d+|eval_coverage")  # eval_coverage: RL on tasks with score() (MultiHop)

RUN_COLUMNS = (
    "id", "name", "stage", "model_tag", "ckpt_dir", "parent_stage", "parent_tag", "parent_step", "parent_run_id",
    "config", "git_commit", "git_dirty", "tokenizer", "recipe_path", "recipe_hash", "flops_per_token",
    "host", "device", "world_size", "pid", "pid_start", "started", "ended", "wall_s", "status", "stop_reason", "summary",
)
JSON_COLUMNS = ("config", "summary")
EVAL_COLUMNS = ("run_id", "step", "metric", "value", "n", "stderr", "kind", "bucket", "source", "time", "baseline")

# Each entry moves the schema from version i to i + 1; a new column or table is a new entry.
MIGRATIONS = [
    f"""
    CREATE TABLE runs (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, stage TEXT, model_tag TEXT, ckpt_dir TEXT,
        parent_stage TEXT, parent_tag TEXT, parent_step INTEGER, parent_run_id TEXT,
        config TEXT, git_commit TEXT, git_dirty INTEGER, tokenizer TEXT, recipe_path TEXT, recipe_hash TEXT,
        flops_per_token REAL, host TEXT, device TEXT, world_size INTEGER, pid INTEGER, pid_start INTEGER,
        started REAL, ended REAL, wall_s REAL,
        status TEXT NOT NULL CHECK (status IN {STATUSES}), stop_reason TEXT, summary TEXT
    );
    CREATE INDEX runs_name ON runs(name);
    CREATE TABLE evals (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, step INTEGER, metric TEXT NOT NULL, value REAL,
        n INTEGER, stderr REAL, kind TEXT CHECK (kind IN ('proportion', 'mean')), bucket TEXT,
        source TEXT NOT NULL, time REAL
    );
    CREATE INDEX evals_run ON evals(run_id, metric);
    CREATE TABLE models (
        name TEXT NOT NULL, version INTEGER NOT NULL, run_id TEXT, stage TEXT, model_tag TEXT, step INTEGER,
        ckpt_path TEXT NOT NULL, content_hash TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, created REAL,
        PRIMARY KEY (name, version), UNIQUE (name, content_hash)
    );
    CREATE TABLE aliases (name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated REAL, PRIMARY KEY (name, alias));
    CREATE TABLE notes (
        id INTEGER PRIMARY KEY, target TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('note', 'tag')), text TEXT NOT NULL, time REAL
    );
    CREATE TABLE reports (id INTEGER PRIMARY KEY, time REAL NOT NULL, since REAL, best TEXT NOT NULL);
    """,
    # 2: the chance score of each evaluation (a model that guesses); rows recorded before stay NULL
    "ALTER TABLE evals ADD COLUMN baseline REAL",
]
SCHEMA_VERSION = len(MIGRATIONS)


def registry_path(path=None, base_dir=None):
    """The registry file: path, else $NANOCHAT_REGISTRY, else <base_dir>/lab.sqlite. None when
    $NANOCHAT_REGISTRY is "off" (no registry)."""
    path = path or os.environ.get(REGISTRY_ENV)
    if path == "off":
        return None
    return path or os.path.join(base_dir or get_base_dir(), "lab.sqlite")


def now():
    return time.time()


def iso(t):
    """Unix seconds as an ISO time in UTC (None stays None)."""
    return None if t is None else datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


# -----------------------------------------------------------------------------
# Processes: is a run's process still alive?


def process_start(pid):
    """(state letter, start time in clock ticks after boot) of a process from /proc (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def pid_alive(pid, start=None):
    """True if process pid exists and is not a zombie (and, where /proc tells, started at `start`:
    a recycled pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    except OverflowError:
        return False
    info = process_start(pid)
    if info is None:
        return True
    state, started = info
    return state != "Z" and (start is None or started == start)


def apply_liveness(run):
    """A running run whose process is gone from this host becomes killed (in place; returns True
    when it changed). Runs of other hosts are left as they are: their processes cannot be seen."""
    if run.get("status") != "running" or run.get("host") != socket.gethostname() or not run.get("pid"):
        return False
    if pid_alive(run["pid"], run.get("pid_start")):
        return False
    run["status"], run["stop_reason"] = "killed", f"process {run['pid']} ended without reporting (SIGKILL, OOM killer or a crash)"
    return True


# -----------------------------------------------------------------------------
# Files


def file_hash(path, chunk=1 << 20):
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_jsonl(path):
    """The JSON objects of a jsonl file (a line cut by a crash is skipped); [] if missing."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    return rows


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, json.dumps(obj, indent=1, default=str).encode())


def train_evals(run_id, rows):
    """The evaluation rows among RunState.log rows: one eval per key matching TRAIN_EVAL_RE
    (val_bpb, val_loss, core, eval_pass@k, eval_coverage). The final summary row of finish() (it has
    train_time_s) repeats the last evaluation and is left out."""
    out = []
    for row in rows:
        if "train_time_s" in row or not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            if TRAIN_EVAL_RE.fullmatch(key) and isinstance(value, (int, float)):
                out.append({"run_id": run_id, "step": row["step"], "metric": key, "value": float(value), "n": None, "stderr": None,
                            "kind": None, "bucket": None, "source": "train", "time": None, "baseline": None})
    return out


# -----------------------------------------------------------------------------
# The database


class Registry:
    """
    The registry file, open (a context manager; close() when done). path: see registry_path.
    readonly: never writes (no migration, no killed marks: runs() still reports them killed).
    Raises NanochatError when the file cannot be opened, is not a registry, or is newer than this
    code, and for unknown run / model references.
    """

    def __init__(self, path=None, base_dir=None, readonly=False):
        self.path = registry_path(path, base_dir)
        if self.path is None:
            raise NanochatError(f"the registry is off (${REGISTRY_ENV}=off)")
        self.readonly = readonly
        try:
            if readonly:
                if not os.path.isfile(self.path):
                    raise NanochatError(f"no registry at {self.path}")
                self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            else:
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
                self.db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self.db.row_factory = sqlite3.Row
            self.db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if not readonly:
                self.db.execute("PRAGMA journal_mode = WAL")
                if self.version() != SCHEMA_VERSION:
                    self._migrate()
                self.mark_dead()
            elif self.version() != SCHEMA_VERSION:
                raise NanochatError(f"{self.path} has schema version {self.version()}, this code reads {SCHEMA_VERSION}: "
                                    "open it once writable to migrate")
        except sqlite3.DatabaseError as e:
            raise NanochatError(f"cannot open the registry {self.path}: {e}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.db.close()

    @contextlib.contextmanager
    def write(self):
        """One short write transaction (BEGIN IMMEDIATE: takes the write lock first, so two writers
        queue instead of one failing to upgrade a read lock)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def version(self):
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'schema_version'").fetchone():
            return 0
        row = self.db.execute("SELECT version FROM schema_version").fetchone()
        return row[0] if row else 0

    def _migrate(self):
        with self.write() as db:  # the check inside the lock: two first opens migrate once
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            version = self.version()
            if version > SCHEMA_VERSION:
                raise NanochatError(f"{self.path} has schema version {version}, newer than this code's {SCHEMA_VERSION}: update nanochat")
            for sql in MIGRATIONS[version:]:
                for statement in sql.split(";"):  # executescript would commit the transaction
                    if statement.strip():
                        db.execute(statement)
            db.execute("DELETE FROM schema_version")
            db.execute("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))

    def mark_dead(self):
        """Mark killed the running runs of this host whose process is gone. Returns their ids."""
        dead = [r for r in self._runs("status = 'running'", ()) if apply_liveness(r)]
        if dead:
            with self.write() as db:
                for r in dead:
                    db.execute("UPDATE runs SET status = ?, stop_reason = ? WHERE id = ? AND status = 'running'",
                               (r["status"], r["stop_reason"], r["id"]))
        return [r["id"] for r in dead]

    # ------------------------------------------------------------------------- runs

    def put_run(self, record):
        """Insert or replace a run (a dict of RUN_COLUMNS; config and summary as dicts). A run
        without a name gets the next free automatic name (e001, e002, ...). Returns the name."""
        record = {c: record.get(c) for c in RUN_COLUMNS}
        with self.write() as db:
            if not record["name"]:
                old = db.execute("SELECT name FROM runs WHERE id = ?", (record["id"],)).fetchone()
                record["name"] = old["name"] if old else self._next_name(db)
            self._insert_run(db, record)
        return record["name"]

    @staticmethod
    def _insert_run(db, record):
        values = [json.dumps(record.get(c), default=str) if c in JSON_COLUMNS and record.get(c) is not None else record.get(c)
                  for c in RUN_COLUMNS]
        db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})", values)

    @staticmethod
    def _insert_evals(db, rows):
        db.executemany(f"INSERT INTO evals ({', '.join(EVAL_COLUMNS)}) VALUES ({', '.join('?' * len(EVAL_COLUMNS))})",
                       [[r.get(c) for c in EVAL_COLUMNS] for r in rows])

    @staticmethod
    def _next_name(db):
        names = [name for (name,) in db.execute("SELECT name FROM runs WHERE name GLOB 'e[0-9]*'")]
        numbers = [int(m.group(1)) for name in names if (m := AUTO_NAME_RE.fullmatch(name))]
        return f"e{max(numbers, default=0) + 1:03d}"

    def _runs(self, where, params):
        out = []
        for row in self.db.execute(f"SELECT * FROM runs WHERE {where} ORDER BY started, id", params):
            r = dict(row)
            for c in JSON_COLUMNS:
                r[c] = json.loads(r[c]) if r[c] is not None else None
            out.append(r)
        return out

    def runs(self, stage=None, status=None, since=None):
        """Runs as dicts, oldest first; status filters after the liveness check."""
        where, params = ["1"], []
        if stage:
            where.append("stage = ?")
            params.append(stage)
        if since is not None:
            where.append("(started >= ? OR ended >= ? OR status = 'running')")
            params += [since, since]
        runs = self._runs(" AND ".join(where), params)
        for r in runs:
            apply_liveness(r)
        return [r for r in runs if status is None or r["status"] == status]

    def get_run(self, ref):
        """A run by id (or a unique id prefix of 4+ characters), name (the newest of that name), or
        the path of its checkpoint directory (or of one of its step_* directories). Raises
        NanochatError when nothing or more than one run matches."""
        runs = self._runs("id = ?", (ref,)) or self._runs("name = ?", (ref,))
        if not runs and os.path.isdir(ref):
            run_id = run_id_of_dir(ref)
            runs = self._runs("id = ?", (run_id,)) if run_id else []
            if not runs:
                raise NanochatError(f"{ref}: a directory of no registered run (`lab reindex` registers the run folders)")
        if not runs and len(ref) >= 4 and re.fullmatch(r"[0-9a-f]+", ref):
            runs = self._runs("id LIKE ?", (ref + "%",))
            if len(runs) > 1:
                raise NanochatError(f"run id prefix {ref!r} matches {len(runs)} runs: give more of it")
        if not runs:
            raise NanochatError(f"no run {ref!r} in {self.path} (give a run id, name or checkpoint directory; `lab list` shows them)")
        run = runs[-1]
        apply_liveness(run)
        return run

    # ------------------------------------------------------------------------- evals

    def add_evals(self, rows):
        """Insert evaluation rows (dicts of EVAL_COLUMNS), in one transaction."""
        with self.write() as db:
            self._insert_evals(db, rows)

    def replace_evals(self, run_id, source, rows):
        """Replace the run's evals of one source (a resumed run's metrics.jsonl was cut back to its
        checkpoint: so are its training evals)."""
        with self.write() as db:
            db.execute("DELETE FROM evals WHERE run_id = ? AND source = ?", (run_id, source))
            self._insert_evals(db, rows)

    def evals(self, run_id=None):
        """Evaluation rows (dicts) of one run or all, in insertion order."""
        if run_id is None:
            return [dict(r) for r in self.db.execute("SELECT * FROM evals ORDER BY id")]
        return [dict(r) for r in self.db.execute("SELECT * FROM evals WHERE run_id = ? ORDER BY id", (run_id,))]

    def replace_runs(self, runs, evals):
        """Replace the runs and evals tables (reindex: runs named already), in one transaction;
        models, aliases, notes and reports are kept."""
        with self.write() as db:
            db.execute("DELETE FROM runs")
            db.execute("DELETE FROM evals")
            for r in runs:
                self._insert_run(db, r)
            self._insert_evals(db, evals)

    # ------------------------------------------------------------------------- models

    def register_model(self, name, run_id, stage, model_tag, step, ckpt_path):
        """
        Register the checkpoint directory ckpt_path (holding model.pt) as the next version of model
        `name`; the same weights (sha256 of model.pt) registered again are the version they already
        are. Returns (version, created: bool). Versions are never changed or deleted.
        """
        check_name(name, "model name")
        model_pt = os.path.join(ckpt_path, "model.pt")
        if not os.path.isfile(model_pt):
            raise NanochatError(f"no model.pt in {ckpt_path}")
        st = os.stat(model_pt)
        digest = file_hash(model_pt)  # outside the transaction: hashing a large file takes seconds
        with self.write() as db:
            old = db.execute("SELECT version FROM models WHERE name = ? AND content_hash = ?", (name, digest)).fetchone()
            if old:
                return old["version"], False
            version = db.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM models WHERE name = ?", (name,)).fetchone()[0]
            db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (name, version, run_id, stage, model_tag, step, os.path.abspath(ckpt_path), digest, st.st_size, st.st_mtime_ns, now()))
        return version, True

    def models(self, name=None):
        """Model versions (dicts, with their aliases as a list), by name and version."""
        rows = self.db.execute("SELECT * FROM models" + (" WHERE name = ?" if name else "") + " ORDER BY name, version", (name,) if name else ())
        aliases = {}
        for a in self.db.execute("SELECT * FROM aliases ORDER BY alias"):
            aliases.setdefault((a["name"], a["version"]), []).append(a["alias"])
        return [dict(r) | {"aliases": aliases.get((r["name"], r["version"]), [])} for r in rows]

    def set_alias(self, name, alias, version):
        """Point NAME@alias at version (an int); returns the version it pointed at before (or None)."""
        check_name(alias, "alias")
        with self.write() as db:
            if not db.execute("SELECT 1 FROM models WHERE name = ? AND version = ?", (name, version)).fetchone():
                raise NanochatError(f"no model version {name}:v{version} (`lab models {name}` lists them)")
            old = db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?, ?)", (name, alias, version, now()))
        return old["version"] if old else None

    def resolve_model(self, ref):
        """
        The model version a reference names: NAME (its newest version), NAME:vN (or NAME:N), or
        NAME@ALIAS. Returns the models row as a dict. Raises NanochatError for a malformed
        reference, or an unknown name, version or alias.
        """
        m = re.fullmatch(r"([^:@]+)(?::v?(\d+)|@([^:@]+))?", ref or "")
        if not m:
            raise NanochatError(f"bad model reference {ref!r}: expected NAME, NAME:vN or NAME@ALIAS")
        name, version, alias = m.groups()
        if not self.db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
            raise NanochatError(f"no registered model {name!r} in {self.path} (`lab register RUN --name {name}` makes one)")
        if alias:
            row = self.db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
            if not row:
                raise NanochatError(f"model {name!r} has no alias {alias!r} (`lab alias {name}@{alias} vN` sets it)")
            version = row["version"]
        elif version is None:
            version = self.db.execute("SELECT MAX(version) FROM models WHERE name = ?", (name,)).fetchone()[0]
        row = self.db.execute("SELECT * FROM models WHERE name = ? AND version = ?", (name, int(version))).fetchone()
        if not row:
            raise NanochatError(f"model {name!r} has no version v{version}")
        return dict(row)

    # ------------------------------------------------------------------------- notes, reports

    def add_note(self, target, text, kind="note"):
        with self.write() as db:
            db.execute("INSERT INTO notes (target, kind, text, time) VALUES (?, ?, ?, ?)", (target, kind, text, now()))

    def notes(self, target):
        return [dict(r) for r in self.db.execute("SELECT kind, text, time FROM notes WHERE target = ? ORDER BY id", (target,))]

    def last_report(self):
        row = self.db.execute("SELECT * FROM reports ORDER BY id DESC LIMIT 1").fetchone()
        return dict(row) | {"best": json.loads(row["best"])} if row else None

    def add_report(self, t, since, best):
        """Keep what a report saw (time t, window start since, best: {key: {"value", "run"}})."""
        with self.write() as db:
            db.execute("INSERT INTO reports (time, since, best) VALUES (?, ?, ?)", (t, since, json.dumps(best)))


def check_name(name, what):
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise NanochatError(f"bad {what} {name!r}: letters, digits, '_', '.' and '-', starting with a letter or digit")
    return name


def verify_model(model):
    """Raise NanochatError unless the checkpoint of a models row still holds the registered weights
    (stat unchanged, else the sha256 is computed again)."""
    ref = f"{model['name']}:v{model['version']}"
    path = os.path.join(model["ckpt_path"], "model.pt")
    try:
        st = os.stat(path)
    except OSError:
        raise NanochatError(f"{ref}: its checkpoint {model['ckpt_path']} is gone (pruned or deleted)") from None
    if (st.st_size, st.st_mtime_ns) != (model["size"], model["mtime_ns"]) and file_hash(path) != model["content_hash"]:
        raise NanochatError(f"{ref}: {path} no longer holds the registered weights (sha256 differs)")


# -----------------------------------------------------------------------------
# The run folders: what reindex reads


def run_id_of_dir(path):
    """The run id of a checkpoint directory, one of its step_* directories, or its run/ folder."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json")) as f:
            return json.load(f).get("run_id")
    for d in (path, os.path.dirname(path)):
        rec = os.path.join(d, "run.json") if os.path.basename(d) == "run" else os.path.join(d, "run", "run.json")
        if os.path.isfile(rec):
            with open(rec) as f:
                return json.load(f).get("id")
    steps = sorted(glob.glob(os.path.join(path, "step_[0-9]*[0-9]", "meta.json")))
    if steps:
        with open(steps[-1]) as f:
            return json.load(f).get("run_id")
    return None


def record_from_meta(ckpt_dir, meta, metrics_path):
    """A run record for a run folder without run.json (runs from before the registry): what the
    latest checkpoint meta and metrics.jsonl say. Status: done if the log ends with finish()'s
    summary row, else stopped (a killed or failed run cannot be told from a stopped one here)."""
    parent = meta.get("parent") or {}
    metrics_rows = read_jsonl(metrics_path)
    done = bool(metrics_rows) and "train_time_s" in metrics_rows[-1]
    return {
        "id": meta.get("run_id"), "name": None, "stage": meta.get("stage"), "model_tag": meta.get("model_tag"),
        "ckpt_dir": os.path.abspath(ckpt_dir),
        "parent_stage": parent.get("stage"), "parent_tag": parent.get("model_tag"), "parent_step": parent.get("step"),
        "config": (meta.get("args") or {}) | (meta.get("resolved") or {}), "tokenizer": meta.get("tokenizer"),
        "status": "done" if done else "stopped", "stop_reason": None if done else "unknown: no run.json",
        "summary": summarize_metrics(metrics_path) if done else None,
    }


def reindex(base_dir=None):
    """
    The runs and evals as the run folders under <base_dir>/checkpoints/*/*/ record them: run.json
    (else the latest checkpoint's meta.json), the evaluation rows of metrics.jsonl (train_evals),
    and evals.jsonl. Returns (runs, evals): lists of dicts shaped like the tables' rows (runs with
    the liveness check applied). Runs without a name (folders without run.json) get automatic
    names after the named ones, in start order. Reads only.
    """
    base_dir = base_dir or get_base_dir()
    runs, evals = [], []
    for ckpt_dir in sorted(glob.glob(os.path.join(base_dir, "checkpoints", "*", "*"))):
        run_dir = os.path.join(ckpt_dir, "run")
        metrics_rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
        if os.path.isfile(os.path.join(run_dir, "run.json")):
            with open(os.path.join(run_dir, "run.json")) as f:
                record = json.load(f)
        else:
            steps = sorted(glob.glob(os.path.join(ckpt_dir, "step_[0-9]*[0-9]", "meta.json")))
            if not steps:
                continue
            with open(steps[-1]) as f:
                record = record_from_meta(ckpt_dir, json.load(f), os.path.join(run_dir, "metrics.jsonl"))
            if not record["id"]:
                continue
        record = {c: record.get(c) for c in RUN_COLUMNS}
        apply_liveness(record)
        runs.append(record)
        evals += train_evals(record["id"], metrics_rows)
        scored = read_jsonl(os.path.join(run_dir, "evals.jsonl"))
        evals += [{c: r.get(c) for c in EVAL_COLUMNS} for r in scored if r.get("run_id") == record["id"]]
    runs.sort(key=lambda r: (r["started"] or 0, r["id"]))
    taken = [int(m.group(1)) for r in runs if r["name"] and (m := AUTO_NAME_RE.fullmatch(r["name"]))]
    for r in runs:
        if not r["name"]:
            taken.append(max(taken, default=0) + 1)
            r["name"] = f"e{taken[-1]:03d}"
    return runs, evals


# -----------------------------------------------------------------------------
# The writers: a training run (RunRecorder) and the evaluation scripts (record_evals)


def warn(what, e):
    print(f"warning: {what}: {e}; continuing without it (the run folders are the record: "
          "`python -m scripts.lab reindex` rebuilds the registry)", file=sys.stderr, flush=True)


class RunRecorder:
    """
    The registry side of one training run, on rank 0 (nanochat.training.RunState drives it): the
    run's record is kept in <run_dir>/run.json and, the same, in the registry's runs table; its
    evaluation rows go to the evals table. Never raises: a registry error prints one warning line
    and the registry is left alone for the rest of the run (run.json is still written).
    """

    def __init__(self, run_dir, path=None):
        self.run_dir, self.record = run_dir, {}
        self.path = registry_path(path)
        self._segment_start = now() - (process_wall_time() or 0.0)  # a GPU is billed from the process's start
        self._wall_before = 0.0

    def _registry(self, fn):
        if self.path is None:
            return
        try:
            with Registry(self.path) as reg:
                fn(reg)
        except Exception as e:  # noqa: BLE001 - the registry never stops a training run
            warn(f"run registry {self.path}", e)
            self.path = None

    def _write(self):
        self.record["wall_s"] = self._wall_before + now() - self._segment_start
        self._registry(lambda reg: self.record.update(name=reg.put_run(self.record)))
        try:
            write_json(os.path.join(self.run_dir, "run.json"), self.record)
        except OSError as e:
            warn(f"run record {self.run_dir}/run.json", e)

    def start(self, record, metrics_path=None):
        """Register the run (status running). record: RUN_COLUMNS values from RunState; a resumed
        run keeps its name (unless given), start time and wall time from its run.json, and its
        training evals are reloaded from metrics_path (cut back to the checkpoint)."""
        old = {}
        try:
            with open(os.path.join(self.run_dir, "run.json")) as f:
                old = json.load(f)
        except (OSError, ValueError):
            pass
        if old.get("id") != record["id"]:
            old = {}
        info = process_start(os.getpid())
        self._wall_before = old.get("wall_s") or 0.0
        self.record = record | {
            "name": record.get("name") or old.get("name"), "started": old.get("started") or self._segment_start,
            "host": socket.gethostname(), "pid": os.getpid(), "pid_start": info[1] if info else None,
            "status": "running", "ended": None, "stop_reason": None, "summary": None,
        }
        self._write()
        if metrics_path is not None:
            rows = train_evals(record["id"], read_jsonl(metrics_path))
            self._registry(lambda reg: reg.replace_evals(record["id"], "train", rows))

    def log(self, row):
        """A RunState.log row: its evaluation keys go to the evals table."""
        if self.record:
            rows = train_evals(self.record["id"], [row])
            if rows:
                self._registry(lambda reg: reg.add_evals(rows))

    def update(self, **fields):
        """Rewrite the record with fields changed (a checkpoint: the wall time so far)."""
        if self.record:
            self.record.update(fields)
            self._write()

    def end(self, status, stop_reason=None, summary=None, **fields):
        """The run ended: done, stopped or failed (killed is found later, by pid)."""
        if self.record and self.record["status"] == "running":
            self.update(status=status, stop_reason=stop_reason, summary=summary, ended=now(), **fields)


def record_evals(ckpt_dir, meta, rows, source):
    """
    Evaluation results of the checkpoint in ckpt_dir (its meta: stage, step, run_id): rows of
    {"metric", "value", "n", "stderr", "kind", "bucket", "baseline"} are appended to <ckpt_dir>/run/evals.jsonl
    (what reindex reads) and added to the registry under the run that wrote the checkpoint. Rank 0.
    Never raises: a checkpoint without a run id or an unwritable folder or registry is one line.
    Returns the number of rows recorded.
    """
    run_id = meta.get("run_id")
    if not run_id:
        print(f"note: {ckpt_dir} step {meta.get('step')} has no run id (written before the registry): results not registered",
              file=sys.stderr)
        return 0
    t = now()
    rows = [{c: None for c in EVAL_COLUMNS} | r | {"run_id": run_id, "step": meta.get("step"), "source": source, "time": t} for r in rows]
    try:
        path = os.path.join(ckpt_dir, "run", "evals.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write("".join(json.dumps({c: r[c] for c in EVAL_COLUMNS}) + "\n" for r in rows))
    except OSError as e:
        warn(f"evaluation log {ckpt_dir}/run/evals.jsonl", e)
    if registry_path() is None:
        return len(rows)
    try:
        with Registry() as reg:
            reg.add_evals(rows)
    except Exception as e:  # noqa: BLE001 - the results are printed and in the report files already
        warn("run registry", e)
    return len(rows)


def centred_mean_stderr(items):
    """
    Standard error of a mean of centred accuracies, mean_t (acc_t - b_t) / (1 - b_t) over T tasks
    (CORE, ChatCORE): items = [(accuracy, baseline, n_items)]. Each accuracy is a binomial
    proportion of its n items (variance acc (1 - acc) / n), tasks independent:
    SE = sqrt(sum_t acc_t (1 - acc_t) / n_t / (1 - b_t)^2) / T. None when a task has no items.
    """
    if not items or any(n <= 0 or b >= 1 for _, b, n in items):
        return None
    return sum(a * (1 - a) / n / (1 - b) ** 2 for a, b, n in items) ** 0.5 / len(items)


def chat_eval_rows(results, chatcore):
    """Registry rows of scripts/chat_eval.py results (nanochat.chat_eval.evaluate_task dicts): each
    task's accuracy and pass@k (k > 1) as proportions of its problems, and ChatCORE with its SE.
    baseline: the score of a model that guesses (an untrained model's expectation): the task's
    chance c (the mean of 1 / choices; 0 for a generative task), 1 - (1 - c)^k for pass@k (one of
    k guesses right), 0 for ChatCORE (centred on chance). A task with difficulty buckets adds one
    row per non-empty bucket (its accuracy on that bucket's problems, `bucket` set)."""
    rows = []
    for r in results:
        chance = r["chance"]
        rows.append({"metric": r["task"], "value": r["accuracy"], "n": r["problems"], "kind": "proportion", "baseline": chance})
        rows += [{"metric": r["task"], "bucket": name, "value": b["accuracy"], "n": b["problems"], "kind": "proportion", "baseline": chance}
                 for name, b in (r.get("buckets") or {}).items() if b["problems"]]
        rows += [{"metric": f"{r['task']} pass@{k}", "value": v, "n": r["problems"], "kind": "proportion", "baseline": 1 - (1 - chance) ** int(k)}
                 for k, v in (r.get("pass_at_k") or {}).items() if int(k) != 1]
    if chatcore is not None:
        se = centred_mean_stderr([(r["accuracy"], r["chance"], r["problems"]) for r in results])
        n = sum(r["problems"] for r in results)
        rows.append({"metric": "ChatCORE", "value": chatcore, "n": n, "stderr": se, "kind": "mean" if se is not None else None, "baseline": 0.0})
    return rows


def base_eval_rows(report):
    """Registry rows of a scripts/base_eval.py report: CORE with its SE and each CORE task's
    accuracy (a proportion of its items; nanochat.core_eval.evaluate_core), and train / val bpb
    (n: the tokens evaluated; no interval: the tokens of a document are not independent).
    baseline: a task's random baseline (the accuracy of guessing, the one CORE centres with), 0
    for CORE itself; none for bpb (no model-free value of the same tokens is measured)."""
    rows = []
    if "core" in report:
        tasks = report["core"]["results"]
        se = centred_mean_stderr([(t["accuracy"], t["random_baseline"], t["num_items"]) for t in tasks.values()])
        n = sum(t["num_items"] for t in tasks.values())
        rows.append({"metric": "CORE", "value": report["core"]["core"], "n": n, "stderr": se, "kind": "mean" if se is not None else None, "baseline": 0.0})
        rows += [{"metric": f"CORE {label}", "value": t["accuracy"], "n": t["num_items"], "kind": "proportion", "baseline": t["random_baseline"]}
                 for label, t in tasks.items()]
    rows += [{"metric": f"{split}_bpb", "value": r["bpb"], "n": r["tokens"]} for split, r in report.get("bpb", {}).items()]
    return rows
