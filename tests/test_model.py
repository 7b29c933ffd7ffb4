"""The seed network, exactly as the seed notebook has it."""

import pytest

from tasks.model import ModelName, build_model, build_seed_model


def test_seed_network_layers_are_exactly_the_seed():
    model = build_seed_model()
    layers = [(type(layer).__name__, layer.get_config()) for layer in model.layers]
    assert [name for name, _ in layers] == [
        "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dropout", "Dense",
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
