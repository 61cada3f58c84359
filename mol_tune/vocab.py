"""Vocabulary layout of a MoL model: which token ids belong to which modality.

The base tokenizer's ids come first and are text. After them, each non-text modality
appends its codes as one contiguous range, in the order the modalities are given. Then
each non-text modality appends its two delimiters (for example ``<img>`` and ``</img>``),
which count as text because they sit in the text stream around a span.

Example with SmolLM2 (49152 base ids) and one image modality of 128 codes::

    [0, 49152)        text
    [49152, 49280)    image codes
    49280, 49281      <img>, </img>  (text)
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

TEXT = "text"

# Delimiters of the built-in modalities. Any other modality gets <name> and </name>.
_DEFAULT_DELIMITERS = {"image": ("<img>", "</img>"), "speech": ("<speech>", "</speech>")}


@dataclass(frozen=True)
class Modality:
    """A non-text modality whose discrete codes are added to the vocabulary.

    Args:
        name (str): modality name used in configs, logs and parameter names, e.g. ``"image"``.
        num_codes (int): number of codes in the tokenizer's codebook.
        codebook_dim (int): dimension of one codebook vector.
        open_token (str): delimiter placed before a span. Default: ``<img>`` for image,
            ``<speech>`` for speech, ``<name>`` otherwise.
        close_token (str): delimiter placed after a span, by the same rule.

    Raises:
        ValueError: if the name is ``"text"`` or not an identifier, or a size is not positive.
    """

    name: str
    num_codes: int
    codebook_dim: int
    open_token: str = ""
    close_token: str = ""

    def __post_init__(self):
        if self.name == TEXT or not self.name.isidentifier():
            raise ValueError(
                f"Invalid modality name: {self.name!r}. Use an identifier other than 'text', "
                "for example 'image' or 'speech'."
            )
        if self.num_codes <= 0 or self.codebook_dim <= 0:
            raise ValueError(
                f"Invalid modality {self.name!r}: num_codes={self.num_codes} and "
                f"codebook_dim={self.codebook_dim} must both be positive."
            )
        default_open, default_close = _DEFAULT_DELIMITERS.get(self.name, (f"<{self.name}>", f"</{self.name}>"))
        if not self.open_token:
            object.__setattr__(self, "open_token", default_open)
        if not self.close_token:
            object.__setattr__(self, "close_token", default_close)


def as_modality(spec: Any) -> Modality:
    """Turn a ``Modality``, a dict or an OmegaConf node from a config into a ``Modality``."""
    if isinstance(spec, Modality):
        return spec
    try:
        return Modality(**dict(spec))
    except TypeError as error:
        raise ValueError(
            f"Invalid modality spec {spec!r}: expected keys name, num_codes, codebook_dim "
            f"and optionally open_token, close_token ({error})."
        ) from None


@dataclass(frozen=True)
class VocabularyLayout:
    """Token id ranges of the text vocabulary, each modality's codes and the delimiters.

    Modality index 0 is always text; non-text modalities follow in the given order. These
    indices are the per-token modality ids that routing computes.

    Args:
        base_vocab_size (int): size of the pretrained model's vocabulary.
        modalities (Sequence[Modality]): non-text modalities, in vocabulary order.

    Raises:
        ValueError: if a modality name repeats or the base vocabulary is empty.
    """

    base_vocab_size: int
    modalities: Tuple[Modality, ...] = field(default_factory=tuple)

    def __post_init__(self):
        modalities = tuple(as_modality(m) for m in self.modalities)
        object.__setattr__(self, "modalities", modalities)
        if self.base_vocab_size <= 0:
            raise ValueError(f"Invalid base_vocab_size: {self.base_vocab_size}. It must be positive.")
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise ValueError(f"Invalid modalities: names repeat in {names}.")

    @property
    def modality_names(self) -> List[str]:
        """Names in modality-id order, ``"text"`` first."""
        return [TEXT] + [m.name for m in self.modalities]

    @property
    def num_new_tokens(self) -> int:
        """Number of ids appended after the base vocabulary: codes plus two delimiters per modality."""
        return sum(m.num_codes + 2 for m in self.modalities)

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + self.num_new_tokens

    def modality(self, name: str) -> Modality:
        """Return the modality called ``name``.

        Raises:
            KeyError: if the layout has no such modality; the message lists the known ones.
        """
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(f"Unknown modality {name!r}: this model has {self.modality_names}.")

    def modality_id(self, name: str) -> int:
        """Return the index of ``name`` in ``modality_names``, raising ``KeyError`` if unknown."""
        names = self.modality_names
        if name not in names:
            raise KeyError(f"Unknown modality {name!r}: this model has {names}.")
        return names.index(name)

    def code_range(self, name: str) -> Tuple[int, int]:
        """Return the half-open id range ``[start, end)`` of a modality's codes."""
        start = self.base_vocab_size
        for m in self.modalities:
            if m.name == name:
                return start, start + m.num_codes
            start += m.num_codes
        raise KeyError(f"Unknown modality {name!r}: this model has {self.modality_names}.")

    def code_ranges(self) -> List[Tuple[int, int]]:
        """Return the code id range of every non-text modality, in modality-id order (from 1)."""
        return [self.code_range(m.name) for m in self.modalities]

    def delimiter_ids(self, name: str) -> Tuple[int, int]:
        """Return the ids of the open and close delimiters of modality ``name``."""
        start = self.base_vocab_size + sum(m.num_codes for m in self.modalities)
        for m in self.modalities:
            if m.name == name:
                return start, start + 1
            start += 2
        raise KeyError(f"Unknown modality {name!r}: this model has {self.modality_names}.")

    def special_tokens(self) -> Dict[str, int]:
        """Return every delimiter string mapped to its id."""
        tokens = {}
        for m in self.modalities:
            open_id, close_id = self.delimiter_ids(m.name)
            tokens[m.open_token] = open_id
            tokens[m.close_token] = close_id
        return tokens

    def encode_codes(self, name: str, codes: Sequence[int]) -> List[int]:
        """Map a modality's code indices (0 .. num_codes - 1) to vocabulary ids.

        Raises:
            ValueError: if a code is outside the codebook; the message gives its position.
        """
        start, end = self.code_range(name)
        size = end - start
        ids = []
        for position, code in enumerate(codes):
            code = int(code)
            if not 0 <= code < size:
                raise ValueError(
                    f"Invalid {name} code {code} at position {position}: the codebook has {size} codes "
                    f"(0 to {size - 1}). Re-tokenize the data with the model's codebook."
                )
            ids.append(start + code)
        return ids

    def decode_codes(self, name: str, ids: Sequence[int]) -> List[int]:
        """Map vocabulary ids of a modality's codes back to code indices, dropping other ids."""
        start, end = self.code_range(name)
        return [int(i) - start for i in ids if start <= int(i) < end]

    def to_dict(self) -> Dict[str, Any]:
        return {"base_vocab_size": self.base_vocab_size, "modalities": [asdict(m) for m in self.modalities]}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "VocabularyLayout":
        try:
            return cls(int(data["base_vocab_size"]), tuple(as_modality(m) for m in data["modalities"]))
        except KeyError as error:
            raise ValueError(f"Invalid vocabulary layout {data!r}: missing key {error}.") from None

    def fingerprint(self) -> str:
        """Return a short hash of the layout, so data made for one layout can be checked against a model."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
