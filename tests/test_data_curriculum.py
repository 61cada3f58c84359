"""Tests of the speech-length curriculum on synthetic shards whose long spans are named "speech"."""

import io

import numpy as np
import pytest
import torch
from torchdata.nodes import Mapper

from mol_tune.data.curriculum import (
    ConstantSchedule,
    LinearSchedule,
    SpanLengthFilter,
    StepSchedule,
    build_schedule,
)
from mol_tune.data.pipeline import build_mixture_dataloader, build_sample_node
from mol_tune.data.shards import CodebookInfo, ShardInfo, ShardWriter
from mol_tune.vocab import VocabularyLayout

BASE_VOCAB = 40
EOS, PAD = 2, 0
LAYOUT = VocabularyLayout(
    BASE_VOCAB,
    ({"name": "image", "num_codes": 8, "codebook_dim": 4}, {"name": "speech", "num_codes": 6, "codebook_dim": 3}),
)
# Written out by hand: image codes 40-47, speech codes 48-53, <img> </img> 54 55, <speech> </speech> 56 57.
SPEECH_OPEN, SPEECH_CLOSE = 56, 57
INFO = ShardInfo(
    dataset="synthetic",
    text_tokenizer="toy",
    modalities={"image": CodebookInfo(8, 4, "11" * 32), "speech": CodebookInfo(6, 3, "22" * 32)},
)
SEQ_LEN = 128


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Speech samples with spans of 1 to 100 units (some with two spans), and captioned images."""
    directory = tmp_path_factory.mktemp("curriculum")
    rng = np.random.default_rng(0)
    speech, images = {}, {}
    for row in range(120):
        segments = [("text", rng.integers(3, BASE_VOCAB, int(rng.integers(1, 6))).tolist())]
        segments.append(("speech", rng.integers(0, 6, int(rng.integers(1, 101))).tolist()))
        if row % 5 == 0:
            segments.append(("speech", rng.integers(0, 6, int(rng.integers(1, 10))).tolist()))
        speech[row] = segments
    for row in range(60):
        images[1000 + row] = [("text", [5, 6, 7]), ("image", rng.integers(0, 8, 12).tolist())]
    paths = {}
    for name, samples in (("speech", speech), ("images", images)):
        paths[name] = str(directory / f"{name}.parquet")
        with ShardWriter(paths[name], INFO, row_group_size=32) as writer:
            for sample_id, segments in samples.items():
                writer.write(sample_id, segments)
    return paths, {**speech, **images}


def longest_speech(segments):
    return max((len(tokens) for modality, tokens in segments if modality == "speech"), default=0)


def speech_spans(tokens):
    """Lengths of the runs between <speech> and </speech> in a token list, by a plain scan."""
    lengths, start = [], None
    for position, token in enumerate(tokens):
        if token == SPEECH_OPEN:
            start = position
        elif token == SPEECH_CLOSE:
            lengths.append(position - start - 1)
    return lengths


def take(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def test_linear_schedule_values():
    schedule = LinearSchedule(start=100, end=1500, num_steps=10)
    assert [schedule(step) for step in (0, 1, 5, 10, 11, 1000)] == [100, 240, 800, 1500, 1500, 1500]
    assert schedule.final_value == 1500


def test_step_schedule_values():
    schedule = StepSchedule(values=[10, 20, 40], milestones=[3, 7])
    assert [schedule(step) for step in range(9)] == [10, 10, 10, 20, 20, 20, 20, 40, 40]
    assert schedule.final_value == 40


def test_constant_schedule_from_config():
    schedule = build_schedule({"schedule": "constant", "value": 64})
    assert isinstance(schedule, ConstantSchedule)
    assert [schedule(step) for step in (0, 10**6)] == [64, 64]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"schedule": "cosine"}, "Invalid curriculum schedule 'cosine'"),
        ({"schedule": "linear", "start": 10}, "Invalid arguments .* for the linear"),
        ({"schedule": "linear", "start": 0, "end": 5, "num_steps": 3}, "start: 0"),
        ({"schedule": "linear", "start": 1, "end": 5, "num_steps": 0}, "num_steps: 0"),
        ({"schedule": "step", "values": [1, 2], "milestones": []}, "2 values need 1 milestones"),
        ({"schedule": "step", "values": [1, 2, 3], "milestones": [5, 5]}, "must increase"),
    ],
)
def test_invalid_schedule_raises(spec, message):
    with pytest.raises(ValueError, match=message):
        build_schedule(spec)


def test_filter_matches_loop(shards):
    paths, by_id = shards
    samples = build_sample_node(paths["speech"], LAYOUT, eos_id=EOS, shuffle=False, infinite=False)
    span_filter = SpanLengthFilter(samples, LAYOUT, {"speech": ConstantSchedule(40)})
    admitted_ids = [sample["sample_id"] for sample in span_filter]

    speech_ids = [i for i in by_id if i < 1000]
    expected = [i for i in speech_ids if longest_speech(by_id[i]) <= 40]
    dropped = [i for i in speech_ids if longest_speech(by_id[i]) > 40]
    assert admitted_ids == expected
    assert span_filter.stats["dropped_samples"] == len(dropped)
    assert span_filter.stats["dropped_samples/speech"] == len(dropped)
    assert span_filter.stats["dropped_tokens"] == sum(
        1 + sum(len(t) + (2 if m != "text" else 0) for m, t in by_id[i]) for i in dropped
    )


def test_filter_passes_on_skip_counts(shards):
    """Skip counts that dropped samples carry reach the next admitted sample, so none is lost."""
    paths, by_id = shards
    samples = build_sample_node(paths["speech"], LAYOUT, eos_id=EOS, shuffle=False, infinite=False)
    marked = Mapper(samples, lambda sample: {**sample, "skipped": {"rows/marker": 1}})
    span_filter = SpanLengthFilter(marked, LAYOUT, {"speech": ConstantSchedule(40)})
    admitted = list(span_filter)

    speech_ids = [i for i in by_id if i < 1000]
    last_admitted = max(index for index, i in enumerate(speech_ids) if longest_speech(by_id[i]) <= 40)
    assert sum(sample["skipped"]["rows/marker"] for sample in admitted) == last_admitted + 1


def test_filter_rejects_text_and_unknown(shards):
    paths, _ = shards
    samples = build_sample_node(paths["speech"], LAYOUT)
    with pytest.raises(ValueError, match="text has no spans"):
        SpanLengthFilter(samples, LAYOUT, {"text": ConstantSchedule(5)})
    with pytest.raises(KeyError, match="video"):
        SpanLengthFilter(samples, LAYOUT, {"video": ConstantSchedule(5)})


def test_filter_raises_when_nothing_fits(tmp_path):
    path = str(tmp_path / "long_speech.parquet")
    with ShardWriter(path, INFO) as writer:
        for sample_id in range(10):
            writer.write(sample_id, [("text", [5]), ("speech", [1, 2, 3, 4, 5])])
    samples = build_sample_node(path, LAYOUT, eos_id=EOS)
    span_filter = SpanLengthFilter(samples, LAYOUT, {"speech": ConstantSchedule(4)}, max_consecutive_drops=500)
    span_filter.reset()
    with pytest.raises(RuntimeError, match=r"dropped 500 samples in a row at step 0, with maximum spans \{'speech': 4\}"):
        next(span_filter)


def curriculum_loader(paths, batches_per_step=1, **kwargs):
    loader, _ = build_mixture_dataloader(
        paths,
        LAYOUT,
        token_shares=None,
        max_span_schedules={"speech": LinearSchedule(start=10, end=100, num_steps=30)},
        batches_per_step=batches_per_step,
        seq_len=SEQ_LEN,
        batch_size=2,
        seed=5,
        eos_id=EOS,
        pad_id=PAD,
        **kwargs,
    )
    return loader


def expected_limit(step):
    """LinearSchedule(10, 100, 30) by hand."""
    return round(10 + 90 * min(step, 30) / 30)


def test_spans_stay_under_growing_limit(shards):
    paths, _ = shards
    batches = take(curriculum_loader(paths, batches_per_step=2), 80)
    longest_per_step = {}
    for index, batch in enumerate(batches):
        step = index // 2
        assert batch["curriculum"]["step"] == step
        assert batch["curriculum"]["max_span_tokens"] == {"speech": expected_limit(step)}
        for row in batch["tokens"].tolist():
            spans = speech_spans(row)
            assert all(length <= expected_limit(step) for length in spans), (step, spans)
            longest_per_step[step] = max([longest_per_step.get(step, 0)] + spans)
    dropped = [batch["curriculum"]["dropped_samples"] for batch in batches]
    assert dropped == sorted(dropped)
    assert dropped[0] > 0
    # The limit really grows: late steps admit spans that step 0 dropped.
    assert max(longest_per_step[s] for s in range(31, 40)) > expected_limit(0) + 50


def test_resume_matches_uninterrupted_run(shards):
    paths, _ = shards
    reference = take(curriculum_loader(paths, batches_per_step=2), 50)

    first = curriculum_loader(paths, batches_per_step=2)
    head = take(first, 17)  # stops inside step 8, between its two batches
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = curriculum_loader(paths, batches_per_step=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = take(resumed, 33)

    for actual, expected in zip(head + tail, reference):
        assert actual["sample_ids"] == expected["sample_ids"]
        assert actual["curriculum"] == expected["curriculum"]
        for key in ("tokens", "labels", "input_pos", "document_ids"):
            assert torch.equal(actual[key], expected[key]), key


def test_curriculum_from_config(shards):
    from mol_tune.data.config import build_training_loader

    paths, _ = shards
    section = {
        "datasets": [{"name": "speech", "train": paths["speech"]}],
        "curriculum": {"speech": {"schedule": "step", "values": [5, 60], "milestones": [2]}},
        "seq_len": SEQ_LEN,
        "batch_size": 2,
        "eos_id": EOS,
    }
    loader, plan = build_training_loader(section, LAYOUT, batches_per_step=1)
    limits = [batch["curriculum"]["max_span_tokens"]["speech"] for batch in take(loader, 4)]
    assert limits == [5, 5, 60, 60]
    # The profile counts only samples that the final limit admits.
    assert plan.profiles[0].num_excluded == sum(1 for i in shards[1] if i < 1000 and longest_speech(shards[1][i]) > 60)
