"""The cache folder where mol_tune's tools write the base model and the prepared data sets."""

import os
from pathlib import Path

# Environment variable that moves the cache, e.g. to a larger disk.
CACHE_ENV = "MOL_TUNE_CACHE"


def default_cache_dir() -> Path:
    """Return ``$MOL_TUNE_CACHE`` if it is set and not empty, else ``~/.cache/mol_tune``.

    The default config reads the same folder (``cache_dir`` in ``smollm2_135m_digits.yaml``).
    """
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mol_tune")
