"""Cache keys name the code each step runs, and only that code: edits are made to a copy of this
repository's real source, and the keys are computed there in a fresh interpreter."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage import code_digest

# conftest.SHARED_WORKER runs this module on one xdist worker: its module fixtures are made once

REPO = Path(__file__).resolve().parent.parent

KEYS = textwrap.dedent(
    """
    import json, sys

    def keys_of(tree):
        # this tree's flows/, tasks/ and storage/, imported afresh: third-party modules (TensorFlow) stay loaded
        for name in [m for m in sys.modules if m.split(".")[0] in ("flows", "tasks", "storage")]:
            del sys.modules[name]
        sys.path[0] = tree
        from flows.night import caching
        from tasks.evaluation.evaluate import EvaluationRef
        from tasks.data.fetch import DatasetRef
        from tasks.training.model import ModelRef
        from tasks.training.train import TrainConfig

        dataset = DatasetRef(sha256="d" * 64, files={}, sources=["store"])
        model = ModelRef(key="k", path="m", sha256="a" * 64, history_path="h", network="seed", device="CPU:0",
                         precision="float32", epochs=1, resumed_from_epoch=0, train_images=10, train_seconds=1.0,
                         val_accuracy=0.5)
        evaluation = EvaluationRef(key="e", path="p", model_sha256="a" * 64, dataset_sha256="d" * 64,
                                   predictions_sha256="p" * 64, test_path="t", test_predictions_sha256="t" * 64,
                                   n_per_class=5, seed=0, n_evaluated=50, test_images=100, test_accuracy=0.5,
                                   balanced_accuracy=0.5,
                                   slices=[{"name": "mnist-selection", "predictions_key": "s",
                                            "predictions_sha256": "s" * 64, "images": 10, "accuracy": 0.5,
                                            "balanced_accuracy": 0.5}])
        ours = [m for name, m in sys.modules.items() if name.split(".")[0] in ("flows", "tasks", "storage")]
        stray = [m.__file__ for m in ours if getattr(m, "__file__", None) and not m.__file__.startswith(tree + "/")]
        assert not stray, stray  # every module of ours came from this tree
        return {
            "train": caching.TRAIN.content_key({"dataset": dataset, "config": TrainConfig()}),
            "evaluate": caching.EVALUATE.content_key({"dataset": dataset, "model": model, "n_per_class": 5, "seed": 0}),
            "plot": caching.PLOT.content_key({"model": model, "evaluation": evaluation}),
        }

    print(json.dumps({tree: keys_of(tree) for tree in sys.argv[1:]}))
    """
)


def keys_of(*trees: Path) -> dict[Path, dict[str, str]]:
    """The keys each tree's code gives, in one fresh interpreter (one TensorFlow import for every tree)."""
    done = subprocess.run(
        [sys.executable, "-c", KEYS, *map(str, trees)], cwd=trees[0], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {Path(tree): keys for tree, keys in json.loads(done.stdout).items()}


def copy_repo(target: Path) -> Path:
    for package in ("flows", "tasks", "storage"):
        shutil.copytree(REPO / package, target / package, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def edit(tree: Path, module: str, pattern: str, replacement: str) -> None:
    path = tree / module
    source = path.read_text()
    edited, count = re.subn(pattern, replacement, source, count=1, flags=re.MULTILINE)
    assert count == 1, f"{pattern!r} not found in {module}"
    path.write_text(edited)


# (what is edited, the steps whose keys must change)
EDITS = {
    "the body of stratified_sample": (
        "tasks/evaluation/evaluate.py",
        r"^(def stratified_sample\(.*\n(?:    .*\n)*?)(    rng = )",
        r"\1    n_per_class = int(n_per_class)\n\2",
        {"evaluate"},
    ),
    "the body of per_class_frame": (
        "tasks/evaluation/metrics.py",
        r"^(def per_class_frame\(.*\n(?:.*\n)*?)(    correct = )",
        r"\1    cm = np.asarray(cm)\n\2",
        {"plot"},
    ),
    "the report's wording": (
        "tasks/publish/report.py",
        r"## Random evaluated images",
        "## A random handful of evaluated images",
        set(),
    ),
    "a comment and a docstring in the training loop": (
        "tasks/training/loop.py",
        r"^(def train_and_store\((?:.*\n)*?.*-> ModelRef:\n)",
        r'\1    """Edited docstring."""  # and a comment\n',
        set(),
    ),
    "a new helper in the input pipeline, listed nowhere": (
        "tasks/training/input_pipeline.py",
        r"^VALIDATION_SPLIT = 0\.1$",
        "VALIDATION_SPLIT = 0.1\n\n\ndef _unlisted_helper(images):\n    return images[::-1]",
        {"train"},
    ),
    "a new helper in the training loop, listed nowhere": (
        "tasks/training/loop.py",
        r"^HISTORY_COLUMNS = ",
        "def _unlisted_helper(rows):\n    return rows\n\n\nHISTORY_COLUMNS = ",
        {"train"},
    ),
    "the optimizer": (
        "tasks/training/model.py",
        r"return keras\.optimizers\.Adam\(learning_rate=base, use_ema=True, ema_momentum=ema\)",
        "return keras.optimizers.Adam(learning_rate=base, use_ema=True, ema_momentum=ema, epsilon=1e-6)",
        {"train"},
    ),
    "a plot's code": (
        "tasks/evaluation/plots.py",
        r'ax\.set_xlabel\("predicted digit"\)',
        'ax.set_xlabel("predicted")',
        {"plot"},
    ),
    "the selection split (no night trains on it, the gate decides on it)": (
        "tasks/data/splits.py",
        r"^SELECTION_PER_DIGIT = 500",
        "SELECTION_PER_DIGIT = 400",
        {"train", "evaluate"},
    ),
    "how the evaluation's predictions are made": (
        "tasks/evaluation/evaluate.py",
        r"^PREDICT_BATCH = 1024",
        "PREDICT_BATCH = 512",
        {"evaluate"},
    ),
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """The keys of the original source and of each edited copy: {"original" or the edit's name: {step: key}}."""
    trees = {"original": copy_repo(tmp_path_factory.mktemp("original"))}
    for i, (what, (module, pattern, replacement, _)) in enumerate(EDITS.items()):
        trees[what] = copy_repo(tmp_path_factory.mktemp(f"edit-{i}"))
        edit(trees[what], module, pattern, replacement)
    found = keys_of(*trees.values())
    return {what: found[tree] for what, tree in trees.items()}


@pytest.mark.parametrize("what", list(EDITS))
def test_an_edit_changes_exactly_the_keys_of_the_steps_that_run_it(what, keys):
    expected = EDITS[what][3]
    changed = {step for step, key in keys[what].items() if key != keys["original"][step]}
    assert changed == expected


def test_code_digest_hashes_syntax_not_text_nor_place(tmp_path):
    def load(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        namespace: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        import linecache

        linecache.checkcache(str(path))
        return namespace["f"]

    base = load("a", "def f(x):\n    return x + 1\n")
    commented = load("b", 'def f(x):\n    """Adds one."""\n    # the successor\n    return (x + 1)\n')
    moved = load("c", "import os\n\n\ndef f(x):\n    return x + 1\n")
    changed = load("d", "def f(x):\n    return x + 2\n")
    assert code_digest(base) == code_digest(commented) == code_digest(moved)
    assert code_digest(base) != code_digest(changed)
    assert code_digest(base, 128) != code_digest(base, 256)  # values a step depends on count too


def test_a_module_keeps_its_key_when_tasks_moves_into_stage_folders(tmp_path):
    """Keys name the code as tasks/ was laid out before its stage folders, so a store's models stay reused."""
    import importlib.util

    def module(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        spec = importlib.util.spec_from_file_location(name, path)
        loaded = importlib.util.module_from_spec(spec)
        loaded.__loader__.get_source = lambda _name, path=path: path.read_text()  # no import is run
        return loaded

    flat = module(
        "flat",
        """
        import sys
        from storage import Store
        from tasks import model as networks
        from tasks.backends import Backend
        from tasks.training_loop import train_and_store
        COMMAND = [sys.executable, "-m", "tasks.batch_format"]
        """,
    )
    staged = module(  # the same module after the move, its imports re-sorted by ruff
        "staged",
        """
        import sys
        from storage import Store
        from tasks.training import model as networks
        from tasks.training.loop import train_and_store
        from tasks.training.backends import Backend
        COMMAND = [sys.executable, "-m", "tasks.data.batch_format"]
        """,
    )
    other = module(  # a module that really imports something else is other code
        "other",
        """
        import sys
        from storage import Store
        from tasks.training import model as networks
        from tasks.training.loop import train_and_store
        from tasks.training.backends import process_backend
        COMMAND = [sys.executable, "-m", "tasks.data.batch_format"]
        """,
    )
    assert code_digest(flat) == code_digest(staged)
    assert code_digest(staged) != code_digest(other)
