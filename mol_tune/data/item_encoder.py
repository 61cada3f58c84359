"""Encoding of raw items into a sample's segments: read the media file, run the tokenizers, check the codes."""

import os
from typing import Any, List, Optional, Tuple

import numpy as np
import torch

from mol_tune.data import bad_input
from mol_tune.data.bad_input import BadInputError
from mol_tune.data.manifest import RawItem
from mol_tune.data.media import read_image, read_wav
from mol_tune.data.shards import Segment
from mol_tune.vocab import TEXT

IMAGE, SPEECH = "image", "speech"
MODALITIES = (IMAGE, SPEECH, TEXT)
# Manifest fields per modality: the media file (None for text) and the text.
MEDIA_FIELD = {IMAGE: "image", SPEECH: "audio", TEXT: None}
TEXT_FIELD = {IMAGE: "caption", SPEECH: "transcript", TEXT: "text"}


def _to_numpy(codes: Any) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        return codes.detach().cpu().numpy()
    return np.asarray(codes)


class ItemEncoder:
    """Turn raw items into segments: read the media file, run the tokenizers, check the result.

    A sample's segments are its text (caption, transcript or text) as token ids of the text
    tokenizer, then for image and speech the codes of the modality's tokenizer. Every bad input
    raises a ``BadInputError`` with a reason from ``mol_tune.data.bad_input``.

    Args:
        modality (str): ``"image"``, ``"speech"`` or ``"text"``.
        text_tokenizer (Any): a ``tokenizers.Tokenizer``.
        modality_tokenizer (Any): the image or speech tokenizer (see ``mol_tune.data.modality_tokenizer``),
            or None for text.
        root (str): folder that relative media paths start from.
        image_mode (str): ``"L"`` or ``"RGB"``. Default: "L".
        image_size (Optional[int]): side that images are resized to. Default: the image tokenizer's
            ``image_size`` attribute if it has one, else no resizing.
    """

    def __init__(
        self,
        modality: str,
        text_tokenizer: Any,
        modality_tokenizer: Any,
        root: str,
        image_mode: str = "L",
        image_size: Optional[int] = None,
    ):
        self.modality = modality
        self.text_tokenizer = text_tokenizer
        self.modality_tokenizer = modality_tokenizer
        self.root = root
        self.image_mode = image_mode
        self.image_size = image_size
        if modality == IMAGE and image_size is None:
            self.image_size = getattr(modality_tokenizer, "image_size", None)

    def media_path(self, item: RawItem) -> str:
        """Return the media file of ``item``, resolved against ``root``."""
        return os.path.join(self.root, os.path.expanduser(item.fields[MEDIA_FIELD[self.modality]]))

    def load(self, item: RawItem) -> Tuple[RawItem, Any, Optional[BadInputError]]:
        """Read the item's media file. Runs in worker threads, so every bad input is returned, not raised."""
        if item.error is not None or self.modality == TEXT:
            return item, None, item.error
        try:
            if not item.fields[MEDIA_FIELD[self.modality]].strip():
                raise BadInputError(
                    f"the {MEDIA_FIELD[self.modality]} field is empty. Fill it in or remove the row.",
                    bad_input.EMPTY_SAMPLE,
                )
            path = self.media_path(item)
            if self.modality == IMAGE:
                return item, read_image(path, self.image_mode, self.image_size), None
            return item, read_wav(path), None
        except BadInputError as error:
            return item, None, error

    def encode(self, item: RawItem, media: Any) -> List[Segment]:
        """Return the item's segments: its text, then its codes for image and speech."""
        text = item.fields[TEXT_FIELD[self.modality]].strip()
        if not text:
            raise BadInputError(
                f"the {TEXT_FIELD[self.modality]} is empty. Fill it in or remove the row.", bad_input.EMPTY_SAMPLE
            )
        ids = self.text_tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise BadInputError(f"the text tokenizer returned no tokens for {text!r}.", bad_input.EMPTY_SAMPLE)
        segments = [Segment(TEXT, ids)]
        if self.modality != TEXT:
            segments.append(Segment(self.modality, self._codes(item, media)))
        return segments

    def _codes(self, item: RawItem, media: Any) -> List[int]:
        path = self.media_path(item)
        modality = self.modality
        try:
            if modality == IMAGE:
                codes = _to_numpy(self.modality_tokenizer.encode(media[None]))
                expected_shape = "[1, k]"
                valid_shape = codes.ndim == 2 and codes.shape[0] == 1
            else:
                waveform, sample_rate = media
                codes = _to_numpy(self.modality_tokenizer.encode(waveform, sample_rate))
                expected_shape = "[k]"
                valid_shape = codes.ndim == 1
        except Exception as error:  # noqa: BLE001 - any failure of a user-supplied tokenizer names the file
            raise BadInputError(
                f"the {modality} tokenizer failed on {path}: {type(error).__name__}: {error}",
                bad_input.TOKENIZER_ERROR,
            ) from error

        where = f"the {modality} tokenizer returned"
        if not valid_shape:
            raise BadInputError(
                f"{where} codes of shape {codes.shape} for {path}, but {expected_shape} is expected.",
                bad_input.TOKENIZER_ERROR,
            )
        codes = codes.reshape(-1)
        if codes.size == 0:
            raise BadInputError(f"{where} no codes for {path}.", bad_input.EMPTY_SAMPLE)
        if not np.issubdtype(codes.dtype, np.integer):
            raise BadInputError(
                f"{where} codes of dtype {codes.dtype} for {path}, but integers are expected.",
                bad_input.TOKENIZER_ERROR,
            )
        num_codes = int(self.modality_tokenizer.num_codes)
        outside = np.flatnonzero((codes < 0) | (codes >= num_codes))
        if outside.size:
            position = int(outside[0])
            raise BadInputError(
                f"{where} code {int(codes[position])} at position {position} for {path}, outside its codebook "
                f"of {num_codes} codes (0 to {num_codes - 1}). Check the tokenizer.",
                bad_input.CODE_OUT_OF_RANGE,
            )
        return codes.tolist()


def locate_error(input_path: str, item: RawItem, error: BadInputError) -> BadInputError:
    """Return ``error`` with the input file, line and sample id in front, unless it already names them."""
    if error is item.error:
        return error
    return BadInputError(f"Invalid item at {input_path}:{item.line} (sample {item.index}): {error}", error.reason)
