"""The queueing arithmetic pool sizes rest on: Little's law, Erlang's B and C formulas, and the
sizes they give. Shared by ``poolstats --advise`` (:mod:`..telemetry.advice`) and
``max_size="auto"`` (:mod:`.autosize`)."""

from __future__ import annotations

import math
from collections.abc import Callable

#: Headroom over the p99 of measured concurrency.
HEADROOM = 1.25
#: The probability of waiting an advised size keeps under, by the Erlang C model.
TARGET_WAIT = 0.01


def littles_law(rate: float, hold: float) -> float:
    """Connections in use on average = arrivals per second x seconds each holds one. True of any
    stable system whatever the distributions, which is why it checks the measured mean."""
    return rate * hold


def erlang_b(servers: int, load: float) -> float:
    """Erlang's blocking probability for ``load`` erlangs on ``servers``, by the recurrence
    B(k) = a B(k-1) / (k + a B(k-1)), which stays finite where the factorials would not."""
    b = 1.0
    for k in range(1, servers + 1):
        b = load * b / (k + load * b)
    return b


def erlang_c(servers: int, load: float) -> float:
    """The probability that a borrower must wait, in an M/M/c queue of ``servers`` connections
    offered ``load`` erlangs (arrival rate x mean hold): Poisson arrivals, exponential holds,
    nobody gives up. Real holds vary less than exponential ones, so this errs on the safe side;
    1.0 when the load is at or above the size (the queue grows without end)."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    b = erlang_b(servers, load)
    return servers * b / (servers - load * (1 - b))


def fewest(load: float, model: Callable[[int, float], float], target: float) -> int:
    """The fewest connections above ``load`` at which ``model(servers, load)`` is at most
    ``target`` (it falls as servers are added)."""
    servers = max(1, math.floor(load) + 1)
    while model(servers, load) > target:
        servers += 1
    return servers


def size_for_wait(load: float, target: float = TARGET_WAIT) -> int:
    """The fewest connections whose Erlang C waiting probability is at most ``target``."""
    return fewest(load, erlang_c, target)


def wait_share(servers: int, load: float) -> float:
    """The mean wait over the mean hold, in the M/M/c queue of :func:`erlang_c`: C / (c - a),
    since a borrower that must wait waits a mean hold over (c - a) on average. Infinite at or
    above the size."""
    if load >= servers:
        return math.inf
    return erlang_c(servers, load) / (servers - load)


def size_for_wait_share(load: float, share: float) -> int:
    """The fewest connections at which borrowers wait at most ``share`` of the mean hold on
    average, by the M/M/c model (:func:`wait_share`)."""
    return fewest(load, wait_share, share)


def size_for_concurrency(p99: float, headroom: float = HEADROOM) -> int:
    """Connections covering the p99 of measured concurrency with ``headroom``: the measured
    distribution already holds the bursts the model smooths over."""
    return max(1, math.ceil(p99 * headroom - 1e-9))
