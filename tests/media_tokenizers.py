"""Test fixtures for the shard converter: a tiny speech tokenizer and image tokenizers that misbehave.

``FrameKMeansTokenizer`` is a stand-in for a real speech unit model, built only for tests: k-means
codes of log band energies of 32 ms frames. The converter loads these by import path, so this
module must be importable. pytest puts the tests folder on ``sys.path``, and a subprocess needs it
on ``PYTHONPATH``.
"""

import os
import signal

import numpy as np
import torch
from sklearn.cluster import KMeans

from mol_tune.data.image_vq import PatchVQTokenizer, codebook_fingerprint

SAMPLE_RATE = 8000
FRAME = 256
HOP = 128
BANDS = 16


def log_band_energies(waveform: np.ndarray) -> np.ndarray:
    """Return float32 [num_frames, BANDS]: log mean power in equal-width frequency bands per Hann-windowed frame."""
    if len(waveform) < FRAME:
        return np.zeros((0, BANDS), dtype=np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(waveform, FRAME)[::HOP] * np.hanning(FRAME)
    power = np.abs(np.fft.rfft(frames, axis=-1)[:, 1:]) ** 2
    bands = power.reshape(len(frames), BANDS, -1).mean(axis=-1)
    return np.log(bands + 1e-8).astype(np.float32)


class FrameKMeansTokenizer:
    """Speech tokenizer for tests: each frame's log band energies are replaced by the nearest codebook vector's index."""

    def __init__(self, codebook: np.ndarray):
        self.codebook = torch.from_numpy(np.asarray(codebook, dtype=np.float32))
        self.num_codes, self.codebook_dim = self.codebook.shape
        self.fingerprint = codebook_fingerprint(self.codebook)

    @classmethod
    def fit(cls, waveforms, num_codes: int = 16, seed: int = 0) -> "FrameKMeansTokenizer":
        features = np.concatenate([log_band_energies(w) for w in waveforms])
        kmeans = KMeans(n_clusters=num_codes, n_init=1, random_state=seed).fit(features)
        return cls(kmeans.cluster_centers_)

    def encode(self, waveform: np.ndarray, sample_rate: int) -> np.ndarray:
        if sample_rate != SAMPLE_RATE:
            raise ValueError(f"Invalid sample rate {sample_rate}: this tokenizer takes {SAMPLE_RATE} Hz.")
        features = log_band_energies(waveform)
        codebook = self.codebook.numpy()
        distances = ((features[:, None, :] - codebook[None]) ** 2).sum(axis=-1)
        return distances.argmin(axis=-1).astype(np.int64)


def load_frame_tokenizer(path: str) -> FrameKMeansTokenizer:
    """Load a ``FrameKMeansTokenizer`` from a ``.npy`` codebook."""
    return FrameKMeansTokenizer(np.load(path))


class _CountingImageTokenizer:
    """A ``PatchVQTokenizer`` that counts ``encode`` calls, so a subclass can misbehave at a chosen call."""

    def __init__(self, directory: str):
        self.inner = PatchVQTokenizer.load(directory)
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, images):
        self.calls += 1
        return self.inner.encode(images)


class KillingImageTokenizer(_CountingImageTokenizer):
    """Kill the process with SIGKILL at encode call ``kill_at`` (1-based), as an operator's `kill -9` would."""

    def __init__(self, directory: str, kill_at: int):
        super().__init__(directory)
        self.kill_at = kill_at

    def encode(self, images):
        codes = super().encode(images)
        if self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return codes


class OutOfRangeImageTokenizer(_CountingImageTokenizer):
    """Return code ``num_codes`` (one past the codebook) in the last position at the encode calls in ``bad_calls``."""

    def __init__(self, directory: str, bad_calls):
        super().__init__(directory)
        self.bad_calls = set(bad_calls)

    def encode(self, images):
        codes = super().encode(images)
        if self.calls in self.bad_calls:
            codes[:, -1] = self.inner.num_codes
        return codes


class NoFingerprintTokenizer:
    """A tokenizer without ``fingerprint``, which the converter must reject."""

    def __init__(self):
        self.num_codes, self.codebook_dim = 4, 2
        self.codebook = torch.zeros(4, 2)

    def encode(self, images):
        return np.zeros((len(images), 1), dtype=np.int64)
