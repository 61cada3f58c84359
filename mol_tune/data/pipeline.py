"""The training and validation data loaders, assembled from ``torchdata.nodes``.

The nodes of a training mixture run in this order::

    ShardSource               samples of one data set, shuffled per epoch, disjoint rows per rank
    Mapper                    SampleBuilder: segment order, delimiters, codes -> vocabulary ids, BOS/EOS
    MultiNodeWeightedSampler  draws the next sample's data set with weights set by token shares
    SpanLengthFilter          (with a curriculum) drops samples with spans above the current maximum
    Packer                    samples into sequences of seq_len tokens, cutting only text-only samples, if allowed
    Batcher + Mapper          collate_packed: LongTensors [b, s] and the attention mask [b, s, s]
    CurriculumClock           (with a curriculum) moves the filter's step, reports it in the batch
    Prefetcher                builds the next batches in a background thread
    Loader                    state_dict() / load_state_dict() resume exactly

The first two run once per data set. ``build_dataloader`` reads one list of shards without mixing.
"""

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from torchdata.nodes import BaseNode, Batcher, Loader, Mapper, MultiNodeWeightedSampler, ParallelMapper, Prefetcher
from torchdata.nodes.samplers.stop_criteria import StopCriteria

from mol_tune.data.curriculum import CurriculumClock, LengthSchedule, SpanLengthFilter
from mol_tune.data.mixture import MixturePlan, measure_dataset_profile, solve_mixture
from mol_tune.data.packing import Packer, collate_packed
from mol_tune.data.samples import SampleBuilder
from mol_tune.data.source import ShardSource
from mol_tune.vocab import VocabularyLayout


def build_sample_node(
    paths: Union[str, Sequence[str]],
    layout: VocabularyLayout,
    *,
    seed: int = 0,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    rank: int = 0,
    world_size: int = 1,
    infinite: bool = True,
    shuffle: bool = True,
    shuffle_segments: bool = True,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
    on_error: str = "raise",
    num_workers: int = 0,
) -> BaseNode[Dict[str, Any]]:
    """Build the nodes that yield one data set's samples as vocabulary ids (``SampleBuilder`` output).

    Args:
        paths (Union[str, Sequence[str]]): shard files or folders of ``*.parquet`` files.
        layout (VocabularyLayout): the model's vocabulary layout.
        seed (int): seed of the shuffles and of the segment order. Default: 0.
        bos_id (Optional[int]): id put before each sample, or None for none. Default: None.
        eos_id (Optional[int]): id put after each sample, or None for none. Default: None.
        rank (int): data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        infinite (bool): repeat epochs forever instead of stopping after one. Default: True.
        shuffle (bool): shuffle shards and rows. Default: True.
        shuffle_segments (bool): randomise the segment order inside each sample, or keep the stored
            order if False. Default: True.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook. A shard made with another codebook raises. None skips the check. Default: None.
        on_error (str): ``"raise"`` or ``"skip"`` for an unreadable or invalid shard or row (see
            ``ShardSource``). Default: "raise".
        num_workers (int): threads that build samples, or 0 to build them in the calling thread. Default: 0.

    Returns:
        BaseNode[Dict[str, Any]]: the sample node.
    """
    source = ShardSource(
        paths,
        layout=layout,
        codebook_fingerprints=codebook_fingerprints,
        seed=seed,
        shuffle=shuffle,
        infinite=infinite,
        rank=rank,
        world_size=world_size,
        on_error=on_error,
    )
    builder = SampleBuilder(layout, seed=seed, bos_id=bos_id, eos_id=eos_id, shuffle_segments=shuffle_segments)
    if num_workers > 0:
        return ParallelMapper(source, builder, num_workers=num_workers, in_order=True, method="thread")
    return Mapper(source, builder)


def build_dataloader(
    paths: Union[str, Sequence[str]],
    layout: VocabularyLayout,
    *,
    seq_len: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
    infinite: bool = True,
    shuffle: bool = True,
    shuffle_segments: bool = True,
    drop_last: bool = False,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
    on_too_long: str = "skip",
    split_text_samples: bool = False,
    on_error: str = "raise",
    num_workers: int = 0,
    prefetch_factor: int = 2,
    name: Optional[str] = None,
) -> Loader:
    """Build the loader of packed batches for one data set.

    Each batch is a dict with ``tokens``, ``labels``, ``input_pos``, ``document_ids`` (LongTensor
    [b, s]), ``mask`` (bool [b, s, s], True = may attend), ``sample_ids``, ``num_samples``,
    ``num_skipped`` and ``skipped``, as ``Packer`` and ``collate_packed`` describe.

    ``batch["skipped"]`` is a dict of running counts since the pass began. For an endless loader
    that is since it started, and a resumed loader continues the counts. The keys are
    ``"shards/<reason>"`` and ``"rows/<reason>"`` for input that the reader skipped with
    ``on_error="skip"``, and ``"samples/too_long"`` for samples longer than ``seq_len``. A
    ``<reason>`` is one of the reasons in ``mol_tune.data.bad_input``, e.g. ``unreadable_file`` or
    ``code_out_of_range``. Keys with no skip are left out, so a clean data set gives ``{}``.

    Args:
        paths (Union[str, Sequence[str]]): shard files or folders of ``*.parquet`` files.
        layout (VocabularyLayout): the model's vocabulary layout.
        seq_len (int): tokens per packed sequence. Default: 2048.
        batch_size (int): packed sequences per batch. Default: 1.
        seed (int): seed of the shuffles and of the segment order. Default: 0.
        bos_id (Optional[int]): id put before each sample, or None for none. Default: None.
        eos_id (Optional[int]): id put after each sample, or None for none. Default: None.
        pad_id (int): token id of padding. Default: 0.
        rank (int): data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        infinite (bool): repeat epochs forever instead of stopping after one. Default: True.
        shuffle (bool): shuffle shards and rows. Default: True.
        shuffle_segments (bool): randomise the segment order inside each sample, or keep the stored
            order if False. Without ``shuffle`` the order is the same on every pass. Default: True.
        drop_last (bool): drop a final batch with fewer than ``batch_size`` rows. Default: False.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook. A shard made with another codebook raises. None skips the check. Default: None.
        on_too_long (str): ``"skip"`` or ``"raise"`` for a sample longer than ``seq_len`` that is
            not cut. Default: "skip".
        split_text_samples (bool): let text-only samples be cut across sequences, so they are never
            too long. Samples with a non-text span are never cut (see ``Packer``). Default: False.
        on_error (str): ``"raise"`` or ``"skip"`` for an unreadable or invalid shard or row (see
            ``ShardSource``). Default: "raise".
        num_workers (int): threads that build samples, or 0 to build them in the loader's thread. Default: 0.
        prefetch_factor (int): batches built ahead in a background thread, or 0 for none. Default: 2.
        name (Optional[str]): what the loader reads, for error messages, e.g. "validation split of
            data set 'digits'", or None for the shard paths. Default: None.

    Returns:
        Loader: iterable over batches, with ``state_dict()`` and ``load_state_dict()``.

    Raises:
        ValueError: if a size or policy is invalid. While iterating: if every sample of a pass is
            skipped, or too many in a row are too long (see ``Packer``).
        ShardError: if a shard is unreadable or does not fit the layout or codebooks, and
            ``on_error`` is ``"raise"``.
    """
    if batch_size <= 0:
        raise ValueError(f"Invalid batch_size: {batch_size}. It must be positive.")
    samples = build_sample_node(
        paths,
        layout,
        seed=seed,
        bos_id=bos_id,
        eos_id=eos_id,
        rank=rank,
        world_size=world_size,
        infinite=infinite,
        shuffle=shuffle,
        shuffle_segments=shuffle_segments,
        codebook_fingerprints=codebook_fingerprints,
        on_error=on_error,
        num_workers=num_workers,
    )
    # NOTE: with world_size > 1, ranks may get different numbers of batches, because rows split
    # unevenly and packing depends on sample lengths. Training should use infinite=True, and one-pass
    # evaluation must not assume equal batch counts across ranks.
    name = name or f"shards {paths}"
    packer = Packer(
        samples,
        seq_len=seq_len,
        pad_id=pad_id,
        on_too_long=on_too_long,
        name=name,
        split_text_samples=split_text_samples,
        layout=layout,
    )
    return _loader(_batches(packer, batch_size, drop_last), prefetch_factor)


def _batches(packer: Packer, batch_size: int, drop_last: bool) -> BaseNode:
    node = Batcher(packer, batch_size=batch_size, drop_last=drop_last)
    return Mapper(node, collate_packed)


def _loader(node: BaseNode, prefetch_factor: int) -> Loader:
    if prefetch_factor > 0:
        node = Prefetcher(node, prefetch_factor=prefetch_factor)
    return Loader(node)


def build_mixture_dataloader(
    datasets: Mapping[str, Union[str, Sequence[str]]],
    layout: VocabularyLayout,
    *,
    token_shares: Optional[Mapping[str, float]] = None,
    on_unreachable_shares: str = "raise",
    max_span_schedules: Optional[Mapping[str, LengthSchedule]] = None,
    batches_per_step: int = 1,
    seq_len: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
    bos_id: Optional[int] = None,
    eos_id: Optional[int] = None,
    pad_id: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle_segments: bool = True,
    codebook_fingerprints: Optional[Mapping[str, str]] = None,
    on_too_long: str = "skip",
    split_text_samples: bool = False,
    on_error: str = "raise",
    num_workers: int = 0,
    prefetch_factor: int = 2,
) -> Tuple[Loader, MixturePlan]:
    """Build the endless training loader that mixes data sets so each modality gets its share of tokens.

    Each data set's profile (``measure_dataset_profile``) counts only samples that training can
    see: at most ``seq_len`` tokens and no span above the final maximum of its curriculum. The
    sampling weights come from ``solve_mixture``. Batches are those of ``build_dataloader``, with
    the skip counts in ``skipped`` summed over the data sets. With ``max_span_schedules`` they also
    carry the ``curriculum`` dict of ``CurriculumClock``.

    Args:
        datasets (Mapping[str, Union[str, Sequence[str]]]): data set name -> its shard files or folders.
        layout (VocabularyLayout): the model's vocabulary layout.
        token_shares (Optional[Mapping[str, float]]): modality -> share of training tokens, summing
            to 1, or None to sample data sets in proportion to their sample counts. Default: None.
        on_unreachable_shares (str): ``"raise"`` or ``"closest"`` when no mix reaches the shares. Default: "raise".
        max_span_schedules (Optional[Mapping[str, LengthSchedule]]): modality -> schedule of the longest
            admitted span, or None for no curriculum. Default: None.
        batches_per_step (int): batches per optimizer step (gradient accumulation), which turns
            batch counts into the curriculum's step. Default: 1.
        seq_len (int): tokens per packed sequence. Default: 2048.
        batch_size (int): packed sequences per batch. Default: 1.
        seed (int): seed of the data set draws, the shuffles and the segment order. Default: 0.
        bos_id (Optional[int]): id put before each sample, or None for none. Default: None.
        eos_id (Optional[int]): id put after each sample, or None for none. Default: None.
        pad_id (int): token id of padding. Default: 0.
        rank (int): data-parallel rank. Default: 0.
        world_size (int): number of data-parallel ranks. Default: 1.
        shuffle_segments (bool): randomise the segment order inside each sample. Default: True.
        codebook_fingerprints (Optional[Mapping[str, str]]): modality -> fingerprint of the model's
            codebook. None skips the check. Default: None.
        on_too_long (str): ``"skip"`` or ``"raise"`` for a sample longer than ``seq_len`` that is
            not cut. Default: "skip".
        split_text_samples (bool): let text-only samples be cut across sequences, so they are never
            too long. Samples with a non-text span are never cut (see ``Packer``). Default: False.
        on_error (str): ``"raise"`` or ``"skip"`` for an unreadable or invalid shard or row, in the
            token count of ``measure_dataset_profile`` and in the reader (see ``ShardSource``). Default: "raise".
        num_workers (int): threads that build each data set's samples, or 0 for none. Default: 0.
        prefetch_factor (int): batches built ahead in a background thread, or 0 for none. Default: 2.

    Returns:
        Tuple[Loader, MixturePlan]: the loader, with ``state_dict()`` and ``load_state_dict()``, and
        the mixture's weights and expected token shares.

    Raises:
        ValueError: if a size, policy, share or schedule is invalid, or the shares are unreachable
            with ``on_unreachable_shares="raise"``.
        ShardError: if a shard is unreadable or does not fit the layout or codebooks, and
            ``on_error`` is ``"raise"``.
    """
    if batch_size <= 0:
        raise ValueError(f"Invalid batch_size: {batch_size}. It must be positive.")
    schedules = dict(max_span_schedules or {})
    final_spans = {name: schedule.final_value for name, schedule in schedules.items()}
    profiles = [
        measure_dataset_profile(
            name,
            paths,
            layout,
            bos_id=bos_id,
            eos_id=eos_id,
            max_sample_tokens=seq_len,
            keep_long_text_samples=split_text_samples,
            max_span_tokens=final_spans,
            codebook_fingerprints=codebook_fingerprints,
            on_error=on_error,
        )
        for name, paths in datasets.items()
    ]
    plan = solve_mixture(profiles, token_shares, on_unreachable_shares)

    nodes = {}
    for index, (name, paths) in enumerate(datasets.items()):
        if name not in plan.sampling_weights:
            continue
        # Each data set gets its own seed, so data sets with equal row counts are not shuffled alike.
        nodes[name] = build_sample_node(
            paths,
            layout,
            seed=seed + index,
            bos_id=bos_id,
            eos_id=eos_id,
            rank=rank,
            world_size=world_size,
            shuffle_segments=shuffle_segments,
            codebook_fingerprints=codebook_fingerprints,
            on_error=on_error,
            num_workers=num_workers,
        )
    samples: BaseNode = MultiNodeWeightedSampler(
        nodes,
        plan.sampling_weights,
        stop_criteria=StopCriteria.CYCLE_FOREVER,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    span_filter = None
    if schedules:
        samples = span_filter = SpanLengthFilter(samples, layout, schedules)
    packer = Packer(
        samples,
        seq_len=seq_len,
        pad_id=pad_id,
        on_too_long=on_too_long,
        name=f"the training mixture of data sets {list(nodes)}",
        split_text_samples=split_text_samples,
        layout=layout,
    )
    node = _batches(packer, batch_size, False)
    if span_filter is not None:
        # The clock must run in the thread that runs the filter, so below the Prefetcher.
        node = CurriculumClock(node, span_filter, batches_per_step)
    return _loader(node, prefetch_factor), plan
