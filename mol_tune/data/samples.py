"""Sample construction: a stored sample's segments become one token sequence of the model's vocabulary."""

from typing import Any, Dict, List, Optional

import numpy as np

from mol_tune.data.shards import ShardError
from mol_tune.vocab import TEXT, VocabularyLayout


class SampleBuilder:
    """Turn a sample from ``ShardSource`` into vocabulary ids, for use as a map function.

    The segments are put in a random order drawn from ``(seed, epoch, sample_id)``, so the same
    sample gets the same order after a resume and a new order in the next epoch. A text segment
    keeps its ids. A non-text segment becomes ``open + encode_codes(codes) + close``, with the
    modality's delimiters from ``layout.delimiter_ids``. BOS is put first and EOS last when given.

    The output dict has ``tokens`` (List[int]), ``spans`` (List[int], per token the index of the
    segment it belongs to in the new order, with BOS in the first span and EOS in the last),
    and ``sample_id``, ``shard``, ``row`` from the input. It also passes on the input's ``skipped``
    counts (see ``ShardSource``).

    Args:
        layout (VocabularyLayout): the model's vocabulary layout.
        seed (int): seed of the segment order. Default: 0.
        bos_id (Optional[int]): id put before the sample, or None for none. Default: None.
        eos_id (Optional[int]): id put after the sample, or None for none. Default: None.
        shuffle_segments (bool): randomise the segment order, or keep the stored order if False. Default: True.
    """

    def __init__(
        self,
        layout: VocabularyLayout,
        seed: int = 0,
        bos_id: Optional[int] = None,
        eos_id: Optional[int] = None,
        shuffle_segments: bool = True,
    ):
        self.layout = layout
        self.seed = seed
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.shuffle_segments = shuffle_segments

    def segment_order(self, sample: Dict[str, Any]) -> List[int]:
        """Return the indices of the sample's segments in the order they are emitted."""
        count = len(sample["segments"])
        if not self.shuffle_segments or count < 2:
            return list(range(count))
        # SeedSequence needs non-negative entropy, and sample ids are int64.
        entropy = [self.seed, sample.get("epoch", 0), int(sample["sample_id"]) % (1 << 64)]
        return [int(i) for i in np.random.default_rng(entropy).permutation(count)]

    def __call__(self, sample: Dict[str, Any]) -> Dict[str, Any]:
        tokens: List[int] = []
        spans: List[int] = []
        for span, index in enumerate(self.segment_order(sample)):
            segment = sample["segments"][index]
            modality = segment["modality"]
            if modality == TEXT:
                ids = [int(t) for t in segment["tokens"]]
            else:
                try:
                    open_id, close_id = self.layout.delimiter_ids(modality)
                    ids = [open_id] + self.layout.encode_codes(modality, segment["tokens"]) + [close_id]
                except (KeyError, ValueError) as error:
                    raise ShardError(
                        f"Invalid sample in shard {sample.get('shard')}, row {sample.get('row')}: "
                        f"segment {index} ({modality}): {error}"
                    ) from None
            tokens.extend(ids)
            spans.extend([span] * len(ids))

        if self.bos_id is not None:
            tokens.insert(0, int(self.bos_id))
            spans.insert(0, 0)
        if self.eos_id is not None:
            tokens.append(int(self.eos_id))
            spans.append(spans[-1] if spans else 0)
        return {
            "tokens": tokens,
            "spans": spans,
            "sample_id": sample["sample_id"],
            "shard": sample.get("shard"),
            "row": sample.get("row"),
            "skipped": sample.get("skipped", {}),
        }
