"""IDX parsing: good files decode, wrong files are refused with the file's name and the problem."""

import struct

import numpy as np
import pytest

from tasks.data import idx


def test_round_trip_images_and_labels():
    images = np.random.default_rng(0).integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 3, 4, 5, 9], dtype=np.uint8)
    np.testing.assert_array_equal(idx.parse_images(idx.encode_idx(images), "img"), images)
    np.testing.assert_array_equal(idx.parse_labels(idx.encode_idx(labels), "lbl"), labels)


def test_header_is_the_canonical_mnist_header():
    data = idx.encode_idx(np.zeros((2, 28, 28), np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03"
    assert struct.unpack(">3I", data[4:16]) == (2, 28, 28)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: b"\x1f\x8b" + d[2:], "magic number"),
        (lambda d: d[:2] + b"\x0d" + d[3:], "not an unsigned-byte IDX file"),
        (lambda d: d[:-5], "truncated"),
        (lambda d: d + b"\x00", "trailing data"),
        (lambda d: d[:4] + struct.pack(">I", 3) + d[8:], "header declares shape (3, 28, 28)"),
        (lambda d: d[:3], "too short"),
    ],
)
def test_corrupt_image_files_are_refused_with_the_file_name(mutate, message):
    good = idx.encode_idx(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(idx.IDXFormatError, match="train-images-idx3-ubyte") as info:
        idx.parse_images(mutate(good), "train-images-idx3-ubyte")
    assert message in str(info.value)


def test_labels_file_given_as_images_is_refused():
    labels = idx.encode_idx(np.zeros(10, np.uint8))
    with pytest.raises(idx.IDXFormatError, match="says 1 dimensions, expected 3"):
        idx.parse_images(labels, "t10k-images-idx3-ubyte")


def test_wrong_image_dimensions_are_refused():
    with pytest.raises(idx.IDXFormatError, match="32x32, expected 28x28"):
        idx.parse_images(idx.encode_idx(np.zeros((2, 32, 32), np.uint8)), "x")


def test_label_outside_0_to_9_is_refused():
    with pytest.raises(idx.IDXFormatError, match="label 12 is not a digit"):
        idx.parse_labels(idx.encode_idx(np.array([1, 12], np.uint8)), "y")


def test_labels_paired_with_the_wrong_images_are_refused():
    images = np.zeros((5, 28, 28), np.uint8)
    labels = np.zeros(4, np.uint8)
    with pytest.raises(idx.IDXFormatError, match="4 labels but train-images-idx3-ubyte holds 5 images"):
        idx.pair(images, labels, "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
