"""Tests of token-share mixing on small synthetic data sets, against counts made with plain loops."""

import io
import itertools

import numpy as np
import pytest
import torch

from mol_tune.data.config import build_training_loader, build_validation_loaders, parse_data_config
from mol_tune.data.mixture import DatasetProfile, count_modality_tokens, measure_dataset_profile, solve_mixture
from mol_tune.data.pipeline import build_mixture_dataloader
from mol_tune.data.shards import CodebookInfo, ShardInfo, ShardReader, ShardWriter
from mol_tune.vocab import VocabularyLayout

BASE_VOCAB = 50
EOS, PAD = 2, 0
LAYOUT = VocabularyLayout(
    BASE_VOCAB,
    ({"name": "image", "num_codes": 8, "codebook_dim": 4}, {"name": "speech", "num_codes": 6, "codebook_dim": 3}),
)
NAMES = ["text", "image", "speech"]
# Id ranges written out by hand: image codes 50-57, speech codes 58-63, then four delimiters (text).
IMAGE_IDS, SPEECH_IDS = range(50, 58), range(58, 64)
INFO = ShardInfo(
    dataset="synthetic",
    text_tokenizer="toy",
    modalities={"image": CodebookInfo(8, 4, "11" * 32), "speech": CodebookInfo(6, 3, "22" * 32)},
)
SEQ_LEN = 64


def captions_sample(rng):
    return [("text", rng.integers(3, BASE_VOCAB, int(rng.integers(2, 9))).tolist()),
            ("image", rng.integers(0, 8, int(rng.integers(10, 31))).tolist())]


def speech_sample(rng):
    return [("speech", rng.integers(0, 6, int(rng.integers(10, 41))).tolist()),
            ("text", rng.integers(3, BASE_VOCAB, int(rng.integers(1, 6))).tolist())]


def prose_sample(rng):
    return [("text", rng.integers(3, BASE_VOCAB, int(rng.integers(5, 31))).tolist())]


def long_sample(rng):
    """A sample of 70 image codes, longer than SEQ_LEN, which the packer skips."""
    return [("text", [5, 6]), ("image", rng.integers(0, 8, 70).tolist())]


MAKERS = {"captions": captions_sample, "speech": speech_sample, "prose": prose_sample}


def write_dataset(directory, name, num_rows, seed, id_offset, num_files=2, long_every=0):
    """Write ``num_rows`` samples of kind ``name`` into ``num_files`` shards; return (paths, {id: segments})."""
    rng = np.random.default_rng(seed)
    paths, by_id = [], {}
    rows_per_file = -(-num_rows // num_files)
    for file_index in range(num_files):
        path = str(directory / f"{name}_{file_index}.parquet")
        with ShardWriter(path, INFO, row_group_size=16) as writer:
            for row in range(file_index * rows_per_file, min(num_rows, (file_index + 1) * rows_per_file)):
                long = long_every and row % long_every == long_every - 1
                segments = long_sample(rng) if long else MAKERS[name](rng)
                writer.write(id_offset + row, segments)
                by_id[id_offset + row] = segments
        paths.append(path)
    return paths, by_id


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Three data sets: captions (text + image), speech (speech + text) and prose (text only)."""
    directory = tmp_path_factory.mktemp("mixture")
    result = {}
    for index, (name, rows) in enumerate([("captions", 150), ("speech", 110), ("prose", 90)]):
        result[name] = write_dataset(directory, name, rows, seed=index, id_offset=10_000 * index, long_every=13)
    return result


def reference_counts(segments):
    """Tokens per modality [text, image, speech] of one sample after sample construction, with EOS, by hand."""
    counts = [1, 0, 0]
    for modality, tokens in segments:
        if modality == "text":
            counts[0] += len(tokens)
        else:
            counts[NAMES.index(modality)] += len(tokens)
            counts[0] += 2
    return counts


def reference_batch_counts(batch):
    """Tokens per modality in a packed batch, padding left out, by a loop over positions."""
    counts = [0, 0, 0]
    for row in range(batch["tokens"].shape[0]):
        num_samples = len(batch["sample_ids"][row])
        for token, document in zip(batch["tokens"][row].tolist(), batch["document_ids"][row].tolist()):
            if document >= num_samples:
                continue
            if token in IMAGE_IDS:
                counts[1] += 1
            elif token in SPEECH_IDS:
                counts[2] += 1
            else:
                counts[0] += 1
    return counts


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a["sample_ids"] == e["sample_ids"]
        for key in ("tokens", "labels", "input_pos", "document_ids", "mask"):
            assert torch.equal(a[key], e[key]), key


def paths_of(datasets, *names):
    return {name: datasets[name][0] for name in names}


def test_profile_matches_loop(datasets):
    paths, by_id = datasets["captions"]
    profile = measure_dataset_profile("captions", paths, LAYOUT, eos_id=EOS, max_sample_tokens=SEQ_LEN)
    admitted = [reference_counts(s) for s in by_id.values() if sum(reference_counts(s)) <= SEQ_LEN]
    assert profile.num_samples == len(admitted)
    assert profile.num_excluded == len(by_id) - len(admitted)
    assert profile.num_excluded > 0
    np.testing.assert_allclose(profile.mean_tokens, np.mean(admitted, axis=0), rtol=1e-12)


def test_profile_keeps_long_text_when_split(tmp_path):
    samples = [
        [("text", [5, 6, 7])],
        [("text", list(range(10, 10 + SEQ_LEN + 9)))],
        [("text", [5, 6])] + [("image", list(range(8)) * 9)],
    ]
    path = str(tmp_path / "long_text.parquet")
    with ShardWriter(path, INFO) as writer:
        for sample_id, segments in enumerate(samples):
            writer.write(sample_id, segments)

    profile = measure_dataset_profile(
        "long_text", [path], LAYOUT, eos_id=EOS, max_sample_tokens=SEQ_LEN, keep_long_text_samples=True
    )
    admitted = [reference_counts(samples[0]), reference_counts(samples[1])]
    assert sum(admitted[1]) > SEQ_LEN
    assert sum(reference_counts(samples[2])) > SEQ_LEN
    assert profile.num_samples == 2
    assert profile.num_excluded == 1
    np.testing.assert_allclose(profile.mean_tokens, np.mean(admitted, axis=0), rtol=1e-12)


def test_profile_span_limit_excludes(datasets):
    paths, by_id = datasets["speech"]
    profile = measure_dataset_profile("speech", paths, LAYOUT, eos_id=EOS, max_span_tokens={"speech": 20})
    admitted = [reference_counts(s) for s in by_id.values() if all(len(t) <= 20 for m, t in s if m == "speech")]
    assert 0 < len(admitted) < len(by_id)
    assert profile.num_samples == len(admitted)
    np.testing.assert_allclose(profile.mean_tokens, np.mean(admitted, axis=0), rtol=1e-12)


def test_mixture_reaches_token_shares(datasets):
    """Over 10,000 packed sequences, each modality's share of tokens is within 2 points of its target."""
    # Sampling by data set size gives about image 0.32, speech 0.29, text 0.40, far from this target.
    target = {"image": 0.45, "speech": 0.2, "text": 0.35}
    loader, plan = build_mixture_dataloader(
        paths_of(datasets, "captions", "speech", "prose"), LAYOUT, token_shares=target,
        seq_len=SEQ_LEN, batch_size=50, seed=7, eos_id=EOS, pad_id=PAD,
    )  # fmt: skip
    counts = np.zeros(3)
    for batch in take(loader, 200):
        counts += reference_batch_counts(batch)
    measured = dict(zip(NAMES, counts / counts.sum()))
    for name, share in target.items():
        assert abs(measured[name] - share) < 0.02, (name, measured)
        assert abs(plan.expected_shares[name] - share) < 1e-3
    assert set(plan.sampling_weights) == {"captions", "speech", "prose"}


def test_count_modality_tokens_matches_loop(datasets):
    loader, _ = build_mixture_dataloader(
        paths_of(datasets, "captions", "speech"), LAYOUT, seq_len=SEQ_LEN, batch_size=4, eos_id=EOS, pad_id=PAD
    )
    for batch in take(loader, 5):
        assert count_modality_tokens(batch, LAYOUT).tolist() == reference_batch_counts(batch)


def test_no_shares_samples_by_size(datasets):
    profiles = [
        measure_dataset_profile(name, datasets[name][0], LAYOUT, eos_id=EOS, max_sample_tokens=SEQ_LEN)
        for name in ("captions", "prose")
    ]
    plan = solve_mixture(profiles)
    sizes = {p.name: p.num_samples for p in profiles}
    for name, weight in plan.sampling_weights.items():
        assert weight == pytest.approx(sizes[name] / sum(sizes.values()))
    assert plan.target_shares is None


def profile(name, text, image):
    return DatasetProfile(name, ("text", "image", "speech"), (text, image, 0.0), num_samples=10, num_excluded=0)


def test_unreachable_shares_raise_with_range():
    profiles = [profile("captions", 10.0, 15.0), profile("prose", 40.0, 0.0)]
    with pytest.raises(ValueError, match=r"Unreachable token_shares.*image 0\.000 to 0\.600.*Closest reachable: "
                       r"text 0\.400, image 0\.600"):  # fmt: skip
        solve_mixture(profiles, {"image": 0.65, "text": 0.35})


def test_unreachable_closest_matches_grid():
    profiles = [profile("captions", 10.0, 15.0), profile("both", 30.0, 10.0), profile("prose", 40.0, 0.0)]
    target = np.array([0.2, 0.7, 0.1])
    plan = solve_mixture(profiles, dict(zip(NAMES, target)), on_unreachable="closest")

    # Reference: the closest point of a fine grid over the simplex of token fractions.
    compositions = np.array([[0.4, 0.6, 0.0], [0.75, 0.25, 0.0], [1.0, 0.0, 0.0]])
    best = min(
        (np.sum((compositions.T @ np.array([a, b, 1 - a - b]) - target) ** 2), a, b)
        for a, b in itertools.product(np.linspace(0, 1, 201), repeat=2)
        if a + b <= 1 + 1e-12
    )
    expected = compositions.T @ np.array([best[1], best[2], 1 - best[1] - best[2]])
    actual = np.array([plan.expected_shares[n] for n in NAMES])
    np.testing.assert_allclose(actual, expected, atol=2e-3)


def test_equal_data_sets_both_sampled():
    """Two data sets with the same composition share the tokens instead of one getting none."""
    profiles = [profile("first", 10.0, 15.0), profile("second", 20.0, 30.0), profile("prose", 40.0, 0.0)]
    plan = solve_mixture(profiles, {"image": 0.3, "text": 0.7})
    assert plan.token_fractions["first"] > 0.1
    assert plan.token_fractions["second"] > 0.1
    assert plan.expected_shares["image"] == pytest.approx(0.3, abs=1e-4)
    # Per sample, "second" has twice the tokens of "first", so it needs half the weight for equal tokens.
    ratio = plan.sampling_weights["first"] / plan.sampling_weights["second"]
    assert ratio == pytest.approx(2 * plan.token_fractions["first"] / plan.token_fractions["second"])


def test_unused_data_set_not_sampled(datasets):
    profiles = [profile("captions", 10.0, 15.0), profile("prose", 40.0, 0.0)]
    plan = solve_mixture(profiles, {"image": 0.6, "text": 0.4})
    assert plan.sampling_weights == {"captions": 1.0}
    assert plan.token_fractions["prose"] == 0.0


@pytest.mark.parametrize(
    "shares, message",
    [
        ({"image": 0.5, "text": 0.6}, "sum to 1.1"),
        ({"image": 1.5, "text": -0.5}, ">= 0"),
        ({"video": 0.5, "text": 0.5}, r"\['video'\] are not in the model"),
    ],
)
def test_invalid_shares_raise(shares, message):
    with pytest.raises(ValueError, match=message):
        solve_mixture([profile("captions", 10.0, 15.0), profile("prose", 40.0, 0.0)], shares)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted_run(datasets, num_workers):
    kwargs = dict(
        token_shares={"image": 0.3, "speech": 0.3, "text": 0.4}, seq_len=SEQ_LEN, batch_size=3, seed=11,
        eos_id=EOS, pad_id=PAD, num_workers=num_workers,
    )  # fmt: skip
    datasets_paths = paths_of(datasets, "captions", "speech", "prose")
    # About 8 samples a batch and 350 samples in all, so 60 batches cross every data set's epoch end.
    reference = take(build_mixture_dataloader(datasets_paths, LAYOUT, **kwargs)[0], 60)

    first, _ = build_mixture_dataloader(datasets_paths, LAYOUT, **kwargs)
    head = take(first, 23)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    resumed, _ = build_mixture_dataloader(datasets_paths, LAYOUT, **kwargs)
    resumed.load_state_dict(state)
    tail = take(resumed, 37)

    assert_batches_equal(head, reference[:23])
    assert_batches_equal(tail, reference[23:])


def test_ranks_draw_disjoint_rows(datasets):
    kwargs = dict(token_shares={"image": 0.3, "speech": 0.3, "text": 0.4}, seq_len=SEQ_LEN, batch_size=4, eos_id=EOS)
    seen = []
    for rank in range(2):
        loader, _ = build_mixture_dataloader(
            paths_of(datasets, "captions", "speech", "prose"), LAYOUT, rank=rank, world_size=2, **kwargs
        )
        seen.append({i for batch in take(loader, 10) for ids in batch["sample_ids"] for i in ids})
    assert seen[0]
    assert seen[1]
    assert not seen[0] & seen[1]


def data_section(data, **extra):
    section = {
        "datasets": [
            {"name": name, "train": data[name][0], "validation": data[name][0][:1]}
            for name in ("captions", "prose")
        ],
        "token_shares": {"image": 0.4, "text": 0.6},
        "seq_len": SEQ_LEN,
        "batch_size": 2,
        "eos_id": EOS,
        "pad_id": PAD,
    }
    section.update(extra)
    return section


def test_training_loader_from_config(datasets):
    loader, plan = build_training_loader(data_section(datasets), LAYOUT, seed=3)
    assert plan.expected_shares["image"] == pytest.approx(0.4, abs=1e-3)
    ids = {i for batch in take(loader, 20) for row in batch["sample_ids"] for i in row}
    assert ids & set(datasets["captions"][1])
    assert ids & set(datasets["prose"][1])
    assert ids <= set(datasets["captions"][1]) | set(datasets["prose"][1])


def test_validation_loaders_read_each_split(datasets):
    loaders = build_validation_loaders(data_section(datasets), LAYOUT)
    assert list(loaders) == ["captions", "prose"]
    for name, loader in loaders.items():
        first_file_ids = [s["sample_id"] for s in ShardReader(datasets[name][0][0])]
        too_long = {i for i in first_file_ids if sum(reference_counts(datasets[name][1][i])) > SEQ_LEN}
        ids = [i for batch in loader for row in batch["sample_ids"] for i in row]
        assert ids == [i for i in first_file_ids if i not in too_long]


def test_config_accepts_single_train_list(datasets):
    section = {"train": datasets["prose"][0], "validation": None, "seq_len": SEQ_LEN, "batch_size": 2}
    data = parse_data_config(section)
    assert [d.name for d in data.datasets] == ["default"]
    assert data.datasets[0].train == tuple(datasets["prose"][0])
    assert data.datasets[0].validation == ()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tokens_shares": {}}, r"unknown keys \['tokens_shares'\]"),
        ({"datasets": []}, "the list is empty"),
        ({"datasets": [{"name": "a", "train": "x"}, {"name": "a", "train": "y"}]}, "names repeat"),
        ({"datasets": [{"name": "a", "train": "x", "weight": 2}]}, r"unknown keys \['weight'\]"),
        ({"datasets": [{"name": "a"}]}, r"Missing data.datasets\[0\].train"),
        ({"train": "x"}, "either data.datasets or data.train"),
        ({"token_shares": {"image": 0.9, "text": 0.1}}, "Unreachable token_shares"),
        ({"curriculum": {"speech": {"schedule": "cosine"}}}, "Invalid curriculum schedule 'cosine'"),
    ],
)
def test_config_errors(datasets, extra, message):
    with pytest.raises(ValueError, match=message):
        build_training_loader(data_section(datasets, **extra), LAYOUT)


def test_closest_policy_from_config(datasets):
    section = data_section(datasets, token_shares={"image": 0.9, "text": 0.1}, on_unreachable_shares="closest")
    _, plan = build_training_loader(section, LAYOUT)
    assert plan.sampling_weights == {"captions": 1.0}
