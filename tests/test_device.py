"""Device and precision selection, exercised on a CPU-only machine (the GPU branch with a stand-in device list)."""

import pytest
import tensorflow as tf

from tasks.training import precision
from tasks.training.backends import Backend
from tasks.training.model import build_model


def test_cpu_uses_bf16_only_where_the_cpu_has_it(monkeypatch):
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.select_device("auto") == ("CPU:0", "mixed_bfloat16")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.select_device("auto") == ("CPU:0", "float32")


def test_a_visible_gpu_is_chosen_with_mixed_float16(monkeypatch):
    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake_gpu] if kind == "GPU" else [])
    assert precision.select_device("auto") == ("GPU:0", "mixed_float16")
    assert precision.select_device("float32") == ("GPU:0", "float32")


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_softmax_output_stays_float32_under_any_policy(policy):
    with precision.dtype_policy(policy):
        model = build_model("seed")
    assert model.layers[-1].dtype_policy.compute_dtype == "float32"
    assert model.layers[0].dtype_policy.compute_dtype == ("bfloat16" if policy == "mixed_bfloat16" else "float32")


@pytest.mark.parametrize("backend", [Backend.jax, Backend.torch], ids=lambda b: b.value)
def test_jax_and_torch_use_bf16_on_a_gpu_and_float32_on_a_cpu(monkeypatch, backend):
    monkeypatch.setattr(precision, "has_gpu", lambda b: True)
    assert precision.select_device("auto", backend) == ("GPU:0", "mixed_bfloat16")
    assert precision.select_device("mixed_float16", backend) == ("GPU:0", "mixed_float16")
    monkeypatch.setattr(precision, "has_gpu", lambda b: False)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.select_device("auto", backend) == ("CPU:0", "float32")


def runtime_sees_a_gpu(backend: Backend) -> bool:
    """What each runtime itself reports, asked directly (true on a GPU runner, false here)."""
    if backend is Backend.jax:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    if backend is Backend.torch:
        import torch

        return torch.cuda.is_available()
    return bool(tf.config.list_physical_devices("GPU"))


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
def test_each_backend_asks_its_own_runtime_for_a_gpu(backend, monkeypatch):
    assert precision.has_gpu(backend) is runtime_sees_a_gpu(backend)  # on a GPU runner as on this CPU
    if backend is Backend.tensorflow:  # and it follows the runtime's answer, whichever it is
        fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [fake_gpu] if kind == "GPU" else [])
        assert precision.has_gpu(backend) is True
    elif backend is Backend.torch:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert precision.has_gpu(backend) is True
