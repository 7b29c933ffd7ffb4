"""One writer per artifact across machines: a Prefect global concurrency limit of one slot per artifact.

The server enforces it for every worker that talks to it, whatever machine the worker is on, and a
slot is leased, so a worker that dies mid-training frees it when its lease runs out. Local stores
keep their flock (``storage.Store.lock``); this is what ``flows/night/steps.py`` gives a remote store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import MissingContextError, ObjectAlreadyExists
from prefect.logging import get_run_logger
from prefect.settings import get_current_settings

from storage import Store

PREFIX = "mnist-artifact-"
LEASE_SECONDS = 120  # renewed while the holder lives; a dead holder's slot comes back this long after


def server_in_use() -> bool:
    return bool(get_current_settings().api.url)


@contextlib.contextmanager
def artifact_lock(name: str) -> Iterator[None]:
    """Hold the one slot of the limit named after the artifact, creating the limit on first use."""
    limit = f"{PREFIX}{name}"[:120]
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit, limit=1))
        except ObjectAlreadyExists:
            pass
    with concurrency(limit, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        yield


def open_store(url: str | None = None, warn: Callable[[str], None] | None = None) -> Store:
    """The one way flows/ opens a store (steps, the cache policy, the CLI): ``url``, else ``$MNIST_STORE``,
    else ``./artifacts``; a remote one is locked through the server when there is one, and a damaged
    file it meets is reported to ``warn``, else to the run's log."""
    if warn is None:
        try:
            warn = get_run_logger().warning
        except MissingContextError:
            warn = None
    return Store.resolve(url, distributed_lock=artifact_lock if server_in_use() else None, warn=warn)
