"""The audit store: audit events, sessions, commands, approvals and integrity records.

One synchronous class over SQLAlchemy Core serves both backends: a SQLite file for the
embedded single-relay setup and PostgreSQL when several relays share one store. Every
public method is one short transaction on a pooled connection, so a Store may be shared
between threads.

On SQLite, write transactions start with ``BEGIN IMMEDIATE``: the write lock is taken up
front, so a read-then-write transaction (such as recording an approval decision) cannot
interleave with another one, and a busy database makes writers wait (busy timeout)
instead of failing with a lock upgrade error. On PostgreSQL the same code locks the rows
it is about to change with ``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from recorder.errors import CastgateError
from recorder.store.schema import (
    APPROVAL_STATUSES,
    approval_decisions,
    approvals,
    checkpoints,
    commands,
    events,
    manifests,
    nodes,
    sessions,
    token_exchanges,
)

__all__ = ["APPROVALS_CHANNEL", "Store", "StoreError"]

# PostgreSQL LISTEN/NOTIFY channel on which approval decisions are announced to the
# relays sharing the store (payload: the approval id).
APPROVALS_CHANNEL = "castgate_approvals"

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# Any fixed 64-bit number works, as long as every relay uses the same one.
_MIGRATION_LOCK_KEY = int.from_bytes(b"castgate", "big")
_SQLITE_BUSY_TIMEOUT_MS = 30_000
_PG_CONNECT_TIMEOUT_S = 10
# alembic keeps the running migration in module globals (alembic.context, alembic.op),
# so two migrations in one process must not overlap, even on different databases.
_ALEMBIC_LOCK = threading.Lock()
# Connection execution option that makes the SQLite begin hook take the write lock.
_WRITE = "castgate_write"

_OUTCOMES = ("success", "failure")
_COMMAND_KINDS = ("exec", "shell", "sql", "git")
_COMMAND_ACTIONS = ("allow", "approve", "block")
_DECISIONS = ("approve", "deny")
# "approved" is reachable only through add_decision, which enforces separation of duties.
_SETTABLE_APPROVAL_STATUSES = tuple(
    s for s in APPROVAL_STATUSES if s not in ("pending", "approved")
)


def summarise_run(
    run_id: str, rows: Sequence[dict[str, Any]], figures: dict[str, dict[str, int]]
) -> dict[str, Any]:
    """One pipeline run from its session rows (oldest first) and per-session figures
    (command counts by action, ``approvals``): who started it, what it ran on, when,
    and how much was run, blocked, approved and masked."""
    attrs: dict[str, Any] = {}
    for r in rows:
        for k, v in ((r.get("attributes") or {}).get("attributes") or {}).items():
            attrs.setdefault(k, v)
    first = rows[0].get("attributes") or {}
    masking: dict[str, int] = {}
    for r in rows:
        for detector, n in (r.get("masking_counts") or {}).items():
            masking[detector] = masking.get(detector, 0) + int(n)
    ends = [r["ended_at"] for r in rows if r.get("ended_at") is not None]
    live = sum(1 for r in rows if r.get("ended_at") is None)

    def total(key: str) -> int:
        return sum(figures.get(r["id"], {}).get(key, 0) for r in rows)

    return {
        "run_id": run_id,
        "provider": first.get("provider"),
        "initiator": attrs.get("triggering_actor") or attrs.get("actor") or attrs.get("user_login"),
        "repository": attrs.get("repository") or attrs.get("project_path"),
        "ref": attrs.get("ref"),
        "sha": attrs.get("sha"),
        "workflow": attrs.get("workflow"),
        "environment": attrs.get("environment"),
        "attributes": attrs,
        "identities": sorted({str(r["identity"]) for r in rows}),
        "targets": sorted({str(r["target"]) for r in rows}),
        "sessions": len(rows),
        "live": live,
        "session_ids": [r["id"] for r in rows],
        "first_started_at": rows[0]["started_at"],
        "last_started_at": rows[-1]["started_at"],
        "last_ended_at": None if live else max(ends) if ends else None,
        "commands": sum(
            sum(f.values()) - f.get("approvals", 0)
            for f in (figures.get(r["id"], {}) for r in rows)
        ),
        "blocked": total("block"),
        "held": total("approve"),
        "approvals": total("approvals"),
        "masked": sum(masking.values()),
        "masking_counts": masking,
    }


class StoreError(CastgateError):
    """The audit store cannot do what was asked; the message is one line."""


def _one_line(exc: BaseException) -> str:
    # SQLAlchemy's own text spans several lines (SQL, parameters, a help link); the
    # driver's error underneath is the useful part, and the parameters (command text and
    # other audit content) have no place in an error line anyway.
    orig = getattr(exc, "orig", None)
    source = orig if isinstance(orig, BaseException) else exc
    lines = str(source).strip().splitlines()
    return lines[0].strip() if lines else type(source).__name__


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _when(value: datetime | None, name: str) -> datetime:
    return _now() if value is None else _aware(value, name)


def sqlite_utc_text(value: datetime) -> str:
    """An aware UTC datetime as SQLAlchemy's SQLite ``DateTime`` stores it:
    ``YYYY-MM-DD HH:MM:SS.ffffff``."""
    return value.isoformat(" ", "microseconds")[:26]


def _choice(value: str, allowed: Sequence[str], name: str) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _row(mapping: sa.RowMapping) -> dict[str, Any]:
    return dict(mapping)


def _inserted_id(result: sa.CursorResult[Any]) -> int:
    key = result.inserted_primary_key
    if key is None:
        raise StoreError("the database returned no id for the new row")
    return int(key[0])


def _engine_url(url: str) -> URL:
    """Parse and check a store URL, pinning the driver this package is tested with."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        # The text may hold a password, so it is not echoed back.
        raise StoreError(
            "cannot parse the store URL; use sqlite:////abs/path.db or "
            "postgresql://user:password@host:port/db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:"):
            raise StoreError("the SQLite store needs a file: use sqlite:////abs/path.db")
        if not Path(database).is_absolute():
            # A relative path would depend on the working directory of whoever starts
            # the relay; the config loader resolves it against the config file instead.
            raise StoreError(f"the SQLite store path must be absolute, got {database!r}")
        return parsed.set(drivername="sqlite+pysqlite")
    raise StoreError(
        f"unsupported store URL scheme {parsed.drivername!r}; use sqlite:// or postgresql://"
    )


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from the sqlite3 module so that BEGIN is emitted by
    # _sqlite_on_begin (SQLAlchemy's documented recipe for real SQLite transactions).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        # The busy timeout first: switching a new database to WAL takes a lock that a
        # second process opening it at the same moment must wait for, not fail on.
        cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    immediate = bool(conn.get_execution_options().get(_WRITE))
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _prepare_sqlite_file(database: str) -> None:
    path = Path(database)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Created here rather than by SQLite so that it is private from the first byte;
        # SQLite gives the -wal and -shm files the permissions of the database file.
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot create the SQLite store {database}: {exc.strerror}") from exc


def _make_engine(url: URL) -> Engine:
    if url.get_backend_name() == "sqlite":
        _prepare_sqlite_file(url.database or "")
        engine = sa.create_engine(url, connect_args={"check_same_thread": False})
        sa.event.listen(engine, "connect", _sqlite_on_connect)
        sa.event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return sa.create_engine(
        url,
        # Relays live for weeks; a PostgreSQL restart must not leave dead pooled
        # connections behind that fail the next audit write.
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": _PG_CONNECT_TIMEOUT_S,
            "application_name": "castgate",
        },
    )


def _alembic_config() -> Config:
    config = Config()
    # Config values go through configparser interpolation, where % is special.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return config


class Store:
    """The audit store. Create it with :meth:`Store.open`; close it with :meth:`close`."""

    def __init__(self, engine: Engine, display_url: str) -> None:
        """Wrap an engine made by :meth:`open`; use :meth:`open` rather than this."""
        self._engine = engine
        self._display_url = display_url
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------

    @classmethod
    def open(cls, url: str) -> Store:
        """Connect to the store at ``url`` and migrate its schema to the newest revision.

        ``url`` is ``sqlite:////abs/path.db`` or ``postgresql://user:pw@host:port/db``
        (``postgresql+psycopg://`` is accepted as well). Raises StoreError when the store
        cannot be reached, created or migrated.
        """
        parsed = _engine_url(url)
        engine = _make_engine(parsed)
        store = cls(engine, parsed.render_as_string(hide_password=True))
        try:
            store._migrate()
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        """Close every pooled connection. The store cannot be used afterwards."""
        self._closed = True
        self._engine.dispose()

    def __enter__(self) -> Store:
        """Use the store as a context manager that closes it on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the store."""
        self.close()

    def __repr__(self) -> str:
        """Show the URL without its password."""
        return f"Store({self._display_url!r})"

    @property
    def schema_version(self) -> str:
        """The alembic revision the database is at (the head revision once opened)."""
        with self._tx(write=False) as conn:
            revision = MigrationContext.configure(conn).get_current_revision()
        if revision is None:
            raise StoreError(f"the audit store at {self._display_url} has no schema version")
        return revision

    def _migrate(self) -> None:
        config = _alembic_config()
        script = ScriptDirectory.from_config(config)
        with _ALEMBIC_LOCK:
            self._migrate_locked(config, script)

    def _migrate_locked(self, config: Config, script: ScriptDirectory) -> None:
        known = {rev.revision for rev in script.walk_revisions()}
        try:
            connection = self._engine.connect()
        except SQLAlchemyError as exc:
            raise StoreError(
                f"cannot connect to the audit store at {self._display_url}: {_one_line(exc)}"
            ) from exc
        try:
            with connection as conn:
                conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        # Two relays starting at once would otherwise both try to create
                        # the tables. The lock ends with this transaction.
                        conn.execute(
                            sa.text("SELECT pg_advisory_xact_lock(:key)"),
                            {"key": _MIGRATION_LOCK_KEY},
                        )
                    current = MigrationContext.configure(conn).get_current_revision()
                    if current is not None and current not in known:
                        raise StoreError(
                            f"the audit store at {self._display_url} is at schema revision "
                            f"{current}, which this castgate does not know (its newest is "
                            f"{script.get_current_head()}); upgrade castgate"
                        )
                    config.attributes["connection"] = conn
                    command.upgrade(config, "head")
        except (SQLAlchemyError, CommandError) as exc:
            raise StoreError(
                f"cannot migrate the audit store at {self._display_url}: {_one_line(exc)}"
            ) from exc

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Connection]:
        if self._closed:
            raise StoreError("the audit store is closed")
        try:
            with self._engine.connect() as conn:
                if write:
                    conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    yield conn
        except SQLAlchemyError as exc:
            raise StoreError(f"audit store error: {_one_line(exc)}") from exc

    # --- audit events -------------------------------------------------------------

    def add_event(
        self,
        kind: str,
        actor: str | None,
        outcome: str,
        origin: str | None,
        resource: str | None,
        detail: dict[str, Any] | None = None,
        session_id: str | None = None,
        at: datetime | None = None,
    ) -> int:
        """Record one audit event and return its id.

        The arguments are the six fields PCI DSS 10.2.2 asks of every audit record: user
        (``actor``), type (``kind``, e.g. ``"auth"`` or ``"session.start"``), date and time
        (``at``, default now), ``outcome`` (``"success"`` or ``"failure"``), origination
        (``origin``) and the affected resource (``resource``).
        """
        values = {
            "at": _when(at, "at"),
            "kind": kind,
            "actor": actor,
            "outcome": _choice(outcome, _OUTCOMES, "outcome"),
            "origin": origin,
            "resource": resource,
            "detail": detail,
            "session_id": session_id,
        }
        with self._tx(write=True) as conn:
            result = conn.execute(events.insert().values(**values))
            return _inserted_id(result)

    def list_events(
        self,
        kind: str | None = None,
        session_id: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Return audit events oldest first, optionally filtered.

        ``since`` is inclusive and ``until`` exclusive; ``limit`` keeps the oldest ones.
        """
        query = sa.select(events)
        if kind is not None:
            query = query.where(events.c.kind == kind)
        if session_id is not None:
            query = query.where(events.c.session_id == session_id)
        if since is not None:
            query = query.where(events.c.at >= _aware(since, "since"))
        if until is not None:
            query = query.where(events.c.at < _aware(until, "until"))
        query = query.order_by(events.c.at, events.c.id)
        if limit is not None:
            query = query.limit(limit)
        with self._tx(write=False) as conn:
            return [_row(m) for m in conn.execute(query).mappings()]

    # --- sessions -----------------------------------------------------------------

    def create_session(
        self,
        id: str,
        identity: str,
        target: str,
        protocol: str,
        *,
        groups: Sequence[str] = (),
        auth_method: str | None = None,
        source: str | None = None,
        node: str | None = None,
        cast_path: str | None = None,
        title: str | None = None,
        attributes: dict[str, Any] | None = None,
        run_id: str | None = None,
        started_at: datetime | None = None,
    ) -> None:
        """Record the start of a session; its status is ``"live"`` until it ends."""
        values = {
            "id": id,
            "identity": identity,
            "target": target,
            "protocol": protocol,
            "groups": list(groups),
            "auth_method": auth_method,
            "source": source,
            "node": node,
            "cast_path": cast_path,
            "title": title,
            "attributes": attributes,
            "run_id": run_id,
            "started_at": _when(started_at, "started_at"),
            "status": "live",
        }
        with self._tx(write=True) as conn:
            exists = conn.execute(sa.select(sessions.c.id).where(sessions.c.id == id)).first()
            if exists is not None:
                raise StoreError(f"session {id} already exists")
            conn.execute(sessions.insert().values(**values))

    def end_session(
        self,
        id: str,
        *,
        status: str,
        exit_status: int | None = None,
        lines: int | None = None,
        final_hash: str | None = None,
        masking_counts: dict[str, int] | None = None,
        ended_at: datetime | None = None,
    ) -> None:
        """Record the end of a live session.

        Raises StoreError if the session is unknown or already ended: the end of a
        session is evidence, and evidence is written once.
        """
        if status == "live":
            raise ValueError("an ended session cannot have status 'live'")
        values = {
            "status": status,
            "exit_status": exit_status,
            "lines": lines,
            "final_hash": final_hash,
            "masking_counts": masking_counts,
            "ended_at": _when(ended_at, "ended_at"),
        }
        with self._tx(write=True) as conn:
            result = conn.execute(
                sessions.update()
                .where(sessions.c.id == id, sessions.c.ended_at.is_(None))
                .values(**values)
            )
            if result.rowcount == 0:
                found = conn.execute(sa.select(sessions.c.id).where(sessions.c.id == id)).first()
                if found is None:
                    raise StoreError(f"no session {id}")
                raise StoreError(f"session {id} has already ended")

    def get_session(self, id: str) -> dict[str, Any] | None:
        """Return one session, or None if there is none with this id."""
        with self._tx(write=False) as conn:
            found = conn.execute(sa.select(sessions).where(sessions.c.id == id)).mappings().first()
        return None if found is None else _row(found)

    def list_sessions(
        self,
        *,
        live: bool | None = None,
        identity: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Return sessions newest first.

        ``live=True`` keeps sessions that have not ended, ``live=False`` those that have.
        ``since`` (inclusive) and ``until`` (exclusive) bound the start time.
        """
        query = sa.select(sessions)
        if live is True:
            query = query.where(sessions.c.ended_at.is_(None))
        elif live is False:
            query = query.where(sessions.c.ended_at.is_not(None))
        if identity is not None:
            query = query.where(sessions.c.identity == identity)
        if target is not None:
            query = query.where(sessions.c.target == target)
        if since is not None:
            query = query.where(sessions.c.started_at >= _aware(since, "since"))
        if until is not None:
            query = query.where(sessions.c.started_at < _aware(until, "until"))
        query = query.order_by(sessions.c.started_at.desc(), sessions.c.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._tx(write=False) as conn:
            return [_row(m) for m in conn.execute(query).mappings()]

    # --- pipeline runs ------------------------------------------------------------

    def run_sessions(self, run_id: str) -> list[dict[str, Any]]:
        """The sessions of one pipeline run, oldest first."""
        query = (
            sa.select(sessions)
            .where(sessions.c.run_id == run_id)
            .order_by(sessions.c.started_at, sessions.c.id)
        )
        with self._tx(write=False) as conn:
            return [_row(m) for m in conn.execute(query).mappings()]

    def list_runs(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        run_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """Pipeline runs (sessions sharing ``run_id``) with a session started in
        [since, until), newest first: :func:`summarise_run` of each."""
        picked = sa.select(sessions.c.run_id).where(sessions.c.run_id.is_not(None))
        if run_id is not None:
            picked = picked.where(sessions.c.run_id == run_id)
        if since is not None:
            picked = picked.where(sessions.c.started_at >= _aware(since, "since"))
        if until is not None:
            picked = picked.where(sessions.c.started_at < _aware(until, "until"))
        with self._tx(write=False) as conn:
            rows = [
                _row(m)
                for m in conn.execute(
                    sa.select(sessions)
                    .where(sessions.c.run_id.in_(picked.distinct()))
                    .order_by(sessions.c.started_at, sessions.c.id)
                ).mappings()
            ]
            ids = [r["id"] for r in rows]
            figures: dict[str, dict[str, int]] = {}
            if ids:
                for sid, action, n in conn.execute(
                    sa.select(commands.c.session_id, commands.c.action, sa.func.count())
                    .where(commands.c.session_id.in_(ids))
                    .group_by(commands.c.session_id, commands.c.action)
                ):
                    f = figures.setdefault(sid, {})
                    f[action] = f.get(action, 0) + n
                for sid, n in conn.execute(
                    sa.select(approvals.c.session_id, sa.func.count())
                    .where(approvals.c.session_id.in_(ids))
                    .group_by(approvals.c.session_id)
                ):
                    figures.setdefault(sid, {})["approvals"] = n
        by_run: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_run.setdefault(str(r["run_id"]), []).append(r)
        runs = [summarise_run(rid, rs, figures) for rid, rs in by_run.items()]
        runs.sort(key=lambda r: (r["first_started_at"], r["run_id"]), reverse=True)
        return runs

    # --- exchanged tokens ----------------------------------------------------------

    def put_exchanged_token(
        self, digest: str, identity: dict[str, Any], expires_at: datetime
    ) -> None:
        """Keep an exchanged token's SHA-256 (hex) with the identity it stands for; the
        expired ones are dropped on the way."""
        now = _now()
        with self._tx(write=True) as conn:
            conn.execute(token_exchanges.delete().where(token_exchanges.c.expires_at <= now))
            conn.execute(
                token_exchanges.insert().values(
                    digest=digest,
                    identity=identity,
                    issued_at=now,
                    expires_at=_aware(expires_at, "expires_at"),
                )
            )

    def get_exchanged_token(self, digest: str) -> dict[str, Any] | None:
        """The identity of an unexpired exchanged token, or None."""
        with self._tx(write=False) as conn:
            row = (
                conn.execute(
                    sa.select(token_exchanges).where(
                        token_exchanges.c.digest == digest,
                        token_exchanges.c.expires_at > _now(),
                    )
                )
                .mappings()
                .first()
            )
        return None if row is None else dict(row["identity"])

    # --- command log --------------------------------------------------------------

    def add_command(
        self,
        session_id: str,
        text: str,
        *,
        kind: str,
        action: str,
        rule: str | None = None,
        approval_id: int | None = None,
        at: datetime | None = None,
    ) -> int:
        """Record a command of a session and return its id.

        ``text`` must already be masked. ``kind`` is ``exec``, ``shell``, ``sql`` or
        ``git``; ``action`` the policy outcome: ``allow``, ``approve`` or ``block``.
        """
        values = {
            "session_id": session_id,
            "at": _when(at, "at"),
            "text": text,
            "kind": _choice(kind, _COMMAND_KINDS, "kind"),
            "action": _choice(action, _COMMAND_ACTIONS, "action"),
            "rule": rule,
            "approval_id": approval_id,
        }
        with self._tx(write=True) as conn:
            result = conn.execute(commands.insert().values(**values))
            return _inserted_id(result)

    def finish_command(
        self,
        id: int,
        *,
        status: str,
        exit_status: int | None = None,
        rows: int | None = None,
        duration_ms: float | None = None,
        bytes_in: int | None = None,
        bytes_out: int | None = None,
    ) -> None:
        """Record how a command ended. Raises StoreError if it is unknown or finished."""
        values = {
            "status": status,
            "finished_at": _now(),
            "exit_status": exit_status,
            "rows": rows,
            "duration_ms": duration_ms,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
        }
        with self._tx(write=True) as conn:
            result = conn.execute(
                commands.update()
                .where(commands.c.id == id, commands.c.finished_at.is_(None))
                .values(**values)
            )
            if result.rowcount == 0:
                found = conn.execute(sa.select(commands.c.id).where(commands.c.id == id)).first()
                if found is None:
                    raise StoreError(f"no command {id}")
                raise StoreError(f"command {id} has already finished")

    def add_finished_commands(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record many finished commands in one transaction (the PostgreSQL relay logs
        every statement; one transaction per statement would cap its throughput).

        Each row has the keys of :meth:`add_command` and :meth:`finish_command`
        (``session_id``, ``text``, ``kind``, ``action``, ``at`` and optionally ``rule``,
        ``approval_id``, ``status``, ``rows``, ``duration_ms``, ``finished_at``...).
        """
        if not rows:
            return
        sql, keys, procs = self._bulk_insert_commands
        at_i, fin_i = keys.index("at"), keys.index("finished_at")
        bind_at, bind_fin = procs.get("at"), procs.get("finished_at")
        others = [
            (i, procs[k]) for i, k in enumerate(keys) if k in procs and i not in (at_i, fin_i)
        ]
        values = []
        for row in rows:
            # Validation and binding at a few hundred nanoseconds a row: the relay logs
            # thousands of statements a second, and this runs beside its event loop.
            if row["kind"] not in _COMMAND_KINDS:
                _choice(row["kind"], _COMMAND_KINDS, "kind")
            if row["action"] not in _COMMAND_ACTIONS:
                _choice(row["action"], _COMMAND_ACTIONS, "action")
            v = list(map(row.get, keys))
            at, finished = v[at_i], v[fin_i]
            when = _when(at, "at")
            v[at_i] = bind_at(when) if bind_at is not None else when
            if finished is at:
                # The relay passes one datetime for both: bind it once.
                v[fin_i] = v[at_i]
            else:
                when = _when(finished, "finished_at")
                v[fin_i] = bind_fin(when) if bind_fin is not None else when
            for i, proc in others:
                v[i] = proc(v[i])
            values.append(tuple(v))
        json_sql = self._json_insert_commands
        if json_sql is not None:
            # SQLite: the rows as one JSON parameter, taken apart by SQLite itself. The
            # driver binds each value of an executemany holding the GIL, which here is
            # the relay's event loop's time; SQLite parses the JSON without it.
            try:
                payload = orjson.dumps(values)
            except orjson.JSONEncodeError:
                payload = None  # (a lone surrogate: the driver refuses it as it would)
            if payload is not None and b"\\u0000" not in payload:
                with self._tx(write=True) as conn:
                    conn.exec_driver_sql(json_sql, (payload.decode(),))
                return
        with self._tx(write=True) as conn:
            conn.exec_driver_sql(sql, values)

    @functools.cached_property
    def _json_insert_commands(self) -> str | None:
        """For SQLite: the query log's INSERT reading its rows from one JSON array."""
        if self._engine.dialect.name != "sqlite":
            return None
        _sql, keys, _procs = self._bulk_insert_commands
        picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(keys)))
        return (
            f"INSERT INTO commands ({', '.join(keys)}) "  # noqa: S608 - column names
            f"SELECT {picks} FROM json_each(?) ORDER BY key"
        )

    @functools.cached_property
    def _bulk_insert_commands(self) -> tuple[str, tuple[str, ...], dict[str, Any]]:
        """The compiled INSERT of the query log (its SQL, its parameter order) and the
        columns' bind processors, built once: executing it with plain tuples skips the
        per-row parameter work of SQLAlchemy (about 10 us a row), which at thousands of
        statements a second is most of the cost of the log."""
        dialect = self._engine.dialect
        keys = tuple(c.key for c in commands.columns if c.key != "id")
        compiled = commands.insert().compile(dialect=dialect, column_keys=list(keys))
        order = tuple(compiled.positiontup or ()) if compiled.positional else keys
        sql = compiled.string
        if not compiled.positional:
            # Named paramstyles (psycopg's pyformat): turn the names into positions.
            for k in keys:
                sql = sql.replace(f"%({k})s", "%s")
        procs: dict[str, Any] = {}
        for c in commands.columns:
            # Public API: the dialect's implementation of the type and its processor
            # (what SQLAlchemy itself caches per dialect), built once here as well.
            proc = c.type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None and c.key in keys:
                procs[c.key] = proc
        if dialect.name == "sqlite":
            # The times arrive aware and in UTC (``_when``): their text is what
            # SQLAlchemy's SQLite DATETIME writes, from isoformat (C) instead of its
            # formatting with a dict and a second time-zone conversion.
            procs["at"] = procs["finished_at"] = sqlite_utc_text
        return sql, order, procs

    def list_commands(self, session_id: str) -> list[dict[str, Any]]:
        """Return the commands of a session in the order they were recorded."""
        query = (
            sa.select(commands).where(commands.c.session_id == session_id).order_by(commands.c.id)
        )
        with self._tx(write=False) as conn:
            return [_row(m) for m in conn.execute(query).mappings()]

    # --- approvals ----------------------------------------------------------------

    def create_approval(
        self,
        *,
        session_id: str,
        identity: str,
        target: str,
        command: str,
        rule: str,
        expires_at: datetime,
        min_approvals: int = 1,
        approver_groups: Sequence[str] = (),
        requested_at: datetime | None = None,
    ) -> int:
        """Record a pending approval request of ``identity`` and return its id."""
        if min_approvals < 1:
            raise ValueError(f"min_approvals must be at least 1, got {min_approvals}")
        values = {
            "session_id": session_id,
            "identity": identity,
            "target": target,
            "command": command,
            "rule": rule,
            "min_approvals": min_approvals,
            "approver_groups": list(approver_groups),
            "requested_at": _when(requested_at, "requested_at"),
            "expires_at": _aware(expires_at, "expires_at"),
            "status": "pending",
        }
        with self._tx(write=True) as conn:
            result = conn.execute(approvals.insert().values(**values))
            return _inserted_id(result)

    def get_approval(self, id: int) -> dict[str, Any] | None:
        """Return one approval with its ``decisions``, or None if there is none."""
        with self._tx(write=False) as conn:
            return self._approval(conn, id)

    def list_approvals(
        self, *, status: str | None = None, session_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Return approvals oldest request first, each with its ``decisions``."""
        # One subquery picks the approvals, so their decisions come in one more query
        # however many approvals match.
        ids = sa.select(approvals.c.id)
        if status is not None:
            ids = ids.where(approvals.c.status == _choice(status, APPROVAL_STATUSES, "status"))
        if session_id is not None:
            ids = ids.where(approvals.c.session_id == session_id)
        with self._tx(write=False) as conn:
            rows = conn.execute(
                sa.select(approvals)
                .where(approvals.c.id.in_(ids))
                .order_by(approvals.c.requested_at, approvals.c.id)
            ).mappings()
            result = [_row(m) for m in rows]
            decisions = self._decisions(conn, approval_decisions.c.approval_id.in_(ids))
        for approval in result:
            approval["decisions"] = decisions.get(approval["id"], [])
        return result

    def add_decision(
        self,
        approval_id: int,
        *,
        approver: str,
        decision: str,
        reason: str | None = None,
        at: datetime | None = None,
    ) -> dict[str, Any]:
        """Record an approver's decision on a pending approval and return the approval.

        A ``deny`` resolves the approval as denied at once; it is approved once
        ``min_approvals`` distinct approvers approved. Raises StoreError if the approval
        is unknown, not pending or past its expiry, if the approver is the requester (a
        requester never approves its own request), or if the approver already decided.
        Checking and writing happen in one transaction holding the approval's row lock,
        so of two concurrent decisions exactly one can resolve the approval.
        """
        _choice(decision, _DECISIONS, "decision")
        when = _when(at, "at")
        with self._tx(write=True) as conn:
            approval = (
                conn.execute(
                    sa.select(approvals).where(approvals.c.id == approval_id).with_for_update()
                )
                .mappings()
                .first()
            )
            if approval is None:
                raise StoreError(f"no approval {approval_id}")
            if approval["status"] != "pending":
                raise StoreError(f"approval {approval_id} is {approval['status']}, not pending")
            if approver == approval["identity"]:
                raise StoreError(
                    f"{approver} requested approval {approval_id}: "
                    "a requester never approves its own request"
                )
            if when >= approval["expires_at"]:
                raise StoreError(
                    f"approval {approval_id} expired at {approval['expires_at'].isoformat()}"
                )
            earlier = conn.execute(
                sa.select(approval_decisions.c.id).where(
                    approval_decisions.c.approval_id == approval_id,
                    approval_decisions.c.approver == approver,
                )
            ).first()
            if earlier is not None:
                raise StoreError(f"{approver} has already decided approval {approval_id}")
            conn.execute(
                approval_decisions.insert().values(
                    approval_id=approval_id,
                    approver=approver,
                    decision=decision,
                    reason=reason,
                    at=when,
                )
            )
            resolution: dict[str, Any] | None = None
            if decision == "deny":
                resolution = {"status": "denied", "resolved_at": when, "reason": reason}
            else:
                approvers = conn.execute(
                    sa.select(sa.func.count(sa.distinct(approval_decisions.c.approver))).where(
                        approval_decisions.c.approval_id == approval_id,
                        approval_decisions.c.decision == "approve",
                    )
                ).scalar_one()
                if approvers >= approval["min_approvals"]:
                    resolution = {"status": "approved", "resolved_at": when}
            if resolution is not None:
                conn.execute(
                    approvals.update().where(approvals.c.id == approval_id).values(**resolution)
                )
            updated = self._approval(conn, approval_id)
        if updated is None:  # pragma: no cover - the row is locked above
            raise StoreError(f"no approval {approval_id}")
        return updated

    def set_approval_status(self, id: int, status: str, *, reason: str | None = None) -> None:
        """Resolve a pending approval as ``expired``, ``interrupted`` or ``denied``.

        An approval that is no longer pending is left as it is. ``approved`` cannot be set
        here: only :meth:`add_decision` approves, after its separation-of-duties checks.
        """
        _choice(status, _SETTABLE_APPROVAL_STATUSES, "status")
        with self._tx(write=True) as conn:
            conn.execute(
                approvals.update()
                .where(approvals.c.id == id, approvals.c.status == "pending")
                .values(status=status, resolved_at=_now(), reason=reason)
            )

    def _approval(self, conn: Connection, id: int) -> dict[str, Any] | None:
        found = conn.execute(sa.select(approvals).where(approvals.c.id == id)).mappings().first()
        if found is None:
            return None
        approval = _row(found)
        approval["decisions"] = self._decisions(conn, approval_decisions.c.approval_id == id).get(
            id, []
        )
        return approval

    @staticmethod
    def _decisions(
        conn: Connection, condition: sa.ColumnElement[bool]
    ) -> dict[int, list[dict[str, Any]]]:
        query = (
            sa.select(approval_decisions)
            .where(condition)
            .order_by(approval_decisions.c.at, approval_decisions.c.id)
        )
        grouped: dict[int, list[dict[str, Any]]] = {}
        for m in conn.execute(query).mappings():
            grouped.setdefault(m["approval_id"], []).append(
                {
                    "approver": m["approver"],
                    "decision": m["decision"],
                    "reason": m["reason"],
                    "at": m["at"],
                }
            )
        return grouped

    # --- integrity ----------------------------------------------------------------

    def add_checkpoint(
        self, session_id: str, lines: int, chain_hash: str, at: datetime | None = None
    ) -> None:
        """Record the integrity chain hash of a session's recording after ``lines`` lines."""
        with self._tx(write=True) as conn:
            conn.execute(
                checkpoints.insert().values(
                    session_id=session_id,
                    lines=lines,
                    chain_hash=chain_hash,
                    at=_when(at, "at"),
                )
            )

    def latest_checkpoint(self, session_id: str) -> dict[str, Any] | None:
        """Return the checkpoint covering the most lines of a session, or None."""
        query = (
            sa.select(
                checkpoints.c.session_id,
                checkpoints.c.lines,
                checkpoints.c.chain_hash,
                checkpoints.c.at,
            )
            .where(checkpoints.c.session_id == session_id)
            .order_by(checkpoints.c.lines.desc(), checkpoints.c.id.desc())
            .limit(1)
        )
        with self._tx(write=False) as conn:
            found = conn.execute(query).mappings().first()
        return None if found is None else _row(found)

    def put_manifest(self, session_id: str, manifest: dict[str, Any]) -> None:
        """Store the manifest of a session's recording, replacing an earlier one."""
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        values = {"session_id": session_id, "manifest": text, "updated_at": _now()}
        with self._tx(write=True) as conn:
            if conn.dialect.name == "postgresql":
                pg_stmt = postgresql.insert(manifests).values(**values)
                conn.execute(
                    pg_stmt.on_conflict_do_update(
                        index_elements=[manifests.c.session_id],
                        set_={
                            "manifest": pg_stmt.excluded.manifest,
                            "updated_at": pg_stmt.excluded.updated_at,
                        },
                    )
                )
            else:
                lite_stmt = sqlite.insert(manifests).values(**values)
                conn.execute(
                    lite_stmt.on_conflict_do_update(
                        index_elements=[manifests.c.session_id],
                        set_={
                            "manifest": lite_stmt.excluded.manifest,
                            "updated_at": lite_stmt.excluded.updated_at,
                        },
                    )
                )

    def get_manifest(self, session_id: str) -> dict[str, Any] | None:
        """Return the stored manifest of a session, or None."""
        with self._tx(write=False) as conn:
            text = conn.execute(
                sa.select(manifests.c.manifest).where(manifests.c.session_id == session_id)
            ).scalar_one_or_none()
        if text is None:
            return None
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            raise StoreError(f"the manifest of session {session_id} is not a JSON object")
        return loaded

    # --- relay nodes ----------------------------------------------------------------
    # Times here come from the database's clock on PostgreSQL: relays on different
    # machines compare each other's heartbeats, and their own clocks may disagree.

    @staticmethod
    def _db_now(conn: Connection) -> datetime:
        if conn.dialect.name == "postgresql":
            value = conn.execute(sa.select(sa.func.now())).scalar_one()
            return _aware(value, "now()")
        return _now()

    def register_node(self, id: str, *, api_url: str | None, version: str) -> dict[str, Any] | None:
        """Record that relay ``id`` runs now (started, heartbeat now, not stopped) and
        return the row it had before, or None for a new node."""
        with self._tx(write=True) as conn:
            now = self._db_now(conn)
            before = (
                conn.execute(sa.select(nodes).where(nodes.c.id == id).with_for_update())
                .mappings()
                .first()
            )
            values = {
                "api_url": api_url,
                "version": version,
                "started_at": now,
                "heartbeat_at": now,
                "stopped_at": None,
            }
            if before is None:
                conn.execute(nodes.insert().values(id=id, **values))
                return None
            conn.execute(nodes.update().where(nodes.c.id == id).values(**values))
            return _row(before)

    def heartbeat_node(self, id: str) -> bool:
        """Refresh the heartbeat of a running relay. False when the node is unknown or
        was marked stopped (another relay declared it lost): it must register again."""
        with self._tx(write=True) as conn:
            now = self._db_now(conn)
            result = conn.execute(
                nodes.update()
                .where(nodes.c.id == id, nodes.c.stopped_at.is_(None))
                .values(heartbeat_at=now)
            )
            return bool(result.rowcount)

    def stop_node(self, id: str) -> None:
        """Mark a relay stopped (clean shutdown)."""
        with self._tx(write=True) as conn:
            now = self._db_now(conn)
            conn.execute(
                nodes.update()
                .where(nodes.c.id == id, nodes.c.stopped_at.is_(None))
                .values(stopped_at=now)
            )

    def get_node(self, id: str) -> dict[str, Any] | None:
        """Return one relay node, or None."""
        with self._tx(write=False) as conn:
            found = conn.execute(sa.select(nodes).where(nodes.c.id == id)).mappings().first()
        return None if found is None else _row(found)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return every relay node that registered, by id."""
        with self._tx(write=False) as conn:
            return [_row(m) for m in conn.execute(sa.select(nodes).order_by(nodes.c.id)).mappings()]

    def reap_nodes(self, timeout: float, *, exclude: str | None = None) -> list[dict[str, Any]]:
        """Declare lost every running node whose heartbeat is older than ``timeout``
        seconds (except ``exclude``, the caller): mark it stopped, its pending approvals
        and live sessions ``interrupted`` (nothing else of them changes).

        Safe when several relays reap at once: each node is claimed by a conditional
        update in the same transaction as its sessions, so exactly one caller reports
        it. Returns ``{"node", "heartbeat_at", "approvals", "sessions"}`` per node
        claimed.
        """
        with self._tx(write=False) as conn:
            cutoff = self._db_now(conn) - timedelta(seconds=timeout)
            query = sa.select(nodes.c.id).where(
                nodes.c.stopped_at.is_(None), nodes.c.heartbeat_at < cutoff
            )
            if exclude is not None:
                query = query.where(nodes.c.id != exclude)
            stale = list(conn.execute(query).scalars())
        reaped = []
        for node in stale:
            with self._tx(write=True) as conn:
                now = self._db_now(conn)
                cutoff = now - timedelta(seconds=timeout)
                claimed = conn.execute(
                    nodes.update()
                    .where(
                        nodes.c.id == node,
                        nodes.c.stopped_at.is_(None),
                        nodes.c.heartbeat_at < cutoff,
                    )
                    .values(stopped_at=now)
                    .returning(nodes.c.heartbeat_at)
                ).first()
                if claimed is None:
                    continue  # another relay reaped it, or it came back
                owned = sa.select(sessions.c.id).where(sessions.c.node == node)
                approvals_done = conn.execute(
                    approvals.update()
                    .where(approvals.c.status == "pending", approvals.c.session_id.in_(owned))
                    .values(status="interrupted", resolved_at=now, reason=f"relay {node} lost")
                ).rowcount
                sessions_done = conn.execute(
                    sessions.update()
                    .where(sessions.c.node == node, sessions.c.ended_at.is_(None))
                    .values(status="interrupted", ended_at=now)
                ).rowcount
            reaped.append(
                {
                    "node": node,
                    "heartbeat_at": claimed[0],
                    "approvals": approvals_done,
                    "sessions": sessions_done,
                }
            )
        return reaped

    def notify_approval(self, approval_id: int) -> None:
        """Announce a decision on ``approval_id`` to the relays listening on
        :data:`APPROVALS_CHANNEL` (PostgreSQL); nothing on SQLite, where the one relay
        made the decision itself or polls for it."""
        if self._engine.dialect.name != "postgresql":
            return
        with self._tx(write=False) as conn:
            conn.execute(sa.select(sa.func.pg_notify(APPROVALS_CHANNEL, str(approval_id))))

    def libpq_url(self) -> str | None:
        """The PostgreSQL store as a libpq URL with its password (for a separate LISTEN
        connection); None for SQLite. Never log it."""
        url = self._engine.url
        if url.get_backend_name() != "postgresql":
            return None
        return url.set(drivername="postgresql").render_as_string(hide_password=False)
