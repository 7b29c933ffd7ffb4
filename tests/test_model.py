"""The seed network, exactly as the seed notebook has it."""

import pytest

from tasks.training.model import ModelName, build_model, build_seed_model


def test_seed_network_layers_are_exactly_the_seed():
    model = build_seed_model()
    layers = [(type(layer).__name__, layer.get_config()) for layer in model.layers]
    assert [name for name, _ in layers] == [
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dropout",
        "Dense",
    ]
    conv1, pool1, conv2, pool2, _, dropout, dense = (cfg for _, cfg in layers)
    assert (conv1["filters"], tuple(conv1["kernel_size"]), conv1["activation"]) == (32, (3, 3), "relu")
    assert (conv2["filters"], tuple(conv2["kernel_size"]), conv2["activation"]) == (64, (3, 3), "relu")
    assert tuple(pool1["pool_size"]) == (2, 2) and tuple(pool2["pool_size"]) == (2, 2)
    assert dropout["rate"] == 0.3
    assert (dense["units"], dense["activation"]) == (10, "softmax")
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 10)
    # 320 + 18 496 + 16 010: the seed's parameter count
    assert model.count_params() == 34_826


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="model .resnet. is unknown; choose one of: seed, strong"):
        build_model("resnet")
    assert build_model(ModelName.seed).name == "seed_cnn"


def test_strong_model_is_an_option_beside_the_seed():
    import keras

    from tasks.training.model import build_strong_model, make_optimizer

    model = build_strong_model()
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[:3] == ["RandomRotation", "RandomTranslation", "RandomZoom"]  # augmentation: training only
    assert kinds.count("BatchNormalization") == 5 and kinds.count("Conv2D") == 4
    assert model.output_shape == (None, 10) and model.layers[-1].get_config()["activation"] == "softmax"
    seed_opt = make_optimizer("seed", 1e-3, 100)
    assert float(seed_opt.learning_rate) == pytest.approx(1e-3) and seed_opt.use_ema  # constant rate, averaged weights
    assert seed_opt.ema_momentum == pytest.approx(0.95)  # 100 steps: averages the last few, not the start
    assert make_optimizer("seed", 1e-3, 15 * 422).ema_momentum == pytest.approx(0.999)  # a full default run
    strong_opt = make_optimizer("strong", 1e-3, 1000)
    schedule = strong_opt._learning_rate
    assert isinstance(schedule, keras.optimizers.schedules.CosineDecay) and strong_opt.use_ema
    assert float(schedule(50)) == pytest.approx(2e-3, rel=0.05) and float(schedule(999)) < 1e-4


def _moved(images, down: int, right: int):
    """``images`` moved by whole pixels with NumPy, zeros coming in: what the wrapper's layers must compute."""
    import numpy as np

    moved = np.zeros_like(images)
    h, w = images.shape[1:3]
    rows_from, rows_to = slice(max(-down, 0), h - max(down, 0)), slice(max(down, 0), h - max(-down, 0))
    cols_from, cols_to = slice(max(-right, 0), w - max(right, 0)), slice(max(right, 0), w - max(-right, 0))
    moved[:, rows_to, cols_to] = images[:, rows_from, cols_from]
    return moved


def test_the_strong_model_is_saved_as_the_mean_over_its_shifted_views(tmp_path):
    """Test-time augmentation lives inside the .keras file: a loader (with safe_mode on) gets one model whose
    probabilities are the mean of the trained network's over SERVING_SHIFTS, built from Keras' own layers."""
    import keras
    import numpy as np

    from tasks.training.model import SERVING_SHIFTS, build_seed_model, build_strong_model, for_serving

    network = build_strong_model()
    served = for_serving("strong", network)
    served.save(tmp_path / "strong.keras")
    loaded = keras.models.load_model(tmp_path / "strong.keras", compile=False, safe_mode=True)
    assert {type(layer).__name__ for layer in loaded.layers} == {
        "InputLayer",
        "ZeroPadding2D",
        "Cropping2D",
        "Sequential",
        "Average",
    }
    images = np.random.default_rng(0).random((6, 28, 28, 1)).astype("float32")
    images[:, :2] = images[:, -2:] = images[:, :, :2] = images[:, :, -2:] = 0  # a border, as MNIST digits have
    shifts = SERVING_SHIFTS[ModelName.strong]
    assert len(shifts) == len(set(shifts)) > 1 and (0, 0) in shifts
    expected = np.mean([network.predict(_moved(images, *shift), verbose=0) for shift in shifts], axis=0)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)
    assert not np.allclose(expected, network.predict(images, verbose=0), atol=1e-6)  # the views do change the answer
    seed = build_seed_model()
    assert for_serving("seed", seed) is seed  # the user's network is saved exactly as trained


@pytest.mark.slow
def test_strong_model_trains_and_records_its_name(mnist_store):
    from tasks.data.fetch import fetch_mnist
    from tasks.training.model import SERVING_SHIFTS
    from tasks.training.rebuilt import load_model
    from tasks.training.train import TrainConfig, train_model

    dataset = fetch_mnist(mnist_store, sources=[], log=lambda _: None)
    ref = train_model(mnist_store, dataset, TrainConfig(model="strong", epochs=1, train_limit=1000), log=lambda _: None)
    assert ref.network == "strong" and ref.epochs == 1 and 0.0 <= ref.val_accuracy <= 1.0
    served = load_model(mnist_store, ref)  # what the gate and the evaluation predict with
    assert served.name == f"strong_cnn_over_{len(SERVING_SHIFTS[ModelName.strong])}_views"
    assert served.get_layer("strong_cnn").count_params() == served.count_params()  # one network, shared by the views


def test_the_seed_trains_on_sparse_labels_and_strong_on_smoothed_one_hot_labels():
    import numpy as np

    from tasks.training.model import loss_and_targets

    labels = np.array([3, 0, 9])
    loss, targets = loss_and_targets(ModelName.seed, labels)
    assert loss == "sparse_categorical_crossentropy" and targets is labels
    loss, targets = loss_and_targets(ModelName.strong, labels)
    assert loss.get_config()["label_smoothing"] == 0.1
    assert targets.shape == (3, 10) and targets.argmax(axis=1).tolist() == [3, 0, 9] and targets.sum() == 3


@pytest.mark.slow
def test_the_same_seed_on_the_same_machine_trains_the_same_model(mnist_store):
    """Determinism the docs promise (docs/concepts.md): two trainings of one key, the second not reusing the
    first, give the same weights bit for bit. Across machines oneDNN's kernels may differ; not promised."""
    import numpy as np

    from tasks.data.fetch import fetch_mnist
    from tasks.training.rebuilt import load_model
    from tasks.training.train import TrainConfig, train_model

    dataset = fetch_mnist(mnist_store, sources=[], log=lambda _: None)
    config = TrainConfig(epochs=2, train_limit=1500, seed=11)
    first = train_model(mnist_store, dataset, config, log=lambda _: None)
    again = train_model(mnist_store, dataset, config, log=lambda _: None, reuse=False)
    assert again.file_key != first.file_key  # trained again, not reused
    weights = [load_model(mnist_store, ref).get_weights() for ref in (first, again)]
    assert all(np.array_equal(a, b) for a, b in zip(*weights)) and len(weights[0]) == 6
    other = train_model(mnist_store, dataset, config.model_copy(update={"seed": 12}), log=lambda _: None)
    assert not np.array_equal(load_model(mnist_store, other).get_weights()[0], weights[0][0])


@pytest.mark.parametrize("name", list(ModelName))
def test_a_backup_of_each_network_is_within_what_a_checkpoint_may_declare(name, tmp_path):
    """``PARAMETERS`` is each network's parameter count as built, and what Keras' backup of it (weights, Adam's
    moments, the moving average) declares passes the checkpoint's walk, within ``VALUES_LIMIT``, which derives from
    the largest; a planted file declaring more is refused before a value is read (tests/test_untrusted_store.py)."""
    import h5py

    from tasks.training.checkpoints import VALUES_LIMIT
    from tasks.training.model import PARAMETERS, make_optimizer
    from tasks.training.weight_file import plain_datasets

    model = build_model(name)
    assert model.count_params() == PARAMETERS[name]
    model.compile(optimizer=make_optimizer(name, 1e-3, 100), loss="sparse_categorical_crossentropy")
    model.optimizer.build(model.trainable_variables)
    model.save_weights(tmp_path / "latest.weights.h5")  # what BackupAndRestore writes
    with h5py.File(tmp_path / "latest.weights.h5", "r") as f:
        declared = sum(d.size * d.dtype.itemsize for d in plain_datasets(f, VALUES_LIMIT).values())
    assert 4 * 4 * PARAMETERS[name] * 0.99 <= declared <= VALUES_LIMIT // 2
