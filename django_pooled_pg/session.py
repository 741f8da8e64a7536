"""Session state: what a borrower can leave behind on a connection, and how it is cleared.

A pooled connection outlives the code that borrowed it, so anything that lives in the database
*session* rather than in a transaction would leak to the next borrower: ``SET`` and ``SET ROLE``,
``WITH HOLD`` cursors, temporary tables, session advisory locks, ``LISTEN``, ``PREPARE``.

Two ideas keep this cheap:

* The settings the pool applies to every connection (time zone, ``assume_role``) travel in the
  connection's startup packet (libpq ``options``), so they are the session's *defaults*:
  ``DISCARD ALL`` (which includes ``RESET ALL``) brings them back instead of wiping them.
* Statements are classified on the way out (:func:`changes_session`). Only a connection whose
  borrower ran one pays for ``DISCARD ALL``; the common case returns with no round trip at all.
"""

from __future__ import annotations

import re
from typing import Any

#: Statements whose effect outlives the transaction they run in. Matched at the start of the
#: text or after a ``;``, case-insensitively. ``SET LOCAL``, ``SET CONSTRAINTS`` and
#: ``SET TRANSACTION`` end with the transaction and are not listed.
_SESSION_STATEMENT = re.compile(
    r"""
    (?:^|;)\s*(?:
        SET\s+(?!LOCAL\b|CONSTRAINTS\b|TRANSACTION\b)
      | RESET\b
      | LISTEN\b
      | PREPARE\b
      | LOAD\b
      | DECLARE\b[^;]*\bWITH\s+HOLD\b
      | CREATE\s+(?:(?:GLOBAL|LOCAL)\s+)?TEMP(?:ORARY)?\b
    )
    | \bINTO\s+TEMP(?:ORARY)?\b
    | \bpg_(?:try_)?advisory_lock
    | \bset_config\s*\(
    """,
    re.IGNORECASE | re.VERBOSE,
)

#: What :func:`changes_session` looks for, as the README lists it.
SESSION_CHANGES = (
    "SET (not SET LOCAL / SET CONSTRAINTS / SET TRANSACTION), including SET ROLE and "
    "SET SESSION AUTHORIZATION",
    "RESET",
    "set_config(...)",
    "LISTEN",
    "PREPARE",
    "LOAD",
    "DECLARE ... WITH HOLD, and QuerySet.iterator() cursors left open",
    "CREATE TEMP/TEMPORARY ..., SELECT ... INTO TEMP",
    "pg_advisory_lock / pg_try_advisory_lock (session-level advisory locks)",
)

#: One statement that resets a session: CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL,
#: DEALLOCATE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD PLANS/TEMP/SEQUENCES.
RESET_SQL = "DISCARD ALL"


def changes_session(query: Any) -> bool:
    """True when ``query`` may leave state in the session that outlives its transaction."""
    if isinstance(query, str):
        text = query
    elif isinstance(query, (bytes, bytearray, memoryview)):
        text = bytes(query).decode("utf-8", "replace")
    else:
        # psycopg.sql.Composable: render it without a connection.
        try:
            text = query.as_string(None)
        except Exception:
            return True
    return _SESSION_STATEMENT.search(text) is not None


def quote_option(value: str) -> str:
    r"""Escape a value for libpq's ``options`` (``-c name=value``): spaces and ``\`` need ``\``."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def startup_options(existing: str | None, settings: dict[str, str]) -> str:
    """``existing`` libpq options with ``-c name=value`` for each setting appended."""
    parts = [existing] if existing else []
    parts += [f"-c {name}={quote_option(value)}" for name, value in settings.items()]
    return " ".join(parts)
