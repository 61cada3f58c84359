"""Check that the shards' text was tokenized by the base model's own tokenizer.

Text segments store token ids, and any other tokenizer's ids inside the base vocabulary would
train silently on the wrong tokens. Shards record the sha256 of the ``tokenizer.json`` that made
them, so the check compares it with the base checkpoint folder's file.
"""

import os
from typing import Any, Mapping

from mol_tune.data.config import parse_data_config
from mol_tune.data.prepare_digits import file_sha256
from mol_tune.data.shards import ShardError, read_shard_info
from mol_tune.data.source import expand_shard_paths


def check_text_tokenizer(data_section: Mapping[str, Any], tokenizer_dir: str) -> None:
    """Raise ValueError if a shard of the ``data:`` section was tokenized with another tokenizer.

    Shards that record no tokenizer hash, and base folders without ``tokenizer.json``, are not
    checked. An unreadable shard raises ``ShardError`` unless ``data.on_error`` is ``"skip"``.

    Args:
        data_section (Mapping[str, Any]): the config's ``data:`` section.
        tokenizer_dir (str): the base checkpoint folder.

    Raises:
        ValueError: naming the shard, both tokenizers and the command that re-tokenizes the data.
    """
    tokenizer_path = os.path.join(os.path.expanduser(str(tokenizer_dir)), "tokenizer.json")
    if not os.path.isfile(tokenizer_path):
        return
    expected = file_sha256(tokenizer_path)
    data = parse_data_config(data_section)
    for dataset in data.datasets:
        for path in expand_shard_paths(list(dataset.train) + list(dataset.validation)):
            try:
                info = read_shard_info(path)
            except ShardError:
                if data.on_error == "skip":
                    continue  # The loaders skip and count this shard.
                raise
            if info.text_tokenizer_sha256 and info.text_tokenizer_sha256 != expected:
                raise ValueError(
                    f"Shard {path} of data set {dataset.name!r} was tokenized with {info.text_tokenizer!r} "
                    f"(tokenizer.json sha256 {info.text_tokenizer_sha256[:16]}), not with the base model's "
                    f"tokenizer in {tokenizer_dir} (sha256 {expected[:16]}). Tokenize the data again with "
                    f"--tokenizer-dir {tokenizer_dir} (mol-tune prepare-digits, prepare-text or make-shards)."
                )
