"""What a deployed run may point a worker at: only the stores and source directories that worker serves.

Whoever can reach the API can start a deployment's run with any parameters; without this, the run
form's ``store`` would let them read and write wherever the worker's credentials reach (or hand the
worker a store they control), ``mnist_source`` any directory on the worker, and ``force_promote``
would put any model in production. The worker's own settings decide instead:

* ``MNIST_STORE`` and ``MNIST_ALLOWED_STORES`` (comma-separated) name the stores it serves;
* ``MNIST_SOURCE`` and ``MNIST_ALLOWED_SOURCES`` the directories a run may read MNIST from;
* ``MNIST_ALLOW_FORCE_PROMOTE=1`` lets deployed runs overrule the gate;
* ``MNIST_ALLOW_LOOSER_RULES=1`` lets deployed runs set gate, ingest and retention rules looser than the defaults (without
  it a run may only tighten them: a lower accuracy floor or a larger leaked share would let through what
  force-promote was kept from).

These are read from the worker's own environment: ``flows/stack/worker.py`` starts every run in it, whatever the
run's job variables say. Nothing here opens a store or a file before the allow-list said yes.

A person at their own terminal (``make run``, ``mnist-pipeline run``) is trusted: none of this applies
to a run that is not a deployment's.
"""

from __future__ import annotations

import os

import fsspec

from flows.night.params import PipelineParameters
from storage import STORE_ENV
from storage.credentials import CredentialsInUrl, has_credentials, split_credentials
from storage.store import DEFAULT_STORE
from tasks.champion.gate import GateRules
from tasks.data.fetch import SOURCE_ENV
from tasks.intake.checks import IngestRules
from tasks.publish.retention_rules import RetentionRules

ALLOWED_STORES_ENV = "MNIST_ALLOWED_STORES"
ALLOWED_SOURCES_ENV = "MNIST_ALLOWED_SOURCES"
FORCE_PROMOTE_ENV = "MNIST_ALLOW_FORCE_PROMOTE"
LOOSER_RULES_ENV = "MNIST_ALLOW_LOOSER_RULES"

# Every parameter of PipelineParameters is classified here, and tests/test_confinement.py fails on one that is not
# (recursively: a new field, or a new group of fields, cannot be forgotten).
# Which way each rule loosens: a deployed run may move a rule the other way only.
LOOSER_WHEN_LOWER = {
    "gate": {"min_balanced_accuracy"},
    "retention": {"keep_reports"},  # fewer reports kept: a run could erase the store's history of reports
    # a smaller holdout share: the new-data slice grows slower, and never decides if the share is tiny
    "ingest": {"drift_p", "min_batch_images", "holdout_share"},
}
LOOSER_WHEN_HIGHER = {
    "retention": {"prune"},  # pruning is the default; turning it off keeps more, which any run may
    "gate": {"max_regression", "max_digit_drop", "min_digit_images", "min_new_data_images"},
    "ingest": {
        "max_leaked_share",
        "max_label_shift",
        "max_image_drift",
        "max_disagreement_excess",
        "confident_probability",
        "max_excess_disagreements",
        "disagreement_tolerance",
        "max_files_per_night",
        "max_images_per_night",
        "accept_unjudged_labels",
    },
}
NOT_A_RULE = {
    "gate": {"force_promote"},
    "ingest": set(),
    "retention": set(),
}  # force_promote has its own setting (FORCE_PROMOTE_ENV)
RULE_GROUPS = {"gate": GateRules, "ingest": IngestRules, "retention": RetentionRules}
# What to train and what to report: the gate judges whatever they make, on images none of them chooses
PLAIN_SETTINGS = {
    "model",
    "epochs",
    "batch_size",
    "n_per_class",
    "seed",
    "new_seed",
    "train_limit",
    "max_training_images",
    "precision",
    "backend",
    "held_back",
    "refresh",
}
ALLOW_LISTED = {"store", "mnist_source"}  # confined to what the worker serves (served_stores, served_sources)


def classification(path: str) -> str | None:
    """How a deployed run's parameter ``path`` (``gate.max_regression``) is confined: ``lower is looser``,
    ``higher is looser``, ``not a rule`` (a rule group's own setting), ``plain setting``, ``allow-listed`` or
    ``rule group``; None for a parameter nobody classified."""
    group, _, name = path.partition(".")
    if not name:
        if group in RULE_GROUPS:
            return "rule group"
        return "plain setting" if group in PLAIN_SETTINGS else "allow-listed" if group in ALLOW_LISTED else None
    if group not in RULE_GROUPS or "." in name:
        return None
    kinds = [
        kind
        for kind, names in (
            ("lower is looser", LOOSER_WHEN_LOWER),
            ("higher is looser", LOOSER_WHEN_HIGHER),
            ("not a rule", NOT_A_RULE),
        )
        if name in names[group]
    ]
    return kinds[0] if len(kinds) == 1 else None


class NotServed(PermissionError):
    """A deployed run names something its worker does not serve: the message names the parameter and the setting."""


def _listed(*names: str) -> list[str]:
    return [item.strip() for name in names for item in os.environ.get(name, "").split(",") if item.strip()]


def served_stores() -> set[str]:
    """The stores this worker serves, spelled as ``_canonical`` does (local ones as real absolute paths)."""
    return {_canonical(url) for url in [os.environ.get(STORE_ENV) or DEFAULT_STORE, *_listed(ALLOWED_STORES_ENV)]}


def served_sources() -> set[str]:
    return {os.path.realpath(path) for path in _listed(SOURCE_ENV, ALLOWED_SOURCES_ENV)}


def _canonical(url: str) -> str:
    """A store URL as compared with the allow-list, from its text alone: no filesystem is made, so an ``ftp://``,
    ``http://`` or ``reference://`` URL is never connected to or read before it is found to be served."""
    try:
        url = split_credentials(url)[0]
    except CredentialsInUrl:
        return url
    protocol, path = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        return os.path.realpath(os.path.abspath(path))
    return url.rstrip("/")


def looser_rules(params: PipelineParameters) -> list[str]:
    """The gate and ingest rules ``params`` sets looser than their defaults, as ``group.field=value (default d)``."""
    found = []
    for group, group_type in RULE_GROUPS.items():
        rules, defaults = getattr(params, group), group_type()
        for name in type(rules).model_fields:
            value, default = getattr(rules, name), getattr(defaults, name)
            if (name in LOOSER_WHEN_LOWER[group] and value < default) or (name in LOOSER_WHEN_HIGHER[group] and value > default):
                found.append(f"{group}.{name}={value} (default {default})")
    return found


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
            "worker to allow it, or promote by hand (`mnist-pipeline champion promote RUN_ID --reason TEXT`; "
            "`mnist-pipeline runs list` lists run ids), which needs write access to the store."
        )
    if (looser := looser_rules(params)) and os.environ.get(LOOSER_RULES_ENV, "").lower() not in ("1", "true", "yes"):
        raise NotServed(
            f"Parameters {', '.join(looser)} loosen the rules this worker enforces for deployed runs: a run may "
            f"tighten them, not relax them. Set {LOOSER_RULES_ENV}=1 on the worker to allow it, or run it at your own "
            "terminal (`mnist-pipeline run`)."
        )
    return params.model_copy(update=resolved)
