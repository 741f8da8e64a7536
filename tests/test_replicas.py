"""Several aliases: a primary and a read replica behind a database router, each with its own
pool, statistics and connections."""

from __future__ import annotations

import pytest
from django.db import connections
from django.test import Client
from django.test.utils import override_settings

from django_pooled_pg.pooling.ledger import ledger
from django_pooled_pg.pooling.registry import registry
from tests.app.models import Item
from tests.conftest import held_borrows

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


@override_settings(DATABASE_ROUTERS=["tests.app.routers.PrimaryReplicaRouter"])
def test_router_sends_reads_and_writes_to_their_own_pools():
    for wrapper in connections.all():
        wrapper.close()
    reads, writes = ledger.stats_for("replica").borrows, ledger.stats_for("default").borrows
    Item.objects.create(name="written to the primary")
    assert Item.objects.count() == 1  # read from the replica (the same test database)
    assert ledger.stats_for("replica").borrows == reads + 1
    assert ledger.stats_for("default").borrows == writes + 1
    primary, replica = registry.get("default"), registry.get("replica")
    assert primary is not None and replica is not None and primary is not replica
    assert replica.alias == "replica" and connections["replica"].pool is replica
    # The middleware gives back every alias a request used (and leaves alone what the code
    # around the request held: give those back first).
    for wrapper in connections.all():
        wrapper.close()
    assert Client().get("/query/").json() == {"count": 1}
    assert connections["default"].connection is None and connections["replica"].connection is None
    assert not held_borrows()
