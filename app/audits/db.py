"""The audit database: an SQLAlchemy engine for any URL (SQLite by default), migrations, sessions."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

__all__ = [
    "MIGRATIONS",
    "DatabaseError",
    "head_revision",
    "hide_password",
    "make_engine",
    "migrate",
    "revision",
    "session_factory",
]

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_MS = 30_000  # writers wait this long for SQLite's lock instead of failing at once


class DatabaseError(RuntimeError):
    """The audit database cannot be used (bad URL, unreachable server, unwritable file)."""


def hide_password(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(//[^/:@]*:)[^@/]*@", r"\1***@", url)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, a crash loses no commit
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite (a file; WAL, full sync, busy timeout) or any server URL
    SQLAlchemy knows, e.g. ``postgresql+psycopg://user:pass@host/db``."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        raise DatabaseError(f"bad database URL {hide_password(url)!r}: expected "
                            "dialect+driver://user:password@host:port/database") from None
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # the driver the project installs
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).parent
            if not folder.is_dir():
                raise DatabaseError(f"the audit database's folder {folder} does not exist")
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_MS / 1000,
                                                     "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(parsed, pool_pre_ping=True)


def _alembic_config(connection: Any) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head() or ""


def revision(engine: Engine) -> str | None:
    """The schema revision the database is at (None before the first migration)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the schema to the newest revision (idempotent; one migrator at a time on PostgreSQL)."""
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(74736)"))  # arbitrary fixed key
            command.upgrade(_alembic_config(conn), "head")
    except (SQLAlchemyError, CommandError, OSError) as exc:  # server down, file read-only, ...
        raise DatabaseError(f"cannot open the audit database {engine.url.render_as_string()}: "
                            f"{' '.join(str(exc).split())[:300]}") from exc
    return head_revision()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
