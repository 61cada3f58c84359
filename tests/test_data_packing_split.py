"""Tests of cutting text-only samples across packed sequences, against a reference packer built with plain loops."""

import json

import numpy as np
import pytest
import torch
from torchdata.nodes import IterableWrapper

from mol_tune.data.config import build_training_loader, build_validation_loaders, parse_data_config
from mol_tune.data.packing import Packer
from mol_tune.data.pipeline import build_dataloader
from mol_tune.data.shards import CodebookInfo, ShardInfo, ShardWriter
from mol_tune.vocab import VocabularyLayout

BASE_VOCAB = 50
BOS, EOS, PAD = 1, 2, 0
LAYOUT = VocabularyLayout(BASE_VOCAB, ({"name": "image", "num_codes": 8, "codebook_dim": 4},))
# Ids written out by hand: image codes 50-57, then the delimiters <img> 58 and </img> 59.
IMAGE_CODE_START, IMAGE_OPEN, IMAGE_CLOSE = 50, 58, 59
INFO = ShardInfo(dataset="synthetic", text_tokenizer="toy", modalities={"image": CodebookInfo(8, 4, "11" * 32)})
SEQ_LEN = 16


def random_samples(seed, count):
    """Return (sample_id, tokens) pairs: text-only ones up to 3.5 * SEQ_LEN long and mixed ones, some too long."""
    rng = np.random.default_rng(seed)
    samples = []
    for sample_id in range(count):
        if rng.random() < 0.5:
            tokens = rng.integers(3, BASE_VOCAB, int(rng.integers(1, 7 * SEQ_LEN // 2))).tolist()
        else:
            text = rng.integers(3, BASE_VOCAB, int(rng.integers(0, 6))).tolist()
            codes = (IMAGE_CODE_START + rng.integers(0, 8, int(rng.integers(1, SEQ_LEN)))).tolist()
            tokens = [BOS] + text + [IMAGE_OPEN] + codes + [IMAGE_CLOSE] + [EOS]
        samples.append((sample_id, tokens))
    return samples


def is_text_only(tokens):
    return all(token < BASE_VOCAB for token in tokens)


def reference_pack(samples, seq_len, min_piece, split=True):
    """Pack samples in order, cutting text-only ones when ``split``, and return (sequences, skipped ids).

    A sequence is a list of (sample_id, piece). A cut takes the longest piece that fits the room and
    leaves at least ``min_piece`` tokens on both sides, found by counting down from the room.
    """
    sequences, skipped = [[]], []
    for sample_id, tokens in samples:
        if not (split and is_text_only(tokens)):
            if len(tokens) > seq_len:
                skipped.append(sample_id)
                continue
            room = seq_len - sum(len(piece) for _, piece in sequences[-1])
            if len(tokens) > room:
                sequences.append([])
            sequences[-1].append((sample_id, list(tokens)))
            continue
        rest = list(tokens)
        while len(rest) > seq_len - sum(len(piece) for _, piece in sequences[-1]):
            cut = seq_len - sum(len(piece) for _, piece in sequences[-1])
            while cut > 0 and (cut < min_piece or len(rest) - cut < min_piece):
                cut -= 1
            if cut > 0:
                sequences[-1].append((sample_id, rest[:cut]))
                rest = rest[cut:]
            sequences.append([])
        sequences[-1].append((sample_id, rest))
    if not sequences[-1]:
        sequences.pop()
    return sequences, skipped


def reference_fields(sequence, seq_len):
    """tokens, labels, input_pos, document_ids and mask of one packed sequence, by plain loops."""
    tokens, labels, input_pos, documents = [], [], [], []
    for document, (_, piece) in enumerate(sequence):
        for i, token in enumerate(piece):
            tokens.append(token)
            labels.append(piece[i + 1] if i + 1 < len(piece) else -100)
            input_pos.append(i)
            documents.append(document)
    for i in range(seq_len - len(tokens)):
        tokens.append(PAD)
        labels.append(-100)
        input_pos.append(i)
        documents.append(len(sequence))
    mask = [[j <= i and documents[i] == documents[j] for j in range(seq_len)] for i in range(seq_len)]
    return {"tokens": tokens, "labels": labels, "input_pos": input_pos, "document_ids": documents, "mask": mask}


def take(loader, count):
    """Return the next ``count`` batches, reading no batch past them."""
    return [batch for _, batch in zip(range(count), loader)]


def pack(samples, **kwargs):
    stream = IterableWrapper([{"tokens": list(tokens), "sample_id": sample_id} for sample_id, tokens in samples])
    packer = Packer(stream, seq_len=SEQ_LEN, pad_id=PAD, **kwargs)
    return packer, list(packer)


def documents_of(sequence):
    """Return (sample_id, tokens) of each document of a packed sequence from ``Packer``, by plain loops."""
    tokens, documents = sequence["tokens"].tolist(), sequence["document_ids"].tolist()
    return [
        (sample_id, [t for t, d in zip(tokens, documents) if d == document])
        for document, sample_id in enumerate(sequence["sample_ids"])
    ]


def assert_matches_reference(sequences, expected):
    assert len(sequences) == len(expected)
    for sequence, reference in zip(sequences, expected):
        fields = reference_fields(reference, SEQ_LEN)
        for key in ("tokens", "labels", "input_pos", "document_ids"):
            assert sequence[key].tolist() == fields[key], key
        # Packed sequences get their mask in collate_packed, so only batch rows have one.
        if "mask" in sequence:
            assert sequence["mask"].tolist() == fields["mask"]
        assert sequence["sample_ids"] == [sample_id for sample_id, _ in reference]


@pytest.mark.parametrize("min_piece", [1, 2, 5])
def test_split_matches_reference(min_piece):
    samples = random_samples(seed=min_piece, count=300)
    assert any(is_text_only(t) and len(t) > 2 * SEQ_LEN for _, t in samples)
    assert any(not is_text_only(t) and len(t) > SEQ_LEN for _, t in samples)

    _, sequences = pack(samples, split_text_samples=True, layout=LAYOUT, min_piece_tokens=min_piece)
    expected, _ = reference_pack(samples, SEQ_LEN, min_piece)
    assert_matches_reference(sequences, expected)


def test_split_keeps_every_token():
    samples = random_samples(seed=7, count=300)
    packer, sequences = pack(samples, split_text_samples=True, layout=LAYOUT)

    pieces = {}
    for sequence in sequences:
        for sample_id, tokens in documents_of(sequence):
            pieces.setdefault(sample_id, []).append(tokens)
    text_only = {i: t for i, t in samples if is_text_only(t)}
    too_long = {i: t for i, t in samples if not is_text_only(t) and len(t) > SEQ_LEN}
    for sample_id, tokens in text_only.items():
        assert [t for piece in pieces[sample_id] for t in piece] == tokens
        assert min(len(piece) for piece in pieces[sample_id]) >= min(2, len(tokens))
    assert set(pieces) == set(dict(samples)) - set(too_long)

    tokens_in = sum(len(t) for _, t in samples)
    tokens_out = sum(len(t) for sequence in sequences for _, t in documents_of(sequence))
    assert tokens_out + sum(len(t) for t in too_long.values()) == tokens_in
    assert packer.stats["tokens"] == tokens_out
    assert packer.stats["skipped_tokens"] == sum(len(t) for t in too_long.values())
    assert packer.stats["samples"] == len(pieces)
    assert packer.stats["split_samples"] == sum(len(p) > 1 for p in pieces.values())
    assert packer.stats["split_samples"] > 0


def test_mixed_samples_never_cut():
    samples = random_samples(seed=8, count=300)
    _, sequences = pack(samples, split_text_samples=True, layout=LAYOUT)
    mixed = {i: t for i, t in samples if not is_text_only(t) and len(t) <= SEQ_LEN}
    found = {}
    for sequence in sequences:
        for sample_id, tokens in documents_of(sequence):
            if sample_id in mixed:
                found.setdefault(sample_id, []).append(tokens)
    assert found == {i: [t] for i, t in mixed.items()}


@pytest.mark.parametrize("split", [False, True])
def test_default_never_cuts(split):
    samples = random_samples(seed=9, count=200)
    kwargs = {"split_text_samples": True, "layout": LAYOUT} if split else {}
    packer, sequences = pack(samples, **kwargs)
    expected, skipped = reference_pack(samples, SEQ_LEN, 2, split=split)
    assert_matches_reference(sequences, expected)
    assert packer.stats["skipped_samples"] == len(skipped)
    if not split:
        assert any(is_text_only(dict(samples)[i]) for i in skipped)


def test_packer_resumes_mid_sample():
    samples = random_samples(seed=10, count=120)

    def fresh_packer():
        stream = IterableWrapper([{"tokens": list(t), "sample_id": i} for i, t in samples])
        return Packer(stream, seq_len=SEQ_LEN, pad_id=PAD, split_text_samples=True, layout=LAYOUT)

    reference = list(fresh_packer())
    stops_inside_sample = 0
    for stop in range(1, len(reference)):
        first = fresh_packer()
        head = [next(first) for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))
        stops_inside_sample += state[Packer.PENDING_START_KEY] > 0

        resumed = fresh_packer()
        resumed.reset(state)
        for actual, expected in zip(head + list(resumed), reference, strict=True):
            for key in ("tokens", "labels", "input_pos", "document_ids"):
                assert torch.equal(actual[key], expected[key]), (stop, key)
            assert actual["sample_ids"] == expected["sample_ids"]
    assert stops_inside_sample >= 5


def test_split_options_checked():
    stream = IterableWrapper([])
    with pytest.raises(ValueError, match="Missing layout"):
        Packer(stream, seq_len=SEQ_LEN, split_text_samples=True)
    with pytest.raises(ValueError, match=r"Invalid min_piece_tokens: 9 for seq_len=16. It must be from 1 to 8"):
        Packer(stream, seq_len=SEQ_LEN, split_text_samples=True, layout=LAYOUT, min_piece_tokens=9)
    with pytest.raises(ValueError, match="Invalid min_piece_tokens: 0"):
        Packer(stream, seq_len=SEQ_LEN, split_text_samples=True, layout=LAYOUT, min_piece_tokens=0)


def write_shards(directory, seed):
    """Write two shards of text-only and text-and-image rows, and return the paths and (sample_id, tokens) pairs.

    The tokens are those ``SampleBuilder`` gives in stored order, with BOS and EOS.
    """
    rng = np.random.default_rng(seed)
    paths, samples = [], []
    for file_index in range(2):
        path = str(directory / f"shard_{file_index}.parquet")
        with ShardWriter(path, INFO, row_group_size=8) as writer:
            for row in range(25):
                sample_id = 100 * file_index + row
                text = rng.integers(3, BASE_VOCAB, int(rng.integers(1, 3 * SEQ_LEN))).tolist()
                if row % 3 == 0:
                    codes = rng.integers(0, 8, int(rng.integers(1, SEQ_LEN - 2))).tolist()
                    segments = [("text", text[: SEQ_LEN // 4]), ("image", codes)]
                    tokens = [BOS] + text[: SEQ_LEN // 4] + [IMAGE_OPEN]
                    tokens += [IMAGE_CODE_START + c for c in codes] + [IMAGE_CLOSE, EOS]
                else:
                    segments = [("text", text)]
                    tokens = [BOS] + text + [EOS]
                writer.write(sample_id, segments)
                samples.append((sample_id, tokens))
        paths.append(path)
    return paths, samples


def test_validation_loader_splits_from_config(tmp_path):
    paths, samples = write_shards(tmp_path, seed=0)
    section = {
        "train": paths, "validation": paths, "seq_len": SEQ_LEN, "batch_size": 3, "bos_id": BOS, "eos_id": EOS,
        "pad_id": PAD, "shuffle_segments": False, "split_text_samples": True,
    }  # fmt: skip
    assert parse_data_config(section).split_text_samples is True
    batches = list(build_validation_loaders(section, LAYOUT)["default"])

    expected, _ = reference_pack(samples, SEQ_LEN, 2)
    rows = [
        {key: batch[key][row] for key in ("tokens", "labels", "input_pos", "document_ids", "mask")}
        | {"sample_ids": batch["sample_ids"][row]}
        for batch in batches
        for row in range(len(batch["tokens"]))
    ]
    assert_matches_reference(rows, expected)
    assert any(len(t) > SEQ_LEN for _, t in samples if is_text_only(t))

    # Without the option the training loader would skip every long text-only sample.
    loader, _ = build_training_loader(section, LAYOUT)
    ids = {i for batch in take(loader, 10) for row in batch["sample_ids"] for i in row}
    assert ids <= {i for i, _ in samples}
    assert ids & {i for i, t in samples if is_text_only(t) and len(t) > SEQ_LEN}


def test_config_rejects_non_bool_split():
    section = {"train": "x", "seq_len": SEQ_LEN, "batch_size": 2, "split_text_samples": "yes"}
    with pytest.raises(ValueError, match="Invalid data.split_text_samples: 'yes'"):
        parse_data_config(section)


def test_loader_resumes_mid_sample(tmp_path):
    paths, _ = write_shards(tmp_path, seed=1)
    kwargs = dict(seq_len=SEQ_LEN, batch_size=2, seed=3, bos_id=BOS, eos_id=EOS, split_text_samples=True)
    loader = build_dataloader(paths, LAYOUT, **kwargs)
    reference = take(loader, 40)
    # A stop inside a sample: the last document of one batch continues in the first of the next.
    stop = next(k for k in range(1, 40) if reference[k - 1]["sample_ids"][-1][-1] == reference[k]["sample_ids"][0][0])

    first = build_dataloader(paths, LAYOUT, **kwargs)
    head = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    resumed = build_dataloader(paths, LAYOUT, **kwargs)
    resumed.load_state_dict(state)
    tail = take(resumed, 40 - stop)

    for actual, expected in zip(head + tail, reference, strict=True):
        for key in ("tokens", "labels", "input_pos", "document_ids", "mask"):
            assert torch.equal(actual[key], expected[key]), key
        assert actual["sample_ids"] == expected["sample_ids"]
