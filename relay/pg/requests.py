"""What the client has sent and the target has not answered yet.

Responses come back in request order, so the relay queues each request as it forwards
it and pops it as its answer arrives: that is how a DataRow knows its columns and an
error knows which statement failed (``relay/pg/machine.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Query:
    """A simple-protocol Query (all its statements: one ReadyForQuery ends it)."""

    text: str  # masked
    started: float
    rows: int = 0
    log: bool = True
    raw: str = ""  # as sent (a COPY in it is read again when its rows come)
    copies: int = 0


@dataclass(slots=True)
class Parse:
    name: str


@dataclass(slots=True)
class Bind:
    pass


@dataclass(slots=True)
class Describe:
    kind: str
    name: str
    hidden: bool  # asked by the relay to learn the columns: its answer is swallowed


@dataclass(slots=True)
class Execute:
    portal: str
    statement: str
    formats: tuple[int, ...]
    text: str  # masked
    started: float
    rows: int = 0


@dataclass(slots=True)
class FunctionCall:
    text: str  # masked
    name: str
    rettype: int
    result_format: int
    started: float


@dataclass(slots=True)
class Close:
    pass


@dataclass(slots=True)
class Sync:
    pass


Pending = Query | Parse | Bind | Describe | Execute | FunctionCall | Close | Sync
# Requests that run something on the target (and so could change a session setting
# before what follows them is read).
RUNS = (Query, Bind, Execute, FunctionCall)
# Requests answered by a ReadyForQuery: waiting for the queue to empty after one of these
# last ends, and a pipeline with another kind last has no such answer coming.
READY = (Query, Sync, FunctionCall)
