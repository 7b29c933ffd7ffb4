"""Which Keras backend trains, and where: the same model code on TensorFlow, JAX or PyTorch.

Keras fixes its backend when it is first imported, from ``KERAS_BACKEND`` (else ``keras.json`` under
``KERAS_HOME``, else TensorFlow). A run that asks for another backend than its process has trains in a
child process started with that ``KERAS_BACKEND`` (``tasks/training/backend_child.py``): the same ``tasks.training.train``
code, its log lines and epochs relayed to the caller as JSON lines on stdout, the model's reference last.
Evaluation and the champion gate stay in the caller: a ``.keras`` file loads on every backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path

BACKEND_ENV = "KERAS_BACKEND"
MESSAGE = "@mnist-train "  # prefixes the child's protocol lines; anything else on stdout is passed through


class Backend(str, Enum):
    """The Keras backends a run may train on, as the Prefect UI offers them."""

    tensorflow = "tensorflow"
    jax = "jax"
    torch = "torch"


def process_backend() -> Backend:
    """The backend Keras uses (or will use) in this process, found the way Keras finds it."""
    name = os.environ.get(BACKEND_ENV)
    if not name:
        config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
        try:
            name = json.loads(config.read_text()).get("backend")
        except (OSError, ValueError, AttributeError):
            name = None
    name = name or Backend.tensorflow.value
    try:
        return Backend(name)
    except ValueError:
        choices = ", ".join(b.value for b in Backend)
        raise ValueError(f"{BACKEND_ENV}={name!r} is not a backend this pipeline trains on; choose one of {choices}") from None


STOP_GRACE = 5.0  # seconds a training child has to end on SIGTERM before it is killed


def _stop(child: subprocess.Popen) -> None:
    """End the training child now: SIGTERM (Python's default: it ends at once), SIGKILL after ``STOP_GRACE``."""
    child.terminate()
    try:
        child.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        child.kill()


def run_in_backend(
    backend: Backend, arguments: dict, log: Callable[[str], None], on_epoch: Callable[[int, int, dict], None] | None
) -> dict:
    """Train in a child process on ``backend``; returns the child's result (a ``ModelRef`` as a dict).

    The child inherits this process's environment, so the store's credentials travel with it (fsspec's
    ``FSSPEC_*`` variables, ``storage.credentials``); its arguments go on standard input, not on its command line.
    """
    env = {**os.environ, BACKEND_ENV: backend.value}
    command = [sys.executable, "-m", "tasks.training.backend_child"]
    result: dict | None = None
    with subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        try:
            child.stdin.write(json.dumps(arguments) + "\n")
            child.stdin.close()
            for line in child.stdout:
                if not line.startswith(MESSAGE):
                    print(line, end="")  # the child's own prints (a library's warning, say): not ours to drop
                    continue
                message = json.loads(line[len(MESSAGE) :])
                if "log" in message:
                    log(message["log"])
                elif "epoch" in message and on_epoch is not None:
                    on_epoch(*message["epoch"])
                elif "result" in message:
                    result = message["result"]
        except BaseException:
            # A stop (SIGTERM turned into Prefect's TerminationSignal), the step's timeout or an error here: the
            # training ends with the night. Leaving the block would otherwise wait for the child to finish.
            _stop(child)
            raise
    if child.returncode != 0 or result is None:
        raise RuntimeError(
            f"training on the {backend.value} backend failed in its process (exit status {child.returncode}); "
            f"its error is printed above. Is {backend.value} installed (pip install -e '.[{backend.value}]')?"
        )
    return result
