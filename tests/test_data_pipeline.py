"""Tests of the data pipeline on small synthetic shards, against references built with plain loops."""

import itertools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchdata.nodes import IterableWrapper

from mol_tune.data.packing import Packer, causal_mask, packed_attention_mask
from mol_tune.data.pipeline import build_dataloader, build_sample_node
from mol_tune.data.samples import SampleBuilder
from mol_tune.data.shards import SCHEMA, CodebookInfo, ShardError, ShardInfo, ShardWriter
from mol_tune.data.source import ShardSource
from mol_tune.vocab import VocabularyLayout

BASE_VOCAB = 50
BOS, EOS, PAD = 1, 2, 0
LAYOUT = VocabularyLayout(
    BASE_VOCAB,
    (
        {"name": "image", "num_codes": 8, "codebook_dim": 4},
        {"name": "speech", "num_codes": 5, "codebook_dim": 3},
    ),
)
# The ids the layout should give, written out by hand: codes after the base vocabulary, then delimiters.
IMAGE_CODE_START, SPEECH_CODE_START = 50, 58
DELIMITERS = {"image": (63, 64), "speech": (65, 66)}
CODE_START = {"image": IMAGE_CODE_START, "speech": SPEECH_CODE_START}
FINGERPRINTS = {"image": "11" * 32, "speech": "22" * 32}
INFO = ShardInfo(
    dataset="synthetic",
    text_tokenizer="toy",
    modalities={
        "image": CodebookInfo(8, 4, FINGERPRINTS["image"]),
        "speech": CodebookInfo(5, 3, FINGERPRINTS["speech"]),
    },
)
SEQ_LEN = 32


def make_samples(file_index, num_rows, seed):
    """Return random samples of text, image and sometimes speech segments. Every 7th is longer than SEQ_LEN."""
    rng = np.random.default_rng(seed)
    samples = []
    for row in range(num_rows):
        text_length = 40 if row % 7 == 3 else int(rng.integers(1, 9))
        segments = [
            ("text", rng.integers(3, BASE_VOCAB, text_length).tolist()),
            ("image", rng.integers(0, 8, int(rng.integers(2, 7))).tolist()),
        ]
        if rng.random() < 0.4:
            segments.append(("speech", rng.integers(0, 5, int(rng.integers(1, 11))).tolist()))
        if rng.random() < 0.5:
            segments.reverse()
        samples.append((1000 * file_index + row, segments))
    return samples


@pytest.fixture
def shards(tmp_path):
    """Write three shards of 23, 17 and 29 rows and return (paths, {sample_id: segments})."""
    paths, by_id = [], {}
    for file_index, num_rows in enumerate((23, 17, 29)):
        path = str(tmp_path / f"shard_{file_index}.parquet")
        with ShardWriter(path, INFO, row_group_size=8) as writer:
            for sample_id, segments in make_samples(file_index, num_rows, seed=file_index):
                writer.write(sample_id, segments)
                by_id[sample_id] = segments
        paths.append(path)
    return paths, by_id


def reference_tokens(segments, order):
    """Vocabulary ids of one sample with BOS and EOS, segments in ``order``, by plain loops."""
    ids = [BOS]
    for index in order:
        modality, tokens = segments[index]
        if modality == "text":
            ids.extend(tokens)
        else:
            open_id, close_id = DELIMITERS[modality]
            ids.append(open_id)
            for code in tokens:
                ids.append(CODE_START[modality] + code)
            ids.append(close_id)
    ids.append(EOS)
    return ids


def reference_sequences(samples, seq_len):
    """Pack token lists greedily and return the packed sequences and the skipped samples."""
    sequences, current, skipped = [], [], []
    for tokens in samples:
        if len(tokens) > seq_len:
            skipped.append(tokens)
            continue
        if sum(len(t) for t in current) + len(tokens) > seq_len:
            sequences.append(current)
            current = []
        current.append(tokens)
    if current:
        sequences.append(current)
    return sequences, skipped


def reference_fields(sequence, seq_len):
    """tokens, labels, input_pos and mask of one packed sequence, by plain loops."""
    tokens, labels, input_pos, documents = [], [], [], []
    for document, sample in enumerate(sequence):
        for i, token in enumerate(sample):
            tokens.append(token)
            labels.append(sample[i + 1] if i + 1 < len(sample) else -100)
            input_pos.append(i)
            documents.append(document)
    for i in range(seq_len - len(tokens)):
        tokens.append(PAD)
        labels.append(-100)
        input_pos.append(i)
        documents.append(len(sequence))
    mask = [[j <= i and documents[i] == documents[j] for j in range(seq_len)] for i in range(seq_len)]
    return tokens, labels, input_pos, mask


def take(loader, count):
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        for key in ("tokens", "labels", "input_pos", "document_ids", "mask"):
            assert torch.equal(a[key], e[key]), key
        assert a["sample_ids"] == e["sample_ids"]


def test_batches_match_reference_in_stored_order(shards):
    paths, by_id = shards
    loader = build_dataloader(
        paths, LAYOUT, seq_len=SEQ_LEN, batch_size=3, bos_id=BOS, eos_id=EOS, pad_id=PAD,
        shuffle=False, shuffle_segments=False, infinite=False, codebook_fingerprints=FINGERPRINTS,
    )
    batches = list(loader)

    samples = [reference_tokens(segments, range(len(segments))) for segments in by_id.values()]
    sequences, _ = reference_sequences(samples, SEQ_LEN)
    rows = [row for batch in batches for row in range(len(batch["tokens"]))]
    assert len(rows) == len(sequences)

    flat = [(batch, row) for batch in batches for row in range(len(batch["tokens"]))]
    for (batch, row), sequence in zip(flat, sequences):
        tokens, labels, input_pos, mask = reference_fields(sequence, SEQ_LEN)
        assert batch["tokens"][row].tolist() == tokens
        assert batch["labels"][row].tolist() == labels
        assert batch["input_pos"][row].tolist() == input_pos
        assert batch["mask"][row].tolist() == mask
    assert [len(b["tokens"]) for b in batches[:-1]] == [3] * (len(batches) - 1)


def test_batch_dtypes_and_shapes(shards):
    paths, _ = shards
    batch = next(iter(build_dataloader(paths, LAYOUT, seq_len=SEQ_LEN, batch_size=2, bos_id=BOS, eos_id=EOS)))
    for key in ("tokens", "labels", "input_pos", "document_ids"):
        assert batch[key].dtype == torch.long
        assert batch[key].shape == (2, SEQ_LEN)
    assert batch["mask"].dtype == torch.bool
    assert batch["mask"].shape == (2, SEQ_LEN, SEQ_LEN)
    assert batch["mask"].any(dim=-1).all()


def test_packing_conserves_samples_and_tokens(shards):
    paths, by_id = shards
    samples = build_sample_node(paths, LAYOUT, seed=5, bos_id=BOS, eos_id=EOS, infinite=False)
    packer = Packer(samples, seq_len=SEQ_LEN, pad_id=PAD)
    sequences = list(packer)

    packed_ids, packed_tokens = [], 0
    for sequence in sequences:
        documents = sequence["document_ids"].tolist()
        tokens = sequence["tokens"].tolist()
        for document, sample_id in enumerate(sequence["sample_ids"]):
            piece = [t for t, d in zip(tokens, documents) if d == document]
            segments = by_id[sample_id]
            allowed = [reference_tokens(segments, order) for order in itertools.permutations(range(len(segments)))]
            assert piece in allowed
            packed_tokens += len(piece)
        packed_ids.extend(sequence["sample_ids"])

    lengths = {i: len(reference_tokens(s, range(len(s)))) for i, s in by_id.items()}
    too_long = [i for i, length in lengths.items() if length > SEQ_LEN]
    assert len(too_long) > 0
    assert sorted(packed_ids + too_long) == sorted(by_id)
    assert packed_tokens + packer.stats["skipped_tokens"] == sum(lengths.values())
    assert packer.stats["skipped_samples"] == len(too_long)
    assert sum(s["num_skipped"] for s in sequences) == len(too_long)
    assert packer.stats["tokens"] == packed_tokens


def test_packing_raises_on_too_long(shards):
    paths, by_id = shards
    length = len(reference_tokens(by_id[3], range(len(by_id[3]))))
    samples = build_sample_node(
        paths, LAYOUT, bos_id=BOS, eos_id=EOS, shuffle=False, shuffle_segments=False, infinite=False
    )
    packer = Packer(samples, seq_len=SEQ_LEN, on_too_long="raise")
    with pytest.raises(ValueError, match=rf"Sample 3 \(shard .*shard_0.parquet, row 3\) has {length} tokens"):
        list(packer)


def test_segment_order_random_and_reproducible(shards):
    paths, by_id = shards
    source = ShardSource(paths, LAYOUT, shuffle=False, infinite=False)
    builder = SampleBuilder(LAYOUT, seed=0, bos_id=BOS, eos_id=EOS)
    stored_first, reordered = 0, 0
    for sample in source:
        built = builder(sample)
        assert builder(sample) == built
        segments = by_id[sample["sample_id"]]
        if built["tokens"] == reference_tokens(segments, range(len(segments))):
            stored_first += 1
        else:
            reordered += 1
    assert stored_first > 5
    assert reordered > 5


def test_span_ids_follow_segments(shards):
    paths, by_id = shards
    source = ShardSource(paths, LAYOUT, shuffle=False, infinite=False)
    builder = SampleBuilder(LAYOUT, seed=0, bos_id=BOS, eos_id=EOS, shuffle_segments=False)
    for sample in source:
        built = builder(sample)
        expected = [0]
        for index, (modality, tokens) in enumerate(by_id[sample["sample_id"]]):
            expected.extend([index] * (len(tokens) + (0 if modality == "text" else 2)))
        expected.append(expected[-1])
        assert built["spans"] == expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted_run(shards, num_workers):
    paths, _ = shards
    kwargs = dict(seq_len=SEQ_LEN, batch_size=2, seed=3, bos_id=BOS, eos_id=EOS, num_workers=num_workers)
    # 69 samples make about 20 sequences an epoch, so 25 batches cross an epoch boundary.
    reference = take(build_dataloader(paths, LAYOUT, **kwargs), 25)

    first = build_dataloader(paths, LAYOUT, **kwargs)
    head = take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))

    resumed = build_dataloader(paths, LAYOUT, **kwargs)
    resumed.load_state_dict(state)
    tail = take(resumed, 18)

    assert_batches_equal(head, reference[:7])
    assert_batches_equal(tail, reference[7:])


def test_resume_rejects_other_seed(shards):
    paths, _ = shards
    first = build_dataloader(paths, LAYOUT, seq_len=SEQ_LEN, seed=0)
    take(first, 2)
    state = first.state_dict()
    other = build_dataloader(paths, LAYOUT, seq_len=SEQ_LEN, seed=1)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        take(other, 1)


def test_ranks_read_disjoint_rows(shards):
    paths, by_id = shards
    seen = []
    for rank in range(3):
        source = ShardSource(paths, LAYOUT, seed=4, infinite=False, rank=rank, world_size=3)
        seen.append([s["sample_id"] for s in source])
    for a, b in itertools.combinations(seen, 2):
        assert not set(a) & set(b)
    assert sorted(itertools.chain(*seen)) == sorted(by_id)
    assert max(map(len, seen)) - min(map(len, seen)) <= len(paths)


def test_one_pass_reshuffles_each_pass(shards):
    paths, by_id = shards
    source = ShardSource(paths, LAYOUT, seed=0, infinite=False)
    first = [s["sample_id"] for s in source]
    source.reset()
    second = [s["sample_id"] for s in source]
    assert sorted(first) == sorted(by_id)
    assert sorted(second) == sorted(by_id)
    assert first != second


def test_unshuffled_passes_repeat_exactly(shards):
    paths, by_id = shards
    loader = build_dataloader(
        paths, LAYOUT, seq_len=SEQ_LEN, batch_size=2, bos_id=BOS, eos_id=EOS, shuffle=False, infinite=False
    )
    first = list(loader)
    second = list(loader)
    assert_batches_equal(second, first)

    starts = set()
    for batch in first:
        for row in range(batch["tokens"].shape[0]):
            is_sample = batch["document_ids"][row] < len(batch["sample_ids"][row])
            starts.update(batch["tokens"][row][(batch["input_pos"][row] == 1) & is_sample].tolist())
    assert DELIMITERS["image"][0] in starts
    assert any(token < BASE_VOCAB for token in starts)


def test_infinite_source_continues_next_epoch(shards):
    paths, by_id = shards
    source = ShardSource(paths, LAYOUT, seed=0, infinite=True)
    samples = [next(source) for _ in range(2 * len(by_id) + 5)]
    epochs = [s["epoch"] for s in samples]
    assert epochs == [0] * len(by_id) + [1] * len(by_id) + [2] * 5
    assert sorted(s["sample_id"] for s in samples[len(by_id) : 2 * len(by_id)]) == sorted(by_id)


def test_folder_expands_to_sorted_shards(shards, tmp_path):
    paths, by_id = shards
    source = ShardSource(str(tmp_path), LAYOUT, shuffle=False, infinite=False)
    assert source.paths == sorted(paths)
    assert [s["sample_id"] for s in source] == sorted(by_id)


def test_fingerprint_mismatch_names_file(shards):
    paths, _ = shards
    with pytest.raises(ShardError, match=r"shard_0\.parquet: the image codebook fingerprint"):
        build_dataloader(paths, LAYOUT, codebook_fingerprints={"image": "99" * 32, "speech": FINGERPRINTS["speech"]})


def test_bad_row_names_file_and_row(tmp_path):
    rows = [
        {"sample_id": i, "segments": [{"modality": "text", "tokens": [5, 6]}, {"modality": "image", "tokens": [1]}]}
        for i in range(6)
    ]
    rows[4]["segments"][1]["tokens"] = [1, 8]
    path = str(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(INFO.to_metadata())), path)
    loader = build_dataloader(path, LAYOUT, seq_len=SEQ_LEN, shuffle=False, infinite=False)
    with pytest.raises(ShardError, match=r"bad\.parquet, row 4: segment 1 \(image\) has code 8"):
        list(loader)


def test_unreadable_shard_names_file(tmp_path):
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match="garbage.parquet"):
        build_dataloader(str(path), LAYOUT)


def length_stream(lengths, limit):
    """Yield samples of the given lengths, then raise after ``limit`` samples in all.

    The error ends what would otherwise be an endless source, so a packer that never gives up
    fails the test instead of hanging it.
    """
    for index, length in enumerate(itertools.islice(lengths, limit)):
        yield {"tokens": [7] * length, "sample_id": index}
    raise RuntimeError(f"the source ran out after {limit} samples")


def test_packer_raises_when_nothing_fits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(SEQ_LEN + 1, 3 * SEQ_LEN, 10_000).tolist()
    packer = Packer(IterableWrapper(length_stream(iter(lengths), 10_000)), seq_len=SEQ_LEN, max_consecutive_skips=500)
    with pytest.raises(ValueError) as caught:
        next(packer)
    message = str(caught.value)
    assert "skipped 500 samples in a row" in message
    assert f"seq_len={SEQ_LEN}" in message
    assert f"lengths {min(lengths[:500])} to {max(lengths[:500])} tokens" in message
    assert "data.seq_len" in message
    assert "model.max_seq_len" in message


def test_packer_bound_counts_consecutive_skips():
    # Runs of 400 too long samples, each ended by one that fits, never reach a bound of 500.
    lengths = itertools.cycle([SEQ_LEN + 1] * 400 + [SEQ_LEN])
    packer = Packer(IterableWrapper(length_stream(lengths, 100_000)), seq_len=SEQ_LEN, max_consecutive_skips=500)
    sequences = [next(packer) for _ in range(5)]
    assert [s["num_skipped"] for s in sequences] == [800, 400, 400, 400, 400]
    assert sequences[-1]["skipped"] == {"samples/too_long": 2400}


def test_one_pass_with_nothing_packed_raises(shards):
    paths, by_id = shards
    lengths = [len(reference_tokens(s, range(len(s)))) for s in by_id.values()]
    seq_len = min(lengths) - 1
    name = "the validation split of data set 'toy'"
    loader = build_dataloader(paths, LAYOUT, seq_len=seq_len, bos_id=BOS, eos_id=EOS, infinite=False, name=name)
    with pytest.raises(ValueError) as caught:
        list(loader)
    message = str(caught.value)
    assert "from the validation split of data set 'toy'" in message
    assert f"{len(lengths)} longer than seq_len={seq_len} (lengths {min(lengths)} to {max(lengths)} tokens)" in message
    assert "data.seq_len" in message


def test_causal_mask_built_once_per_length():
    cpu = torch.device("cpu")
    mask = causal_mask(12, cpu)
    assert causal_mask(12, cpu) is mask
    assert mask.tolist() == [[j <= i for j in range(12)] for i in range(12)]
    assert causal_mask(5, cpu).tolist() == [[j <= i for j in range(5)] for i in range(5)]


def test_attention_mask_matches_loop():
    rng = np.random.default_rng(1)
    for seq_len in (7, 16, 7):
        document_ids = torch.from_numpy(np.sort(rng.integers(0, 4, (3, seq_len)), axis=-1))
        mask = packed_attention_mask(document_ids)
        for row, documents in enumerate(document_ids.tolist()):
            expected = [[j <= i and documents[i] == documents[j] for j in range(seq_len)] for i in range(seq_len)]
            assert mask[row].tolist() == expected
