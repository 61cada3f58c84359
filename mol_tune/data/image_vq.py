"""A patch vector-quantisation (VQ) image tokenizer: images to discrete codes and back.

An image of ``image_size x image_size`` pixels is cut into non-overlapping square patches of
``patch_size x patch_size`` pixels, read in row-major order. Each patch, flattened row-major, is
replaced by the index of its nearest codebook vector (squared Euclidean distance). The codebook is
fitted with k-means over the patches of the training images, so ``codebook_dim`` equals
``patch_size ** 2``.

On disk, a tokenizer folder contains ``codebook.safetensors`` (one float32 tensor named ``codebook``)
and ``config.json`` (patch size, image size, code count, codebook dimension and fingerprint).
"""

import hashlib
import json
import os
from typing import Optional, Union

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans

CODEBOOK_FILE = "codebook.safetensors"
CONFIG_FILE = "config.json"


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """Return the sha256 hex digest of a codebook's float32 bytes in row-major order."""
    array = np.ascontiguousarray(codebook.detach().cpu().to(torch.float32).numpy())
    return hashlib.sha256(array.astype("<f4").tobytes()).hexdigest()


class PatchVQTokenizer:
    """Vector-quantise square image patches against a k-means codebook.

    Args:
        num_codes (int): codebook size. Default: 128.
        patch_size (int): side of a square patch in pixels. Default: 2.
        image_size (int): side of the square images in pixels, a multiple of ``patch_size``. Default: 8.
        seed (int): seed of k-means. Default: 0.

    Raises:
        ValueError: if a size is not positive or ``image_size`` is not a multiple of ``patch_size``.
    """

    def __init__(self, num_codes: int = 128, patch_size: int = 2, image_size: int = 8, seed: int = 0):
        if num_codes <= 0 or patch_size <= 0 or image_size <= 0:
            raise ValueError(
                f"Invalid tokenizer sizes: num_codes={num_codes}, patch_size={patch_size}, "
                f"image_size={image_size}. All must be positive."
            )
        if image_size % patch_size:
            raise ValueError(
                f"Invalid patch_size: {patch_size}. It must divide image_size={image_size} so patches tile the image."
            )
        self.num_codes = num_codes
        self.patch_size = patch_size
        self.image_size = image_size
        self.seed = seed
        self._codebook: Optional[torch.Tensor] = None

    @property
    def codebook_dim(self) -> int:
        return self.patch_size**2

    @property
    def num_patches(self) -> int:
        """Codes per image."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def codebook(self) -> torch.Tensor:
        """float32 tensor [num_codes, codebook_dim]. Row ``c`` is the patch that code ``c`` decodes to.

        Raises:
            RuntimeError: if the tokenizer has not been fitted or loaded.
        """
        if self._codebook is None:
            raise RuntimeError("The PatchVQTokenizer has no codebook yet. Call fit(images) or PatchVQTokenizer.load(dir).")
        return self._codebook

    @property
    def fingerprint(self) -> str:
        """sha256 of the codebook, as ``codebook_fingerprint`` computes it."""
        return codebook_fingerprint(self.codebook)

    def _to_patches(self, images: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size)
        if images.ndim != 3 or images.shape[1:] != expected:
            raise ValueError(
                f"Invalid images shape: {images.shape}. Expected [n, {self.image_size}, {self.image_size}]."
            )
        n, side, p = len(images), self.image_size // self.patch_size, self.patch_size
        # [n, row, y, col, x] -> [n, row, col, y, x]: patches in row-major order, pixels row-major inside.
        patches = images.reshape(n, side, p, side, p).transpose(0, 1, 3, 2, 4)
        return patches.reshape(n, side * side, p * p)

    def fit(self, images: Union[np.ndarray, torch.Tensor]) -> "PatchVQTokenizer":
        """Fit the codebook with k-means over all patches of ``images``.

        Args:
            images (Union[np.ndarray, torch.Tensor]): [n, image_size, image_size].

        Returns:
            PatchVQTokenizer: ``self``.

        Raises:
            ValueError: if the images have fewer distinct patches than ``num_codes``.
        """
        patches = self._to_patches(images).reshape(-1, self.codebook_dim)
        distinct = len(np.unique(patches, axis=0))
        if distinct < self.num_codes:
            raise ValueError(
                f"Invalid num_codes: {self.num_codes}. The images have only {distinct} distinct patches. "
                "Use fewer codes or more images."
            )
        kmeans = KMeans(n_clusters=self.num_codes, n_init=1, random_state=self.seed).fit(patches)
        self._codebook = torch.from_numpy(kmeans.cluster_centers_.astype(np.float32))
        return self

    def encode(self, images: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Map images to codes.

        Args:
            images (Union[np.ndarray, torch.Tensor]): [n, image_size, image_size].

        Returns:
            np.ndarray: int64 codes [n, num_patches], each in ``[0, num_codes)``.
        """
        patches = self._to_patches(images)
        codebook = self.codebook.numpy()
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and the first term is the same for every code.
        scores = patches @ codebook.T * -2.0 + (codebook**2).sum(axis=1)
        return scores.argmin(axis=-1).astype(np.int64)

    def decode(self, codes: Union[np.ndarray, torch.Tensor]) -> np.ndarray:
        """Map codes back to images made of codebook patches.

        Args:
            codes (Union[np.ndarray, torch.Tensor]): integer codes [n, num_patches].

        Returns:
            np.ndarray: float32 images [n, image_size, image_size].

        Raises:
            ValueError: if the shape is wrong or a code is outside ``[0, num_codes)``.
        """
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.num_patches:
            raise ValueError(f"Invalid codes shape: {codes.shape}. Expected [n, {self.num_patches}].")
        if codes.size and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(
                f"Invalid codes: values span {codes.min()} to {codes.max()}, but the codebook has "
                f"{self.num_codes} codes (0 to {self.num_codes - 1})."
            )
        n, side, p = len(codes), self.image_size // self.patch_size, self.patch_size
        patches = self.codebook.numpy()[codes].reshape(n, side, side, p, p)
        return patches.transpose(0, 1, 3, 2, 4).reshape(n, self.image_size, self.image_size)

    def save(self, directory: str) -> None:
        """Write ``codebook.safetensors`` and ``config.json`` into ``directory``, creating it if needed."""
        os.makedirs(directory, exist_ok=True)
        save_file({"codebook": self.codebook.contiguous()}, os.path.join(directory, CODEBOOK_FILE))
        config = {
            "num_codes": self.num_codes,
            "codebook_dim": self.codebook_dim,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }
        with open(os.path.join(directory, CONFIG_FILE), "w") as file:
            json.dump(config, file, indent=2)

    @classmethod
    def load(cls, directory: str) -> "PatchVQTokenizer":
        """Read a tokenizer written by ``save``.

        Raises:
            FileNotFoundError: if a file of the tokenizer is missing.
            ValueError: if the codebook does not match the shape or fingerprint in ``config.json``.
        """
        directory = os.path.expanduser(directory)
        config_path = os.path.join(directory, CONFIG_FILE)
        codebook_path = os.path.join(directory, CODEBOOK_FILE)
        for path in (config_path, codebook_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Image tokenizer file not found: {path}. Run the data preparation step again.")
        with open(config_path) as file:
            config = json.load(file)
        tokenizer = cls(
            num_codes=config["num_codes"],
            patch_size=config["patch_size"],
            image_size=config["image_size"],
            seed=config.get("seed", 0),
        )
        codebook = load_file(codebook_path)["codebook"]
        if tuple(codebook.shape) != (tokenizer.num_codes, tokenizer.codebook_dim):
            raise ValueError(
                f"Invalid codebook in {codebook_path}: shape {tuple(codebook.shape)}, but {config_path} gives "
                f"[{tokenizer.num_codes}, {tokenizer.codebook_dim}]."
            )
        tokenizer._codebook = codebook.to(torch.float32)
        if tokenizer.fingerprint != config["fingerprint"]:
            raise ValueError(
                f"Invalid codebook in {codebook_path}: its sha256 {tokenizer.fingerprint} differs from the "
                f"fingerprint {config['fingerprint']} in {config_path}. The folder mixes two tokenizers. "
                "Run the data preparation step again."
            )
        return tokenizer
