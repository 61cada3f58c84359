"""Reading raw media files into arrays: images with Pillow or NumPy, WAV audio with the standard library.

Every failure raises a ``BadInputError`` that names the file and carries a reason from
``mol_tune.data.bad_input``, so the shard converter can raise it or skip and count the item.

Pixel values are scaled to [0, 1]: 8-bit values are divided by 255 and 16-bit values by 65535.
A float ``.npy`` array must already lie in [0, 1]. Audio samples are scaled to [-1, 1] and
channels are averaged to mono.
"""

import os
import struct
import wave
from typing import Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from mol_tune.data import bad_input
from mol_tune.data.bad_input import BadInputError

IMAGE_MODES = ("L", "RGB")
NUMPY_SUFFIX = ".npy"
# ITU-R 601 luma weights, the ones Pillow uses to convert RGB to "L".
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Full scale of PCM WAV samples per sample width in bytes. 8-bit WAV is unsigned with 128 as zero.
_PCM_FULL_SCALE = {1: 128.0, 2: 32768.0, 3: 8388608.0, 4: 2147483648.0}


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise BadInputError(
            f"File not found: {path}. Fix the path in the manifest or its --root.", bad_input.MISSING_FILE
        )


def _scale_pixels(array: np.ndarray, path: str) -> np.ndarray:
    """Scale integer pixels to [0, 1]; check that float pixels already are."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16 or array.dtype == np.int32:
        # Pillow returns 16-bit PNGs as int32 ("I" mode) or uint16 ("I;16").
        return array.astype(np.float32) / 65535.0
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise BadInputError(
                f"Invalid pixel values in {path}: a float image must lie in [0, 1], but it spans "
                f"{np.nanmin(array)} to {np.nanmax(array)}. Scale it to [0, 1] or store it as uint8.",
                bad_input.INVALID_VALUES,
            )
        return array
    raise BadInputError(
        f"Invalid image array in {path}: dtype {array.dtype} is not supported. Use uint8, uint16 or float in [0, 1].",
        bad_input.UNREADABLE_FILE,
    )


def _to_mode(array: np.ndarray, mode: str, path: str) -> np.ndarray:
    """Turn [H, W] or [H, W, C] pixels into [H, W] for "L" or [H, W, 3] for "RGB"."""
    if array.ndim == 3 and array.shape[-1] in (1, 3, 4):
        channels = array.shape[-1]
        if channels == 1:
            array = array[..., 0]
        elif mode == "L":
            array = array[..., :3] @ _LUMA_WEIGHTS
        else:
            array = array[..., :3]
    if array.ndim == 2:
        return array if mode == "L" else np.repeat(array[..., None], 3, axis=-1)
    if array.ndim == 3 and mode == "RGB" and array.shape[-1] == 3:
        return array
    raise BadInputError(
        f"Invalid image array in {path}: shape {array.shape} is not [H, W] or [H, W, C] with 1, 3 or 4 channels.",
        bad_input.UNREADABLE_FILE,
    )


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """Resize each channel to ``size x size`` pixels with bicubic interpolation, clipped to [0, 1]."""
    channels = array[..., None] if array.ndim == 2 else array
    resized = [
        np.asarray(Image.fromarray(channels[..., c], mode="F").resize((size, size), Image.Resampling.BICUBIC))
        for c in range(channels.shape[-1])
    ]
    result = np.clip(np.stack(resized, axis=-1), 0.0, 1.0)
    return result[..., 0] if array.ndim == 2 else result


def read_image(path: str, mode: str = "L", size: Optional[int] = None) -> np.ndarray:
    """Read an image file into float32 pixels in [0, 1].

    Files ending in ``.npy`` are read with NumPy, all others with Pillow (PNG, JPEG, BMP, ...).

    Args:
        path (str): image file.
        mode (str): ``"L"`` for grey levels [H, W] or ``"RGB"`` for colour [H, W, 3]. Default: "L".
        size (Optional[int]): if given, the image is resized to ``size x size`` pixels when it has
            another size. NOTE: a non-square image is stretched. Default: None.

    Returns:
        np.ndarray: float32 pixels, [H, W] or [H, W, 3].

    Raises:
        BadInputError: if the file is missing, cannot be decoded, is empty or has invalid values.
        ValueError: if ``mode`` is unknown.
    """
    if mode not in IMAGE_MODES:
        raise ValueError(f"Invalid image mode: {mode!r}. Use one of {IMAGE_MODES}.")
    _check_exists(path)
    try:
        if path.lower().endswith(NUMPY_SUFFIX):
            array = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as image:
                image.load()
                if image.mode.startswith("I"):
                    array = np.asarray(image)
                else:
                    array = np.asarray(image.convert(mode))
    except (OSError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as error:
        raise BadInputError(
            f"Failed to read image {path}: {error}. Replace the file, or remove it from the manifest.",
            bad_input.UNREADABLE_FILE,
        ) from None
    if array.size == 0:
        raise BadInputError(f"Empty image {path}: it has shape {array.shape}.", bad_input.EMPTY_SAMPLE)
    array = _to_mode(_scale_pixels(array, path), mode, path)
    if size is not None and array.shape[:2] != (size, size):
        array = _resize(array, size)
    return array.astype(np.float32)


def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """Read a PCM WAV file with the ``wave`` module into mono float32 samples in [-1, 1].

    Args:
        path (str): WAV file with 8-, 16-, 24- or 32-bit integer samples and any number of channels.

    Returns:
        Tuple[np.ndarray, int]: float32 samples [num_samples], averaged over channels, and the sample rate in Hz.

    Raises:
        BadInputError: if the file is missing, not PCM WAV, truncated or has no samples.
    """
    _check_exists(path)
    try:
        with wave.open(path, "rb") as file:
            channels = file.getnchannels()
            width = file.getsampwidth()
            sample_rate = file.getframerate()
            num_frames = file.getnframes()
            data = file.readframes(num_frames)
    # Python 3.11's wave raises RuntimeError for a chunk size beyond the file and struct.error for a short header.
    except (wave.Error, EOFError, OSError, RuntimeError, struct.error) as error:
        raise BadInputError(
            f"Failed to read WAV file {path}: {type(error).__name__}: {error}. Convert it to 8-, 16-, 24- or "
            "32-bit PCM WAV, or remove it from the manifest.",
            bad_input.UNREADABLE_FILE,
        ) from None
    if width not in _PCM_FULL_SCALE:
        raise BadInputError(
            f"Failed to read WAV file {path}: sample width of {width} bytes is not supported. "
            "Convert it to 8-, 16-, 24- or 32-bit PCM WAV.",
            bad_input.UNREADABLE_FILE,
        )
    if len(data) != num_frames * channels * width:
        raise BadInputError(
            f"Failed to read WAV file {path}: its header gives {num_frames} frames, but the file contains "
            f"{len(data) // max(channels * width, 1)}. The file is truncated; replace it.",
            bad_input.UNREADABLE_FILE,
        )
    if num_frames == 0:
        raise BadInputError(f"Empty WAV file {path}: it has no samples.", bad_input.EMPTY_SAMPLE)

    if width == 1:
        samples = np.frombuffer(data, dtype=np.uint8).astype(np.float32) - 128.0
    elif width == 3:
        # Little-endian 24-bit: put the three bytes in the top of an int32, which keeps the sign.
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        samples = ((raw[:, 0] << 8) | (raw[:, 1] << 16) | (raw[:, 2] << 24)).astype(np.float32) / 256.0
    else:
        samples = np.frombuffer(data, dtype=f"<i{width}").astype(np.float32)
    samples = samples.reshape(num_frames, channels).mean(axis=1) / _PCM_FULL_SCALE[width]
    return samples.astype(np.float32), sample_rate
