"""The tokenizer of a non-text modality: what mol_tune needs from it, and how to load one by import path.

An image or speech tokenizer turns media into code indices of its codebook. mol_tune needs:

- ``num_codes`` (int) and ``codebook_dim`` (int): the codebook's size and vector dimension.
- ``codebook``: a float tensor or array [num_codes, codebook_dim]. The model's new embeddings start from it.
- ``fingerprint`` (str): the sha256 of the codebook's float32 bytes, as
  ``mol_tune.data.image_vq.codebook_fingerprint`` computes it. Shards record it, and the reader
  rejects shards made with another codebook.
- ``encode``: for images, ``encode(images) -> codes`` with images a float32 array [n, H, W] (or
  [n, H, W, 3]) in [0, 1] and codes [n, k]; for speech, ``encode(waveform, sample_rate) -> codes``
  with a mono float32 waveform [num_samples] in [-1, 1] and codes [k].

``mol_tune.data.image_vq.PatchVQTokenizer`` is such an image tokenizer. A tokenizer is named by a
component spec, as in torchtune configs: an import path of a callable that returns the tokenizer,
with keyword arguments, e.g. ``{"_component_": "mol_tune.data.image_vq.PatchVQTokenizer.load",
"directory": "..."}``.
"""

import importlib
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch

from mol_tune.data.image_vq import codebook_fingerprint

COMPONENT_KEY = "_component_"
REQUIRED_ATTRIBUTES = ("encode", "codebook", "fingerprint", "num_codes", "codebook_dim")


def import_object(path: str) -> Any:
    """Import ``package.module.attribute[.attribute ...]``, e.g. ``mol_tune.data.image_vq.PatchVQTokenizer.load``.

    Raises:
        ValueError: if no prefix of ``path`` is an importable module or an attribute is missing.
    """
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            value = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Keep looking only if the missing module is the one tried, not one that it imports.
            if error.name is not None and not module_name.startswith(error.name):
                raise
            continue
        for attribute in parts[split:]:
            if not hasattr(value, attribute):
                raise ValueError(f"Invalid import path {path!r}: {module_name} has no attribute path {parts[split:]}.")
            value = getattr(value, attribute)
        return value
    raise ValueError(
        f"Invalid import path {path!r}: no module found. Use a dotted path such as "
        "'my_package.module.load_tokenizer', importable from the current Python environment."
    )


def instantiate(spec: Union[str, Mapping[str, Any]]) -> Any:
    """Build an object from a component spec: an import path, or a mapping with ``_component_`` and keyword arguments.

    Raises:
        ValueError: if the spec has no ``_component_`` or the import path is invalid.
    """
    if isinstance(spec, str):
        spec = {COMPONENT_KEY: spec}
    spec = dict(spec)
    if COMPONENT_KEY not in spec:
        raise ValueError(f"Invalid component spec {spec!r}: it needs a {COMPONENT_KEY!r} key with an import path.")
    factory = import_object(spec.pop(COMPONENT_KEY))
    return factory(**spec)


def check_modality_tokenizer(tokenizer: Any, modality: str) -> None:
    """Check that ``tokenizer`` has what mol_tune needs from the tokenizer of ``modality``.

    Raises:
        ValueError: if an attribute is missing, the codebook shape differs from ``num_codes`` and
            ``codebook_dim``, or ``fingerprint`` is not the sha256 of the codebook.
    """
    name = f"The {modality} tokenizer {type(tokenizer).__name__}"
    missing = [attribute for attribute in REQUIRED_ATTRIBUTES if not hasattr(tokenizer, attribute)]
    if missing:
        raise ValueError(
            f"{name} lacks {missing}. A {modality} tokenizer needs {list(REQUIRED_ATTRIBUTES)}; "
            "see mol_tune.data.modality_tokenizer."
        )
    if not callable(tokenizer.encode):
        raise ValueError(f"{name} has an `encode` attribute that is not callable.")
    codebook = torch.as_tensor(np.asarray(tokenizer.codebook, dtype=np.float32))
    expected = (int(tokenizer.num_codes), int(tokenizer.codebook_dim))
    if tuple(codebook.shape) != expected:
        raise ValueError(
            f"{name} has a codebook of shape {tuple(codebook.shape)}, but num_codes and codebook_dim give {expected}."
        )
    actual = codebook_fingerprint(codebook)
    if tokenizer.fingerprint != actual:
        raise ValueError(
            f"{name} gives fingerprint {tokenizer.fingerprint!r}, but the sha256 of its float32 codebook is "
            f"{actual}. Compute the fingerprint with mol_tune.data.image_vq.codebook_fingerprint."
        )


def load_modality_tokenizer(modality: str, spec: Union[str, Mapping[str, Any]]) -> Any:
    """Build the tokenizer of ``modality`` from a component spec and check it.

    Returns:
        Any: the tokenizer.

    Raises:
        ValueError: if the spec is invalid or the tokenizer lacks what mol_tune needs.
    """
    tokenizer = instantiate(spec)
    check_modality_tokenizer(tokenizer, modality)
    return tokenizer


def describe_spec(spec: Union[str, Mapping[str, Any]]) -> Dict[str, Any]:
    """Return the spec as a plain dict with ``_component_``, for settings files and messages."""
    return {COMPONENT_KEY: spec} if isinstance(spec, str) else dict(spec)
