"""Tests of the captioned digits data set and its train/validation split."""

import numpy as np
from sklearn.datasets import load_digits

from mol_tune.data.digits import DIGIT_NAMES, load_captioned_digits


def test_split_covers_all_images_once():
    splits = load_captioned_digits(seed=0)
    train, validation = splits["train"].sample_ids, splits["validation"].sample_ids
    assert len(set(train) & set(validation)) == 0
    assert sorted(np.concatenate([train, validation]).tolist()) == list(range(1797))


def test_split_is_stratified():
    labels = load_digits().target
    validation = load_captioned_digits(seed=0, validation_fraction=0.1)["validation"]
    assert abs(len(validation) - 180) <= 1
    for label in range(10):
        expected = 0.1 * np.sum(labels == label)
        assert abs(np.sum(validation.labels == label) - expected) <= 1


def test_split_matches_sklearn_images():
    digits = load_digits()
    for split in load_captioned_digits(seed=0).values():
        np.testing.assert_allclose(split.images * 16.0, digits.images[split.sample_ids], atol=1e-5)
        np.testing.assert_array_equal(split.labels, digits.target[split.sample_ids])
        assert split.images.min() >= 0.0
        assert split.images.max() <= 1.0


def test_captions_name_the_digit():
    for split in load_captioned_digits(seed=0).values():
        for label, caption in zip(split.labels, split.captions):
            words = caption.replace(",", " ").split()
            assert DIGIT_NAMES[label] in words
            assert [name for name in DIGIT_NAMES if name in words] == [DIGIT_NAMES[label]]


def test_captions_vary_in_phrasing():
    captions = load_captioned_digits(seed=0)["train"].captions
    sevens = {c for c in captions if "seven" in c.split()}
    assert len(sevens) >= 3


def test_seed_reproducible_and_changes_split():
    first = load_captioned_digits(seed=3)
    second = load_captioned_digits(seed=3)
    other = load_captioned_digits(seed=4)
    np.testing.assert_array_equal(first["validation"].sample_ids, second["validation"].sample_ids)
    assert first["train"].captions == second["train"].captions
    assert not np.array_equal(first["validation"].sample_ids, other["validation"].sample_ids)
