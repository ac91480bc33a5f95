"""Every table the store keeps, as one ordered list of migrations (SQLite and PostgreSQL alike).

Migrations are plain functions registered in order by ``@migration``; ``migrate`` applies each one not yet recorded
in ``distillgate_migrations`` and records it, all in one transaction under the database's write lock (SQLite's
``BEGIN IMMEDIATE``, a PostgreSQL advisory lock), so several processes starting at once apply each exactly once.

A migration must also be safe on a database written before migrations were recorded (the SQLite files of earlier
releases: every table there, no ``distillgate_migrations``): hence ``CREATE ... IF NOT EXISTS`` and ``ON CONFLICT
DO NOTHING``. A new migration goes at the end; an applied one is never edited.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import orjson

from distillgate.db import Conn, Dialect

Migration = Callable[[Conn, Dialect], None]
MIGRATIONS: list[tuple[str, Migration]] = []
#: the PostgreSQL advisory lock key ``migrate`` holds (any constant; "dgmig" in ASCII)
MIGRATE_LOCK = 0x64676D6967


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_log_and_quotas(conn: Conn, d: Dialect) -> None:
    conn.script(f"""
    CREATE TABLE IF NOT EXISTS log (
        idx {d.bigint} PRIMARY KEY, entry_hash TEXT NOT NULL, body {d.blob} NOT NULL, kind TEXT NOT NULL,
        ts TEXT NOT NULL, run TEXT, project TEXT, "user" TEXT);
    CREATE INDEX IF NOT EXISTS log_run ON log(run);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value {d.blob} NOT NULL);
    CREATE TABLE IF NOT EXISTS checkpoints (
        tree_size {d.bigint} PRIMARY KEY, root_hash TEXT NOT NULL, ts TEXT NOT NULL, key_id TEXT NOT NULL,
        signature TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS counters (
        scope TEXT NOT NULL, key TEXT NOT NULL, day TEXT NOT NULL, tokens {d.bigint} NOT NULL DEFAULT 0,
        records {d.bigint} NOT NULL DEFAULT 0, PRIMARY KEY (scope, key, day));
    CREATE TABLE IF NOT EXISTS reservations (
        id TEXT PRIMARY KEY, decision_index {d.bigint} NOT NULL, project TEXT, "user" TEXT, run TEXT,
        day TEXT NOT NULL, tokens_reserved {d.bigint} NOT NULL, records_reserved {d.bigint} NOT NULL,
        tokens_charged {d.bigint}, records_charged {d.bigint}, state TEXT NOT NULL, created {d.real} NOT NULL,
        expires {d.real} NOT NULL);
    CREATE INDEX IF NOT EXISTS reservations_held ON reservations(state, expires)
    """)


@migration
def m002_log_body_run_index(conn: Conn, d: Dialect) -> None:
    """Runs are selected on the hashed body's ``run`` field, not on the editable column (ledger/entries.py)."""
    if d.name == "postgres":  # an index expression must be IMMUTABLE: the body is UTF-8 canonical JSON
        conn.execute("""
        CREATE OR REPLACE FUNCTION distillgate_body_run(body BYTEA) RETURNS TEXT
        LANGUAGE SQL IMMUTABLE STRICT PARALLEL SAFE
        AS $$ SELECT convert_from(body, 'UTF8')::jsonb ->> 'run' $$""")
    conn.execute(f"CREATE INDEX IF NOT EXISTS log_body_run ON log(({d.body_run}))")


@migration
def m003_run_owners(conn: Conn, d: Dialect) -> None:
    """A run belongs to the project of its first allowed inference decision; a log older than the table is read
    once to fill it."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS runs (run TEXT PRIMARY KEY, project TEXT NOT NULL, "
                 f"decision_index {d.bigint} NOT NULL)")
    rows = conn.execute("SELECT idx, body FROM log WHERE kind='decision' ORDER BY idx").fetchall()
    for idx, body in rows:
        entry = orjson.loads(body)
        if entry.get("decision") == "allow" and entry.get("request_kind") == "inference" and entry.get("run") \
                and entry.get("project"):
            conn.execute("INSERT INTO runs (run, project, decision_index) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                         (entry["run"], entry["project"], idx))


@migration
def m004_api_keys(conn: Conn, d: Dialect) -> None:
    """API keys (distillgate/keys.py): only the sha256 of a key is stored."""
    conn.execute("""CREATE TABLE IF NOT EXISTS gateway_api_keys (
        key_id TEXT PRIMARY KEY, key_hash TEXT NOT NULL UNIQUE, "user" TEXT NOT NULL, label TEXT,
        created_at TEXT NOT NULL, revoked_at TEXT)""")


@migration
def m005_write_head(conn: Conn, d: Dialect) -> None:
    """The row every PostgreSQL writer locks (``SELECT ... FOR UPDATE``) before it reads the chain head or a quota
    counter, and whose ``generation`` it bumps before COMMIT: appends are one sequence across replicas, and a
    replica whose cache was built under another generation reloads it. (SQLite uses its file lock and
    ``PRAGMA data_version`` for the same.)"""
    conn.execute(f"CREATE TABLE IF NOT EXISTS write_head (id INTEGER PRIMARY KEY, generation {d.bigint} NOT NULL)")
    conn.execute("INSERT INTO write_head (id, generation) VALUES (1, 0) ON CONFLICT DO NOTHING")


@migration
def m006_review_accounts(conn: Conn, d: Dialect) -> None:
    """Reviewer accounts and sign-in failure counts (distillgate/web/accounts.py)."""
    conn.script(f"""
    CREATE TABLE IF NOT EXISTS review_accounts (
        "user" TEXT PRIMARY KEY, password_hash TEXT NOT NULL, created_at TEXT NOT NULL, disabled_at TEXT);
    CREATE TABLE IF NOT EXISTS review_signin_failures (
        "user" TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at {d.real} NOT NULL, locked_until {d.real})
    """)


@migration
def m007_route_shadow(conn: Conn, d: Dialect) -> None:
    """Student-vs-teacher comparisons of routed traffic (distillgate/gateway/shadow.py)."""
    ident = "INTEGER PRIMARY KEY AUTOINCREMENT" if d.name == "sqlite" else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    conn.script(f"""
    CREATE TABLE IF NOT EXISTS route_shadow (
        id {ident}, route TEXT NOT NULL, slice TEXT NOT NULL, at {d.real} NOT NULL, agree INTEGER NOT NULL,
        request_hash TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS route_shadow_window ON route_shadow(route, slice, id)
    """)


@migration
def m008_monitor_events(conn: Conn, d: Dialect) -> None:
    """What each gateway process's extraction monitor observed (extraction/shared.py): every worker and replica
    applies the others' rows, so a user's sliding windows are the same whichever process a request lands on."""
    ident = "INTEGER PRIMARY KEY AUTOINCREMENT" if d.name == "sqlite" else "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"
    conn.script(f"""
    CREATE TABLE IF NOT EXISTS monitor_events (
        seq {ident}, origin TEXT NOT NULL, at {d.real} NOT NULL, record {d.blob} NOT NULL)
    """)


@migration
def m009_drop_log_run_index(conn: Conn, d: Dialect) -> None:
    """No read selects on the editable ``run`` column since m002 (runs are selected on the hashed body's field):
    its index only cost every append an index insert (about a quarter of a log row's insert on SQLite)."""
    conn.execute("DROP INDEX IF EXISTS log_run")


def applied(conn: Conn) -> list[str]:
    """Names of the migrations recorded in ``conn``'s database, in the order they were applied."""
    return [str(r[0]) for r in conn.execute("SELECT name FROM distillgate_migrations ORDER BY seq").fetchall()]


def _table_exists(conn: Conn, name: str) -> bool:
    if conn.dialect.name == "postgres":
        return conn.execute("SELECT to_regclass(?)", (name,)).fetchone()[0] is not None
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def migrate(conn: Conn) -> list[str]:
    """Apply the migrations ``conn``'s database lacks (one transaction, under the write lock); their names."""
    d = conn.dialect
    if _table_exists(conn, "distillgate_migrations") and len(applied(conn)) == len(MIGRATIONS):
        return []  # the common case, without taking the write lock
    conn.execute("BEGIN IMMEDIATE" if d.name == "sqlite" else "BEGIN")
    try:
        if d.name == "postgres":
            conn.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATE_LOCK,))
        conn.execute(f"CREATE TABLE IF NOT EXISTS distillgate_migrations (seq {d.bigint} NOT NULL, "
                     "name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)")
        done = {str(r[0]) for r in conn.execute("SELECT name FROM distillgate_migrations").fetchall()}
        new: list[str] = []
        for seq, (name, fn) in enumerate(MIGRATIONS, start=1):
            if name in done:
                continue
            fn(conn, d)
            conn.execute("INSERT INTO distillgate_migrations (seq, name, applied_at) VALUES (?,?,?)",
                         (seq, name, datetime.now(UTC).isoformat(timespec="seconds")))
            new.append(name)
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback_quietly()
        raise
    return new
