"""Signals other code can listen to. All are sent with ``sender`` the ENGINE's DatabaseWrapper
class and ``alias``; one that has no receivers is not sent at all (a list check).

* ``connection_borrowed(alias, connection, wait)``: ``wait`` is the seconds spent waiting.
* ``connection_returned(alias, connection, held, rolled_back)``: ``held`` seconds.
* ``leak_reported(alias, held, stack, thread, view)``: ``stack`` is a formatted string.
* ``pool_exhausted(alias, error)``: a :class:`~django_pooled_pg.errors.PoolError` is raised.
* ``connection_reclaimed(alias, thread)``: a thread ended holding a connection; it went back.
"""

from django.dispatch import Signal

connection_borrowed = Signal()
connection_returned = Signal()
leak_reported = Signal()
pool_exhausted = Signal()
connection_reclaimed = Signal()
