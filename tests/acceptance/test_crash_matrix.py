"""Crash matrix: SIGKILL `puller pull` at seeded random moments, then converge.

Each trial: a tenant on the loopback server, a fresh store, 2-4 kills at random moments
(some while an acknowledgement to commit_url is in flight, some with parallel_pages asking
for later pages ahead, some after the tenant updated records, odd seeds with the pages
fetched in a fetch process, `pull --fetch-process`), then runs to completion
and a fresh sweep; the store must equal the source record by record: nothing lost,
nothing doubled, the newest version everywhere, the checkpoint reset. CI runs a fixed
seeded subset; `scripts/test --full` runs every trial.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from puller.tenant_server import TenantServer, timestamp
from tests.acceptance.test_cli import (
    _checkpoint_page,
    assert_store_equals_source,
    kill_pull_after,
    puller,
    runs,
    stored,
    write_config,
)
from tests.conftest import add_dataset

FULL = os.environ.get("PULLER_TEST_FULL") == "1"
TRIALS_PER_STORE = 26 if FULL else 4  # per store, split over page and cursor mode
MATRIX = [
    pytest.param(backend, mode, seed, id=f"{backend}-{mode}-seed{seed}")
    for backend in ("sqlite", "postgres")
    for mode in ("page", "cursor")
    for seed in range(TRIALS_PER_STORE // 2)
]


@pytest.mark.crash_matrix
@pytest.mark.parametrize(("store_url", "mode", "seed"), MATRIX, indirect=["store_url"])
def test_sigkill_at_random_moments_then_converge(tenant_server: TenantServer, tenant_id: str,
                                                 tmp_path: Path, store_url: str, mode: str,
                                                 seed: int) -> None:
    """Whatever moment the kills hit, the store converges to the source exactly."""
    chance = random.Random(f"{mode}-{seed}")
    data = add_dataset(tenant_server, tenant_id, customers=chance.randint(60, 160),
                       invalid_every=chance.choice([0, 7, 11]))
    data.page_delay_s = 0.02
    with_ack = seed % 3 == 0
    if with_ack:
        data.ack_delay_s = 0.05
    callback: dict[str, object] = {"page_size": chance.choice([5, 10, 20]), "pagination": mode}
    if with_ack:
        callback["commit_url"] = f"{tenant_server.url}/{tenant_id}/commit"
    elif mode == "page" and seed % 3 == 1:  # kills while later pages are asked ahead
        callback["parallel_pages"] = 3
    config = write_config(tmp_path, tenant_server, tenant_id, store_url=store_url,
                          scopes={"customer": callback})
    options = ["--fetch-process"] if seed % 2 else []
    mutated = False
    for _ in range(chance.randint(2, 4)):
        kill_pull_after(config, chance.uniform(0.0, 1.0), server=tenant_server,
                        tenant=tenant_id, options=options)
        if chance.random() < 0.3:  # the tenant updates records between attempts
            for person in chance.sample(data.records["customer"], 3):
                person["last_modified_date"] = timestamp(100_000 + chance.randint(0, 999))
                person["first_name"] = f"Renée {chance.randint(0, 999)}"
            mutated = True
    data.page_delay_s = data.ack_delay_s = 0.0
    finish = puller("pull", "--config", str(config), *options)
    assert finish.returncode == 0, finish.stdout + finish.stderr
    # A sweep that resumed mid-way has not re-read the pages before its checkpoint, so
    # updates made there show after one fresh sweep; that sweep changes nothing otherwise.
    again = puller("pull", "--config", str(config), *options)
    assert again.returncode == 0, again.stdout + again.stderr
    assert_store_equals_source(store_url, tenant_id, data, "customer")
    assert _checkpoint_page(store_url, tenant_id) == 1, "a finished sweep resets"
    history = runs(store_url, tenant_id)
    assert {r["status"] for r in history} <= {"succeeded", "abandoned"}
    if not mutated:
        # Each stored record was accepted exactly once over all runs: a page applied twice
        # would have counted its records twice (a re-read of a committed page is stale).
        accepted = sum(r["accepted"] for r in history)
        assert accepted == len(stored(store_url, "customer", tenant_id))
