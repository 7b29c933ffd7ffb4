"""Cross-run caching keyed on content, not on run ids.

Prefect's ``DEFAULT`` policy includes the flow-run id, so it never hits across runs. Here each
heavy step's key is a digest of what determines its output: its inputs' content and the code it
runs (``tasks.*_key``, built with ``storage.code_digest``). The cached value is a small reference
to files in the store, so before a step is called, a record whose files are missing or altered is
forgotten (``forget_stale_record``) and the step runs again instead of handing out a reference to
missing bytes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from flows.night.locks import open_store
from flows.night.results import UntrustedRecord, check_record
from storage import SIDECAR_LIMIT, code_digest
from tasks.data.batch_format import AcceptedBatch, BatchPart
from tasks.data.fetch import DatasetRef, StoredFile, dataset_key, stored_dataset
from tasks.evaluation.evaluate import EvaluationRef, SliceEvaluation, evaluation_key, stored_evaluation
from tasks.evaluation.plots import PlotsRef, plots_key, stored_plots
from tasks.training.model import ModelRef
from tasks.training.train import trained_model, training_key


@dataclass
class StoredArtifactPolicy(CachePolicy):
    """Key = step name + ``key(*inputs)``, in the manner of Prefect's ``Inputs(...)`` but on content.

    ``inputs`` names the task parameters the key reads, in order; ``lookup(store, content_key)``
    returns the stored artifact if it is intact, else None (``lookup_inputs`` names task parameters it also takes,
    after the key: what the artifact must have been made for); ``returns`` are the reference classes the
    cached value is made of: a change to their fields makes old records miss, instead of handing
    back an object of the old shape. Every task using it takes ``store_url``.
    """

    step: str = ""
    key: Callable[..., str] = field(default=lambda: "")
    inputs: tuple[str, ...] = ()
    lookup: Callable[..., Any] = field(default=lambda store, key: None)
    lookup_inputs: tuple[str, ...] = ()
    returns: tuple[type, ...] = ()

    def content_key(self, inputs: dict[str, Any]) -> str:
        return self.key(*(inputs[name] for name in self.inputs))

    def record_key(self, inputs: dict[str, Any]) -> str:
        return f"{self.step}-{self.content_key(inputs)}-{code_digest(*self.returns)[:8]}"

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        return self.record_key(inputs)

    def forget_stale_record(self, inputs: dict[str, Any], warn: Callable[[str], None] | None = None) -> bool:
        """Drop the cached record if it is not one we write (``flows.night.results.check_record``: it is
        never deserialized), if it names another artifact than the store holds under its key, or if
        that artifact is gone or altered; True if it was dropped. ``warn`` hears why, once."""
        store = open_store(inputs["store_url"], warn=warn)
        record = store.result_record(self.record_key(inputs))
        stored = self.lookup(store, self.content_key(inputs), *(inputs[name] for name in self.lookup_inputs))
        if stored is None:
            store.remove(record)
            return True
        if not store.exists(record):
            return False
        try:
            cached = check_record(store.read_bytes(record, limit=SIDECAR_LIMIT + 1))
            if not same_artifact(cached, stored):
                raise UntrustedRecord("it names other files than the checked reference in the store")
        except Exception as exc:  # noqa: BLE001 (whatever is wrong with it, a record must not stop the night)
            store.warn(
                f"Ignoring the cache record {store.location(record)} of step {self.step}: {exc}; the step runs and rewrites it"
            )
            store.remove(record)
            return True
        return False


def same_artifact(cached: Any, stored: Any) -> bool:
    """A record's reference and the one checked in the store name the same files (where the download
    came from is the only field allowed to differ)."""
    return type(cached) is type(stored) and cached.model_dump(exclude={"sources"}) == stored.model_dump(exclude={"sources"})


FETCH = StoredArtifactPolicy(
    step="fetch",
    key=dataset_key,
    lookup=lambda store, _key: stored_dataset(store),
    returns=(DatasetRef, StoredFile, AcceptedBatch, BatchPart),
)
TRAIN = StoredArtifactPolicy(
    step="train",
    key=training_key,
    inputs=("dataset", "config"),
    lookup=trained_model,
    lookup_inputs=("config",),
    returns=(ModelRef,),
)
EVALUATE = StoredArtifactPolicy(
    step="evaluate",
    key=evaluation_key,
    inputs=("dataset", "model", "n_per_class", "seed"),
    lookup=stored_evaluation,
    returns=(EvaluationRef, SliceEvaluation),
)
PLOT = StoredArtifactPolicy(step="plot", key=plots_key, inputs=("model", "evaluation"), lookup=stored_plots, returns=(PlotsRef,))


def call_cached(step, *args: Any, result_storage, refresh: bool = False, warn: Callable[[str], None] | None = None):
    """Call a cached step (returning its state): stale or untrusted records are forgotten first,
    ``refresh`` recomputes."""
    inputs = inspect.signature(step.fn).bind(*args).arguments
    step.cache_policy.forget_stale_record(inputs, warn=warn)
    return step.with_options(result_storage=result_storage, refresh_cache=refresh or None)(*args, return_state=True)
