"""Session state: what a borrower can leave behind on a connection, and how it is cleared.

A pooled connection outlives the code that borrowed it, so anything that lives in the database
*session* rather than in a transaction would leak to the next borrower: ``SET`` and ``SET ROLE``,
``set_config()``, ``WITH HOLD`` cursors, temporary tables, session advisory locks, ``LISTEN``,
``PREPARE``, whether a statement says so or a function, a ``DO`` block or a comment hides it.

So the reset does not read SQL. Every borrowed connection is reset (:func:`reset_statement`),
sent as it goes back (:mod:`.reset`: nobody waits for its answer):

* The settings the pool applies to every connection (time zone, ``assume_role``) travel in the
  connection's startup packet (libpq ``options``), so they are the session's *defaults*:
  ``DISCARD ALL`` (which includes ``RESET ALL``) brings them back instead of wiping them.
* What ``connection_created`` receivers and the ``configure`` option set on a new session is its
  *baseline*, read once when the session is set up (:data:`BASELINE_QUERY`) and set again by the
  same statement that resets the rest: ``DISCARD ALL``'s steps one by one (it may not run in a
  multi-statement string) and a ``set_config()`` per baseline setting.
* Every borrowed connection is reset when it goes back, a borrow that ran nothing included
  (``DatabaseWrapper._borrowed`` marks it used): no path around the reset is left.

With ``release="transaction"`` a statement whose command tag says it changed the session
(:data:`PINNING_TAGS`: ``SET``, ``LISTEN``, ``PREPARE``, ``CREATE TABLE``...) keeps the
connection for the rest of the request; a tag is read in constant time, whatever the length of
the statement. Session state made inside a ``SELECT`` (``set_config()``, ``pg_advisory_lock()``,
a function) has no such tag: it lasts while the thread keeps the connection, and never reaches
another borrower, who resets a connection it takes from a parked borrower first.
"""

from __future__ import annotations

from collections.abc import Iterable

#: One statement that resets a session: CLOSE ALL, SET SESSION AUTHORIZATION DEFAULT, RESET ALL,
#: DEALLOCATE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD PLANS/TEMP/SEQUENCES.
RESET_SQL = "DISCARD ALL"

#: DISCARD ALL's steps, as its documentation lists them, for a string with more statements after
#: it (DISCARD ALL itself cannot run inside the implicit transaction of a multi-statement query).
DISCARD_ALL_STEPS = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; DEALLOCATE ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD PLANS; DISCARD TEMP; DISCARD SEQUENCES"
)

#: The settings a session's set-up made with SET or set_config(): its baseline.
BASELINE_QUERY = "SELECT name, setting FROM pg_settings WHERE source = 'session' ORDER BY name"

#: Command tags of statements that change the session and so pin the connection with
#: release="transaction" (the docs list them; base.SessionTrackingMixin reads them). SET LOCAL
#: has the tag SET too: it pins until the request ends, harmlessly. CREATE TABLE / VIEW / SEQUENCE may make a
#: temporary one; the tag does not say, so they all pin, harmlessly.
PINNING_TAGS = frozenset(
    {
        b"SET",
        b"RESET",
        b"LISTEN",
        b"UNLISTEN",
        b"PREPARE",
        b"DEALLOCATE",
        b"LOAD",
        b"DO",
        b"DECLARE CURSOR",
        b"CREATE TABLE",
        b"CREATE VIEW",
        b"CREATE SEQUENCE",
    }
)


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def reset_statement(baseline: Iterable[tuple[str, str]] = ()) -> str:
    """The statement that brings a session back to its defaults and ``baseline``."""
    settings = list(baseline)
    if not settings:
        return RESET_SQL
    again = "; ".join(f"SELECT set_config({_quote(name)}, {_quote(value)}, false)" for name, value in settings)
    return f"{DISCARD_ALL_STEPS}; {again}"


def quote_option(value: str) -> str:
    r"""Escape a value for libpq's ``options`` (``-c name=value``): spaces and ``\`` need ``\``."""
    return value.replace("\\", "\\\\").replace(" ", "\\ ")


def startup_options(existing: str | None, settings: dict[str, str]) -> str:
    """``existing`` libpq options with ``-c name=value`` for each setting appended."""
    parts = [existing] if existing else []
    parts += [f"-c {name}={quote_option(value)}" for name, value in settings.items()]
    return " ".join(parts)
