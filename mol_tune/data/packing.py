"""Packing of samples into fixed-length sequences, and collation of packed sequences into batches."""

import functools
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torchdata.nodes import BaseNode

from mol_tune.vocab import VocabularyLayout

CROSS_ENTROPY_IGNORE_INDEX = -100

_TOO_LONG_POLICIES = ("skip", "raise")


class Packer(BaseNode[Dict[str, Any]]):
    """Greedily pack samples from ``SampleBuilder`` into sequences of ``seq_len`` tokens.

    Samples are taken in order and appended while they fit. The first sample that does not fit
    closes the sequence, which is padded with ``pad_id``, and starts the next one. By default a
    sample is never cut, so neither is a modality span. A sample longer than ``seq_len`` is skipped
    and counted (``on_too_long="skip"``) or raises (``on_too_long="raise"``).

    With ``split_text_samples=True``, a text-only sample may be cut. A sample is text-only when
    every id is below ``layout.base_vocab_size``, so it has no code and no delimiter; BOS and EOS
    count as text when they are base ids. When a text-only sample does not fit, a first piece fills
    the room left in the sequence, and the rest opens the next sequence, continuing into the ones
    after while it is longer than ``seq_len``. Such samples are never skipped as too long. Every
    piece is a document of its own. Its positions restart at 0, because a piece cannot attend to
    the piece before it in an earlier sequence anyway. The label of its last token is -100, because
    no target crosses a cut. A cut leaves no piece shorter than ``min_piece_tokens``: with less room
    the sequence is padded and the sample opens the next one, and a first piece is shortened so
    that the rest keeps at least that many tokens. Samples with a non-text span are packed whole as
    without the option.

    Each packed sequence is a dict of LongTensors of shape [seq_len]:

    - ``tokens``: the documents (whole samples or pieces), then padding.
    - ``labels``: ``labels[i] = tokens[i + 1]`` when ``i + 1`` is in the same document, else -100
      (so the last token of each document and all padding are ignored by the loss).
    - ``input_pos``: position inside the document, from 0 for each document. Padding counts from 0 too.
    - ``document_ids``: index of the document in the sequence. Padding gets the next index.

    It also has ``sample_ids`` (List[int], one per document, so a cut sample's id appears in every
    sequence that holds a piece of it), ``num_samples`` (the number of documents), ``num_skipped``
    (samples skipped as too long while this sequence was assembled) and ``skipped``: the running
    count of every skip since the pass began, as ``{"shards/<reason>": n, "rows/<reason>": n,
    "samples/too_long": n}``. Shard and row counts are the sums of the ``skipped`` dicts that the
    samples carry (see ``ShardSource``), and only keys with a count above 0 appear.

    The running counts in ``stats`` conserve tokens: every token read from the source is in
    ``stats["tokens"]``, in ``stats["skipped_tokens"]`` or in the sample that waits for the next
    sequence. ``stats["samples"]`` counts each packed sample once, and ``stats["split_samples"]``
    those that were cut.

    The state contains the source's state, the sample that waits for the next sequence with the
    index of its first token not yet packed (above 0 after a cut), and the running counts in
    ``stats`` and ``skipped``, so a resumed packer continues exactly, token for token.

    Args:
        source (BaseNode[Dict[str, Any]]): node yielding dicts with ``tokens`` and ``sample_id``.
        seq_len (int): tokens per packed sequence. Default: 2048.
        pad_id (int): token id of padding. No loss or attention from real tokens reaches it. Default: 0.
        on_too_long (str): ``"skip"`` or ``"raise"`` for a sample longer than ``seq_len`` that is
            not cut. Default: "skip".
        max_consecutive_skips (int): samples skipped as too long in a row after which ``next``
            raises, because with an endless source of such samples it would otherwise never return.
            Default: 100000.
        name (str): what the source reads, for error messages, e.g. "validation split of data set
            'digits'". Default: "the data".
        split_text_samples (bool): cut text-only samples across sequences, as described above.
            Default: False.
        layout (Optional[VocabularyLayout]): the model's vocabulary layout, which tells text ids
            from the others. Required when ``split_text_samples`` is True. Default: None.
        min_piece_tokens (int): fewest tokens in a piece of a cut sample. The default of 2 gives
            every piece at least one target. Default: 2.

    Raises:
        ValueError: if ``seq_len`` or ``max_consecutive_skips`` is not positive, ``on_too_long`` is
            unknown, or, with ``split_text_samples``, ``layout`` is None or ``min_piece_tokens`` is
            not in ``[1, (seq_len + 1) // 2]``. From ``next``: if a sample is too long with
            ``on_too_long="raise"``, after ``max_consecutive_skips`` too long samples in a row, or
            if the source ends before any sequence of the pass is packed, because every sample was
            skipped.
    """

    SOURCE_KEY = "source"
    PENDING_KEY = "pending"
    PENDING_START_KEY = "pending_start"
    STATS_KEY = "stats"
    SKIPPED_KEY = "skipped"
    TOO_LONG = "samples/too_long"

    def __init__(
        self,
        source: BaseNode[Dict[str, Any]],
        seq_len: int = 2048,
        pad_id: int = 0,
        on_too_long: str = "skip",
        max_consecutive_skips: int = 100_000,
        name: str = "the data",
        split_text_samples: bool = False,
        layout: Optional[VocabularyLayout] = None,
        min_piece_tokens: int = 2,
    ):
        super().__init__()
        if seq_len <= 0:
            raise ValueError(f"Invalid seq_len: {seq_len}. It must be positive.")
        if on_too_long not in _TOO_LONG_POLICIES:
            raise ValueError(f"Invalid on_too_long: {on_too_long!r}. Use one of {_TOO_LONG_POLICIES}.")
        if max_consecutive_skips <= 0:
            raise ValueError(f"Invalid max_consecutive_skips: {max_consecutive_skips}. It must be positive.")
        if split_text_samples:
            if layout is None:
                raise ValueError(
                    "Missing layout: split_text_samples=True needs the vocabulary layout to tell text-only samples."
                )
            # With at most (seq_len + 1) // 2, a sample longer than seq_len always leaves a first
            # piece of at least min_piece_tokens in an empty sequence, so packing always advances.
            if not 1 <= min_piece_tokens <= (seq_len + 1) // 2:
                raise ValueError(
                    f"Invalid min_piece_tokens: {min_piece_tokens} for seq_len={seq_len}. It must be from 1 to "
                    f"{(seq_len + 1) // 2}, half of seq_len rounded up."
                )
        self.source = source
        self.seq_len = seq_len
        self.pad_id = pad_id
        self.on_too_long = on_too_long
        self.max_consecutive_skips = max_consecutive_skips
        self.name = name
        self.split_text_samples = split_text_samples
        self.text_vocab_size = layout.base_vocab_size if layout is not None else None
        self.min_piece_tokens = min_piece_tokens
        self._pending: Optional[Dict[str, Any]] = None
        self._pending_start = 0
        self.stats = self._empty_stats()
        self.skipped: Dict[str, int] = {}

    @staticmethod
    def _empty_stats() -> Dict[str, int]:
        return {
            "sequences": 0, "samples": 0, "split_samples": 0, "tokens": 0, "padding_tokens": 0,
            "skipped_samples": 0, "skipped_tokens": 0,
        }  # fmt: skip

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE_KEY])
            self._pending = initial_state[self.PENDING_KEY]
            # States saved before samples could be cut have no start and no split count.
            self._pending_start = initial_state.get(self.PENDING_START_KEY, 0)
            self.stats = {**self._empty_stats(), **initial_state[self.STATS_KEY]}
            # States saved before skip counts were carried have none.
            self.skipped = dict(initial_state.get(self.SKIPPED_KEY, {}))
        else:
            self.source.reset()
            self._pending = None
            self._pending_start = 0
            self.stats = self._empty_stats()
            self.skipped = {}

    def _count_skips(self, counts: Dict[str, int]) -> None:
        for key, count in counts.items():
            self.skipped[key] = self.skipped.get(key, 0) + count

    def _next_sample(self) -> Dict[str, Any]:
        """Return the source's next sample after adding up the skips it carries."""
        sample = next(self.source)
        self._count_skips(sample.pop("skipped", None) or {})
        return sample

    def _can_split(self, sample: Dict[str, Any]) -> bool:
        """Return whether ``sample`` may be cut, which needs splitting on and only base-vocabulary (text) ids."""
        return self.split_text_samples and max(sample["tokens"]) < self.text_vocab_size

    def _take(self, sample: Dict[str, Any]) -> bool:
        """Return whether ``sample`` can be packed at all, raising or counting it if it cannot."""
        length = len(sample["tokens"])
        if length <= self.seq_len or self._can_split(sample):
            return True
        if self.on_too_long == "raise":
            raise ValueError(
                f"Sample {sample['sample_id']} (shard {sample.get('shard')}, row {sample.get('row')}) has {length} "
                f"tokens, more than seq_len={self.seq_len}. Raise seq_len, shorten the data, or set "
                "on_too_long='skip' to drop such samples."
            )
        self.stats["skipped_samples"] += 1
        self.stats["skipped_tokens"] += length
        self._count_skips({self.TOO_LONG: 1})
        return False

    def _piece_end(self, sample: Dict[str, Any], start: int, room: int) -> int:
        """Return the end of the piece of ``sample`` from token ``start`` that goes into ``room`` free tokens.

        The end is the sample's length when the rest fits. It is ``start`` when no piece goes in,
        because the sample cannot be cut or a cut would leave a piece shorter than ``min_piece_tokens``.
        """
        length = len(sample["tokens"])
        if length - start <= room:
            return length
        if not self._can_split(sample):
            return start
        # Fill the room, unless the rest would be shorter than min_piece_tokens. Then leave it exactly that many.
        piece = min(room, length - start - self.min_piece_tokens)
        return start + piece if piece >= self.min_piece_tokens else start

    def next(self) -> Dict[str, Any]:
        # Each document is (sample, start, end): tokens [start, end) of the sample.
        documents: List[Tuple[Dict[str, Any], int, int]] = []
        used = 0
        skipped_before = self.stats["skipped_samples"]
        if self._pending is not None:
            sample, start = self._pending, self._pending_start
            self._pending, self._pending_start = None, 0
            # The first document always gets a piece, because a sample that waits either fits whole
            # or can be cut, and min_piece_tokens leaves room for a piece in an empty sequence.
            end = self._piece_end(sample, start, self.seq_len)
            documents.append((sample, start, end))
            used = end - start
            if end < len(sample["tokens"]):
                self._pending, self._pending_start = sample, end

        # Samples skipped as too long since the last one that fitted, and their length range. A
        # call returns only after a sample fits or the source ends, so this run is a local count.
        run, shortest, longest = 0, None, 0
        while self._pending is None:
            try:
                sample = self._next_sample()
            except StopIteration:
                if documents:
                    break
                if self.stats["sequences"] == 0:
                    raise ValueError(self._nothing_packed_message(run, shortest, longest)) from None
                raise
            length = len(sample["tokens"])
            if not self._take(sample):
                run += 1
                shortest = length if shortest is None else min(shortest, length)
                longest = max(longest, length)
                if run >= self.max_consecutive_skips:
                    raise ValueError(
                        f"The packer skipped {run} samples in a row from {self.name}, because each was longer than "
                        f"seq_len={self.seq_len} (lengths {shortest} to {longest} tokens). Raise data.seq_len "
                        "above the sample lengths, and model.max_seq_len with it, or write shorter samples."
                    )
                continue
            run, shortest, longest = 0, None, 0
            end = self._piece_end(sample, 0, self.seq_len - used)
            if end == length or end > 0:
                documents.append((sample, 0, end))
                used += end
            if end < length:
                # The sample, or what is left of it after a cut, opens the next sequence.
                self._pending, self._pending_start = sample, end

        packed = self._pack(documents)
        packed["num_skipped"] = self.stats["skipped_samples"] - skipped_before
        packed["skipped"] = dict(self.skipped)
        self.stats["sequences"] += 1
        self.stats["samples"] += sum(start == 0 for _, start, _ in documents)
        self.stats["split_samples"] += sum(start == 0 and end < len(s["tokens"]) for s, start, end in documents)
        self.stats["tokens"] += used
        self.stats["padding_tokens"] += self.seq_len - used
        return packed

    def _nothing_packed_message(self, num_too_long: int, shortest: Optional[int], longest: int) -> str:
        reader_skips = {key: count for key, count in self.skipped.items() if key != self.TOO_LONG}
        if not num_too_long and not reader_skips:
            return f"No sequence could be packed from {self.name}: its source yielded no sample."
        causes, fixes = [], []
        if num_too_long:
            causes.append(f"{num_too_long} longer than seq_len={self.seq_len} (lengths {shortest} to {longest} tokens)")
            fixes.append(
                "Raise data.seq_len above the sample lengths, and model.max_seq_len with it, or write shorter samples."
            )
        if reader_skips:
            causes.append(f"invalid input skipped by the reader {reader_skips}")
            fixes.append("Fix the shards that the warnings above name.")
        return (
            f"No sequence could be packed from {self.name}, because every sample was skipped: "
            f"{', '.join(causes)}. " + " ".join(fixes)
        )

    def _pack(self, documents: List[Tuple[Dict[str, Any], int, int]]) -> Dict[str, Any]:
        tokens = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        labels = np.full(self.seq_len, CROSS_ENTROPY_IGNORE_INDEX, dtype=np.int64)
        input_pos = np.zeros(self.seq_len, dtype=np.int64)
        document_ids = np.zeros(self.seq_len, dtype=np.int64)

        position = 0
        for document, (sample, start, end) in enumerate(documents):
            ids = np.asarray(sample["tokens"][start:end], dtype=np.int64)
            stop = position + len(ids)
            tokens[position:stop] = ids
            labels[position : stop - 1] = ids[1:]
            input_pos[position:stop] = np.arange(len(ids))
            document_ids[position:stop] = document
            position = stop
        input_pos[position:] = np.arange(self.seq_len - position)
        document_ids[position:] = len(documents)

        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "input_pos": torch.from_numpy(input_pos),
            "document_ids": torch.from_numpy(document_ids),
            "sample_ids": [sample["sample_id"] for sample, _, _ in documents],
            "num_samples": len(documents),
        }

    def get_state(self) -> Dict[str, Any]:
        return {
            self.SOURCE_KEY: self.source.state_dict(),
            self.PENDING_KEY: self._pending,
            self.PENDING_START_KEY: self._pending_start,
            self.STATS_KEY: dict(self.stats),
            self.SKIPPED_KEY: dict(self.skipped),
        }


@functools.lru_cache(maxsize=8)
def causal_mask(seq_len: int, device: torch.device) -> torch.Tensor:
    """Return the bool [s, s] causal mask, True where ``j <= i``, built once per length and device.

    Every call with the same arguments returns the same tensor, so callers must not modify it.
    """
    return torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Build the attention mask of packed sequences: causal and within the same document.

    Args:
        document_ids (torch.Tensor): [b, s] document index per position.

    Returns:
        torch.Tensor: bool [b, s, s], True where query position ``i`` may attend to key position ``j``.
        The diagonal is always True, so no row is all False.
    """
    causal = causal_mask(document_ids.shape[-1], document_ids.device)
    same_document = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return same_document & causal


def collate_packed(sequences: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Stack packed sequences from ``Packer`` into a batch.

    Args:
        sequences (List[Dict[str, Any]]): packed sequences of equal length.

    Returns:
        Dict[str, Any]: ``tokens``, ``labels``, ``input_pos``, ``document_ids`` as LongTensor [b, s],
        ``mask`` as bool [b, s, s] (see ``packed_attention_mask``), ``sample_ids`` (one list per
        row), and ``num_samples`` and ``num_skipped`` summed over the batch. ``skipped`` contains the
        running skip counts of the last sequence (see ``Packer``).
    """
    batch = {key: torch.stack([s[key] for s in sequences]) for key in ("tokens", "labels", "input_pos", "document_ids")}
    batch["mask"] = packed_attention_mask(batch["document_ids"])
    batch["sample_ids"] = [s["sample_ids"] for s in sequences]
    batch["num_samples"] = sum(s["num_samples"] for s in sequences)
    batch["num_skipped"] = sum(s["num_skipped"] for s in sequences)
    batch["skipped"] = dict(sequences[-1].get("skipped", {}))
    return batch
