"""The query log's fast time binding for SQLite writes what SQLAlchemy would."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import sqlite

from recorder.store.schema import commands
from recorder.store.store import sqlite_utc_text

# What the store's generic path binds for the column: the type decorator, then SQLite's.
_BIND = commands.c.at.type._cached_bind_processor(sqlite.dialect())


@settings(max_examples=500, deadline=None)
@given(
    when=st.datetimes(
        min_value=datetime(1000, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
    )
)
def test_fast_text_equals_sqlalchemys(when: datetime) -> None:
    assert _BIND is not None
    utc = when.astimezone(UTC)  # what the store's _when hands the binder
    assert sqlite_utc_text(utc) == _BIND(when)
