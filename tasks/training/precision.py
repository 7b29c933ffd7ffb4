"""Where training runs and in which dtype policy: the GPU with mixed precision when the backend sees one, else
the CPU (bfloat16 where it computes it natively). Part of the training key whole (``tasks.training.train.training_code``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import Enum
from pathlib import Path

from tasks.training.backends import Backend
from tasks.training.keras_runtime import import_keras


class Precision(str, Enum):
    """Keras dtype policies a run may ask for; ``auto`` lets ``select_device`` choose."""

    auto = "auto"
    float32 = "float32"
    mixed_bfloat16 = "mixed_bfloat16"
    mixed_float16 = "mixed_float16"


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: where bfloat16 matmuls and convolutions run natively on the CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def has_gpu(backend: Backend) -> bool:
    """Whether ``backend`` sees a GPU in this process (each backend asks its own runtime)."""
    if backend is Backend.jax:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend is Backend.torch:
        import torch

        return torch.cuda.is_available()
    import_keras()  # TensorFlow's start-up lines filtered on first use
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def select_device(precision: Precision | str = Precision.auto, backend: Backend = Backend.tensorflow) -> tuple[str, str]:
    """(device, Keras dtype policy): the GPU with mixed precision when the backend sees one, else the CPU.

    ``auto`` on a GPU: mixed float16 on TensorFlow (its loss scaling is built in), mixed bfloat16 on JAX
    and PyTorch (Ampere and later compute it at float16's rate, without loss scaling). On a CPU,
    TensorFlow uses mixed bfloat16 where the CPU computes it natively; JAX and PyTorch use float32.
    """
    precision = Precision(precision).value
    gpu = has_gpu(backend)
    device = "GPU:0" if gpu else "CPU:0"
    if precision == "mixed_float16" and not gpu:
        raise ValueError(
            "precision mixed_float16 was asked for, but this worker trains on its CPU, which has no fast float16 path "
            "(measured 36 times slower than float32, past the train step's budget): use auto, float32 or "
            "mixed_bfloat16 on a CPU worker, or run on a GPU worker"
        )
    if precision != "auto":
        return device, precision
    if gpu:
        return device, "mixed_float16" if backend is Backend.tensorflow else "mixed_bfloat16"
    return device, "mixed_bfloat16" if backend is Backend.tensorflow and cpu_has_bf16() else "float32"


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    keras = import_keras()

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)
