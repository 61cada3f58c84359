"""scikit-learn's handwritten digits with a caption per image, split into train and validation.

``sklearn.datasets.load_digits`` ships with scikit-learn, so this data set needs no download:
1,797 real 8x8 images in 16 grey levels (pixel values 0 to 16), each labelled 0 to 9.
"""

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DATASET_NAME = "sklearn_digits"

# load_digits stores 16 grey levels as the values 0 .. 16.
MAX_PIXEL_VALUE = 16.0

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTION_TEMPLATES = (
    "a handwritten digit {name}",
    "the number {name}, written by hand",
    "a small grey picture of the digit {name}",
    "an image of a handwritten {name}",
    "{name}, drawn by hand in 8 by 8 pixels",
)


@dataclass
class DigitsSplit:
    """One split of the captioned digits.

    Args:
        sample_ids (np.ndarray): int64 [n], index of each image in ``load_digits()``, stable across splits.
        images (np.ndarray): float32 [n, 8, 8], pixel intensities scaled to [0, 1].
        labels (np.ndarray): int64 [n], the digit shown.
        captions (List[str]): one caption in words per image.
    """

    sample_ids: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    captions: List[str]

    def __len__(self) -> int:
        return len(self.sample_ids)


def caption_digits(labels: np.ndarray, seed: int = 0) -> List[str]:
    """Write a caption per label, choosing one of ``CAPTION_TEMPLATES`` with a seeded RNG.

    Args:
        labels (np.ndarray): digit labels 0 to 9.
        seed (int): seed of the template choice. Default: 0.

    Returns:
        List[str]: captions such as ``"a handwritten digit seven"``, in the order of ``labels``.
    """
    rng = np.random.default_rng(seed)
    choices = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    return [CAPTION_TEMPLATES[c].format(name=DIGIT_NAMES[int(label)]) for c, label in zip(choices, labels)]


def load_captioned_digits(seed: int = 0, validation_fraction: float = 0.1) -> Dict[str, DigitsSplit]:
    """Load the digits, caption them and split them, stratified by label.

    Captions are chosen over the whole data set before the split, so a sample keeps its caption
    whatever ``validation_fraction`` is.

    Args:
        seed (int): seed of the captions and of the split. Default: 0.
        validation_fraction (float): share of the images in the validation split. Default: 0.1.

    Returns:
        Dict[str, DigitsSplit]: ``"train"`` and ``"validation"`` splits, each sorted by sample id.

    Raises:
        ValueError: if ``validation_fraction`` is not between 0 and 1.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"Invalid validation_fraction: {validation_fraction}. Use a value between 0 and 1, e.g. 0.1."
        )
    digits = load_digits()
    images = (digits.images / MAX_PIXEL_VALUE).astype(np.float32)
    labels = digits.target.astype(np.int64)
    captions = caption_digits(labels, seed=seed)
    sample_ids = np.arange(len(labels), dtype=np.int64)

    train_ids, validation_ids = train_test_split(
        sample_ids, test_size=validation_fraction, random_state=seed, stratify=labels
    )
    splits = {}
    for name, ids in (("train", train_ids), ("validation", validation_ids)):
        ids = np.sort(ids)
        splits[name] = DigitsSplit(
            sample_ids=ids, images=images[ids], labels=labels[ids], captions=[captions[i] for i in ids]
        )
    return splits
