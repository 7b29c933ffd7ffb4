"""Importing Keras (and TensorFlow under it) without the start-up lines a newcomer reads as failures.

TensorFlow's C++ side logs before absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot
silence it: "All log messages before absl::InitializeLog()", the oneDNN banner, "Could not find cuda
drivers" and, on a machine without an NVIDIA driver, "failed call to cuInit". The import (and the
first device query, where cuInit happens) runs with the process's stderr captured at the file
descriptor; every captured line that is not one of those is written back, so a real problem is still
shown. On a machine with an NVIDIA driver, a failed cuInit is a real problem and is shown.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tasks.training.backends import Backend, process_backend

BENIGN = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} .* port\.cc:\d+\] oneDNN custom operations are on"),
    re.compile(r"^I\d{4} .* cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"),
)
NO_DRIVER_ONLY = re.compile(r"^E\d{4} .* cuda_platform\.cc:\d+\] failed call to cuInit")
RETRACING = "triggered tf.function retracing"  # predicting several models in one process: expected, not a fault

_imported = False


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def is_benign(line: str, driver: bool) -> bool:
    return any(p.search(line) for p in BENIGN) or (not driver and bool(NO_DRIVER_ONLY.search(line)))


@contextlib.contextmanager
def filtered_stderr(driver: bool) -> Iterator[None]:
    """Capture file descriptor 2 for the block, then write back every line that is not benign."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines() if not is_benign(line, driver)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


class _DropRetracing(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return RETRACING not in record.getMessage()


def import_keras():
    """``keras``, imported once per process with TensorFlow's benign start-up lines filtered out.

    On the JAX or PyTorch backend TensorFlow is imported only where it is installed (Keras seeds its
    generator too, and prints the same lines then); a GPU machine without it is fine.
    """
    global _imported
    if not _imported:
        on_tensorflow = process_backend() is Backend.tensorflow
        with filtered_stderr(nvidia_driver_present()):
            if on_tensorflow or importlib.util.find_spec("tensorflow") is not None:
                import tensorflow as tf

                if on_tensorflow:
                    tf.config.list_physical_devices("GPU")  # cuInit runs here, inside the filter
                tf.get_logger().addFilter(_DropRetracing())
            import keras  # noqa: F401
        _imported = True
    import keras

    return keras
