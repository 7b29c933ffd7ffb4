"""Cross-run caching keyed on content, not on run ids.

Prefect's ``DEFAULT`` policy includes the flow-run id, so it never hits across runs. Here each
heavy step's key is a digest of what determines its output (pinned checksums; dataset digest,
training parameters and code version; model digest and evaluation parameters). The cached value
is a small reference to files in the store; before a hit is served, the policy checks that those
files are still there and intact, and drops the stale record otherwise, so the step runs again
instead of handing out a reference to missing bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from storage import Store
from tasks.evaluate import evaluation_key, stored_evaluation
from tasks.fetch import MNIST_FILES, dataset_digest, stored_dataset
from tasks.plots import plots_key, stored_plots
from tasks.train import stored_model, training_key

KeyFn = Callable[[dict[str, Any]], str]
IntactFn = Callable[[Store, str], bool]


@dataclass
class StoredArtifactPolicy(CachePolicy):
    """Key = step name + content digest of the inputs; a hit only if the stored artifact is intact."""

    step: str = ""
    content_key: KeyFn | None = None
    intact: IntactFn | None = None

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str:
        assert self.content_key is not None and self.intact is not None
        store = Store(inputs["store_url"])
        content = self.content_key(inputs)
        record = f"{self.step}-{content}"
        if not self.intact(store, content):
            store.remove(store.result_record(record))
        return record


def fetch_key(inputs: dict[str, Any]) -> str:
    return dataset_digest(MNIST_FILES)[:32]


def train_key(inputs: dict[str, Any]) -> str:
    return training_key(inputs["dataset"], inputs["config"])


def evaluate_key(inputs: dict[str, Any]) -> str:
    return evaluation_key(inputs["model"], inputs["n_per_class"], inputs["seed"])


def plot_key(inputs: dict[str, Any]) -> str:
    return plots_key(inputs["model"], inputs["evaluation"])


FETCH = StoredArtifactPolicy(step="fetch", content_key=fetch_key, intact=lambda store, _: stored_dataset(store) is not None)
TRAIN = StoredArtifactPolicy(step="train", content_key=train_key, intact=lambda store, key: stored_model(store, key) is not None)
EVALUATE = StoredArtifactPolicy(
    step="evaluate", content_key=evaluate_key, intact=lambda store, key: stored_evaluation(store, key) is not None
)
PLOT = StoredArtifactPolicy(step="plot", content_key=plot_key, intact=lambda store, key: stored_plots(store, key) is not None)
