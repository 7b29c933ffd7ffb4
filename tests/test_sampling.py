"""The balanced evaluation sampler and the stratified training subset."""

import numpy as np
import pytest

from tasks.evaluation.evaluate import stratified_sample
from tasks.training.input_pipeline import stratified_subset


@pytest.fixture
def labels():
    rng = np.random.default_rng(1)
    counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the MNIST test set's digit counts
    return rng.permutation(np.repeat(np.arange(10), counts)).astype(np.uint8)


def test_exactly_n_of_every_digit_without_duplicates(labels):
    sample = stratified_sample(labels, 800, seed=0)
    assert len(sample) == 8000
    assert len(np.unique(sample)) == 8000
    np.testing.assert_array_equal(np.bincount(labels[sample], minlength=10), [800] * 10)


def test_same_seed_same_sample_other_seed_other_sample(labels):
    np.testing.assert_array_equal(stratified_sample(labels, 50, 3), stratified_sample(labels, 50, 3))
    assert not np.array_equal(stratified_sample(labels, 50, 3), stratified_sample(labels, 50, 4))


def test_the_rarest_digit_bounds_n(labels):
    assert len(stratified_sample(labels, 892, 0)) == 8920
    with pytest.raises(ValueError, match=r"digit 5 has only 892 test images\. Choose n_per_class between 1 and 892"):
        stratified_sample(labels, 893, 0)
    with pytest.raises(ValueError, match="at least 1"):
        stratified_sample(labels, 0, 0)


def test_training_subset_keeps_class_proportions(labels):
    subset = stratified_subset(labels, 1000, seed=0)
    assert len(subset) == 1000 and len(np.unique(subset)) == 1000
    counts = np.bincount(labels[subset], minlength=10)
    expected = np.bincount(labels, minlength=10) * 1000 / len(labels)
    assert np.all(np.abs(counts - expected) <= 1)


def test_training_subset_without_limit_is_everything(labels):
    np.testing.assert_array_equal(stratified_subset(labels, None, 0), np.arange(len(labels)))
    with pytest.raises(ValueError, match="cannot hold every digit"):
        stratified_subset(labels, 5, 0)
