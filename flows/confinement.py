"""What a deployed run may point a worker at: only the stores and source directories that worker serves.

Whoever can reach the API can start a deployment's run with any parameters; without this, the run
form's ``store`` would let them read and write wherever the worker's credentials reach (or hand the
worker a store they control), ``mnist_source`` any directory on the worker, and ``force_promote``
would put any model in production. The worker's own settings decide instead:

* ``MNIST_STORE`` and ``MNIST_ALLOWED_STORES`` (comma-separated) name the stores it serves;
* ``MNIST_SOURCE`` and ``MNIST_ALLOWED_SOURCES`` the directories a run may read MNIST from;
* ``MNIST_ALLOW_FORCE_PROMOTE=1`` lets deployed runs overrule the gate.

A person at their own terminal (``make run``, ``mnist-pipeline run``) is trusted: none of this applies
to a run that is not a deployment's.
"""

from __future__ import annotations

import os

from flows.params import PipelineParameters
from storage import STORE_ENV, Store
from storage.credentials import has_credentials
from tasks.data.fetch import SOURCE_ENV

ALLOWED_STORES_ENV = "MNIST_ALLOWED_STORES"
ALLOWED_SOURCES_ENV = "MNIST_ALLOWED_SOURCES"
FORCE_PROMOTE_ENV = "MNIST_ALLOW_FORCE_PROMOTE"


class NotServed(PermissionError):
    """A deployed run names something its worker does not serve: the message names the parameter and the setting."""


def _listed(*names: str) -> list[str]:
    return [item.strip() for name in names for item in os.environ.get(name, "").split(",") if item.strip()]


def served_stores() -> set[str]:
    """The stores this worker serves, as ``Store.url`` spells them (local ones as real absolute paths)."""
    return {_canonical(url) for url in [Store.resolve().url, *_listed(ALLOWED_STORES_ENV)]}


def served_sources() -> set[str]:
    return {os.path.realpath(path) for path in _listed(SOURCE_ENV, ALLOWED_SOURCES_ENV)}


def _canonical(url: str) -> str:
    store = Store(url)
    return os.path.realpath(store.url) if store.is_local else store.url


def check_deployed_run(params: PipelineParameters) -> PipelineParameters:
    """Refuse, before any work and any write, a deployed run that names what its worker does not serve; return
    the parameters with the store and source resolved as checked (a symbolic link swapped later cannot move them)."""
    if params.store and has_credentials(params.store):
        raise NotServed(
            "Parameter store carries a user or password: a deployed run may not bring credentials (they would replace "
            f"the worker's own, and Prefect keeps run parameters in its database). Put them in the worker's settings "
            f"(${STORE_ENV}, or the filesystem's own, such as AWS_ACCESS_KEY_ID) and name the store without them."
        )
    resolved = {}
    if params.store:
        wanted = _canonical(params.store)
        served = served_stores()
        resolved["store"] = wanted
        if wanted not in served:
            raise NotServed(
                f"Parameter store={params.store!r} is not a store this worker serves ({', '.join(sorted(served))}). "
                f"A deployed run may use only the stores in the worker's ${STORE_ENV} and ${ALLOWED_STORES_ENV} "
                f"(comma-separated): add it there and restart the worker, or leave store empty."
            )
    if params.mnist_source:
        resolved["mnist_source"] = os.path.realpath(params.mnist_source)
    if params.mnist_source and resolved["mnist_source"] not in served_sources():
        raise NotServed(
            f"Parameter mnist_source={params.mnist_source!r} is not a source directory this worker serves. "
            f"A deployed run may read only the directories in the worker's ${SOURCE_ENV} and ${ALLOWED_SOURCES_ENV} "
            f"(comma-separated): add it there and restart the worker, or leave mnist_source empty."
        )
    if params.gate.force_promote and os.environ.get(FORCE_PROMOTE_ENV, "").lower() not in ("1", "true", "yes"):
        raise NotServed(
            f"Parameter gate.force_promote is refused for deployed runs on this worker: set {FORCE_PROMOTE_ENV}=1 on the "
            "worker to allow it, or promote by hand (`mnist-pipeline promote RUN_ID`), which needs write access to the store."
        )
    return params.model_copy(update=resolved)
