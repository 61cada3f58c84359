"""Tests of the patch VQ image tokenizer on the real digits."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from mol_tune.data.digits import load_captioned_digits
from mol_tune.data.image_vq import PatchVQTokenizer


@pytest.fixture(scope="module")
def digits():
    return load_captioned_digits(seed=0)


@pytest.fixture(scope="module")
def tokenizer(digits):
    return PatchVQTokenizer(num_codes=128, patch_size=2, image_size=8, seed=0).fit(digits["train"].images)


def naive_encode(images, codebook, patch_size):
    """Nearest codebook row of each patch, by plain loops over patches and codes."""
    side = images.shape[-1] // patch_size
    codes = np.zeros((len(images), side * side), dtype=np.int64)
    for n, image in enumerate(images):
        for row in range(side):
            for col in range(side):
                patch = image[row * patch_size : (row + 1) * patch_size, col * patch_size : (col + 1) * patch_size]
                distances = [np.sum((patch.reshape(-1) - code) ** 2) for code in codebook]
                codes[n, row * side + col] = int(np.argmin(distances))
    return codes


def test_codebook_shape_and_dtype(tokenizer):
    assert tokenizer.codebook.shape == (128, 4)
    assert tokenizer.codebook.dtype == torch.float32
    assert tokenizer.codebook_dim == 4
    assert tokenizer.num_patches == 16


def test_codes_in_range(tokenizer, digits):
    codes = tokenizer.encode(digits["validation"].images)
    assert codes.shape == (len(digits["validation"]), 16)
    assert np.issubdtype(codes.dtype, np.integer)
    assert codes.min() >= 0
    assert codes.max() < 128


def test_reconstruction_beats_mean_image(tokenizer, digits):
    validation = digits["validation"].images
    reconstructed = tokenizer.decode(tokenizer.encode(validation))
    vq_error = np.mean((reconstructed - validation) ** 2)
    mean_image = digits["train"].images.mean(axis=0)
    baseline_error = np.mean((mean_image[None] - validation) ** 2)
    assert reconstructed.shape == validation.shape
    assert vq_error < 0.1 * baseline_error


def test_encode_matches_naive_nearest_code(tokenizer, digits):
    images = digits["validation"].images[:12]
    expected = naive_encode(images, tokenizer.codebook.numpy(), patch_size=2)
    np.testing.assert_array_equal(tokenizer.encode(images), expected)


def test_decode_places_patches_row_major(tokenizer):
    codes = np.arange(16).reshape(1, 16)
    image = tokenizer.decode(codes)[0]
    codebook = tokenizer.codebook.numpy()
    for row in range(4):
        for col in range(4):
            patch = image[2 * row : 2 * row + 2, 2 * col : 2 * col + 2]
            np.testing.assert_array_equal(patch.reshape(-1), codebook[row * 4 + col])


def test_decode_rejects_code_out_of_range(tokenizer):
    with pytest.raises(ValueError, match="128 codes"):
        tokenizer.decode(np.full((1, 16), 128))


def test_patch_size_configurable(digits):
    tokenizer = PatchVQTokenizer(num_codes=32, patch_size=4, image_size=8).fit(digits["train"].images)
    codes = tokenizer.encode(digits["validation"].images)
    assert tokenizer.codebook.shape == (32, 16)
    assert codes.shape == (len(digits["validation"]), 4)
    assert codes.max() < 32


def test_save_load_round_trip(tokenizer, digits, tmp_path):
    tokenizer.save(str(tmp_path))
    loaded = PatchVQTokenizer.load(str(tmp_path))
    expected_fingerprint = hashlib.sha256(tokenizer.codebook.numpy().astype("<f4").tobytes()).hexdigest()
    with open(tmp_path / "config.json") as file:
        config = json.load(file)
    assert config["fingerprint"] == expected_fingerprint
    assert config["patch_size"] == 2
    assert config["image_size"] == 8
    assert loaded.fingerprint == expected_fingerprint
    torch.testing.assert_close(loaded.codebook, tokenizer.codebook, rtol=0, atol=0)
    images = digits["validation"].images
    np.testing.assert_array_equal(loaded.encode(images), tokenizer.encode(images))


def test_load_rejects_fingerprint_mismatch(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path))
    config_path = os.path.join(tmp_path, "config.json")
    with open(config_path) as file:
        config = json.load(file)
    config["fingerprint"] = "0" * 64
    with open(config_path, "w") as file:
        json.dump(config, file)
    with pytest.raises(ValueError, match="fingerprint"):
        PatchVQTokenizer.load(str(tmp_path))


def test_invalid_patch_size():
    with pytest.raises(ValueError, match="patch_size"):
        PatchVQTokenizer(patch_size=3, image_size=8)


def test_codebook_before_fit_raises():
    with pytest.raises(RuntimeError, match="fit"):
        PatchVQTokenizer().codebook
