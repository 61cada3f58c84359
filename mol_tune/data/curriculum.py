"""Length curriculum: the longest span of a modality (speech, say) admitted to training grows with the step.

Two nodes carry it, below the loader's ``Prefetcher`` so they run in one thread::

    ... -> SpanLengthFilter -> Packer -> Batcher -> collate -> CurriculumClock -> Prefetcher

``CurriculumClock`` counts the batches it has passed on and, before each batch is assembled,
sets the filter's step to ``batches // batches_per_step``: the optimizer step that will consume
the batch. The step comes from the loader's own count and not from the recipe. The reason is the
``Prefetcher``, which builds batches ahead of training at times that depend on thread scheduling,
so a counter set by the training loop would make the admitted samples depend on that timing. Both
nodes keep their counts in the loader state, so a resumed loader admits exactly what an
uninterrupted one would.
"""

from abc import ABC, abstractmethod
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from torchdata.nodes import BaseNode

from mol_tune.vocab import VocabularyLayout


class LengthSchedule(ABC):
    """Maximum span length, in codes, as a function of the training step (from 0)."""

    @abstractmethod
    def __call__(self, step: int) -> int: ...

    @property
    @abstractmethod
    def final_value(self) -> int:
        """The maximum length once the schedule has ended."""


def _check_length(name: str, value: Any) -> int:
    if isinstance(value, bool) or int(value) != value or value <= 0:
        raise ValueError(f"Invalid curriculum {name}: {value!r}. It must be a positive integer number of codes.")
    return int(value)


class ConstantSchedule(LengthSchedule):
    """The same maximum at every step.

    Args:
        value (int): maximum span length in codes.

    Raises:
        ValueError: if ``value`` is not a positive integer.
    """

    def __init__(self, value: int):
        self.value = _check_length("value", value)

    def __call__(self, step: int) -> int:
        return self.value

    @property
    def final_value(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"ConstantSchedule(value={self.value})"


class LinearSchedule(LengthSchedule):
    """A maximum that moves linearly from ``start`` at step 0 to ``end`` at ``num_steps``, then stays.

    The value at step ``t`` is ``round(start + (end - start) * min(t, num_steps) / num_steps)``.

    Args:
        start (int): maximum at step 0, in codes.
        end (int): maximum from step ``num_steps`` on, in codes.
        num_steps (int): steps over which the maximum moves.

    Raises:
        ValueError: if a length is not a positive integer or ``num_steps`` is not positive.
    """

    def __init__(self, start: int, end: int, num_steps: int):
        self.start = _check_length("start", start)
        self.end = _check_length("end", end)
        if isinstance(num_steps, bool) or int(num_steps) != num_steps or num_steps <= 0:
            raise ValueError(f"Invalid curriculum num_steps: {num_steps!r}. It must be a positive integer.")
        self.num_steps = int(num_steps)

    def __call__(self, step: int) -> int:
        progress = min(max(step, 0), self.num_steps) / self.num_steps
        return int(round(self.start + (self.end - self.start) * progress))

    @property
    def final_value(self) -> int:
        return self.end

    def __repr__(self) -> str:
        return f"LinearSchedule(start={self.start}, end={self.end}, num_steps={self.num_steps})"


class StepSchedule(LengthSchedule):
    """A piecewise constant maximum: ``values[i]`` from step ``milestones[i - 1]`` until ``milestones[i]``.

    Args:
        values (Sequence[int]): maxima in codes, one more than ``milestones``.
        milestones (Sequence[int]): increasing steps at which the next value starts.

    Raises:
        ValueError: if the lengths of the two lists do not fit, a value is not a positive integer,
            or the milestones are not increasing non-negative integers.
    """

    def __init__(self, values: Sequence[int], milestones: Sequence[int]):
        self.values = [_check_length("value", v) for v in values]
        self.milestones = [int(m) for m in milestones]
        if len(self.values) != len(self.milestones) + 1:
            raise ValueError(
                f"Invalid step curriculum: {len(self.values)} values need {len(self.values) - 1} milestones, "
                f"got {self.milestones}."
            )
        if any(m < 0 for m in self.milestones) or any(b <= a for a, b in zip(self.milestones, self.milestones[1:])):
            raise ValueError(f"Invalid step curriculum milestones {self.milestones}: they must increase from >= 0.")

    def __call__(self, step: int) -> int:
        return self.values[int(np.searchsorted(self.milestones, step, side="right"))]

    @property
    def final_value(self) -> int:
        return self.values[-1]

    def __repr__(self) -> str:
        return f"StepSchedule(values={self.values}, milestones={self.milestones})"


_SCHEDULES = {"constant": ConstantSchedule, "linear": LinearSchedule, "step": StepSchedule}


def build_schedule(spec: Mapping[str, Any]) -> LengthSchedule:
    """Build a schedule from a config entry such as ``{schedule: linear, start: 100, end: 1500, num_steps: 1000}``.

    Args:
        spec (Mapping[str, Any]): ``schedule`` (``constant``, ``linear`` or ``step``) and that
            schedule's arguments (``value``; ``start``, ``end``, ``num_steps``; ``values``, ``milestones``).

    Returns:
        LengthSchedule: the schedule.

    Raises:
        ValueError: if the schedule kind is unknown or its arguments do not fit it.
    """
    spec = dict(spec)
    kind = spec.pop("schedule", None)
    if kind not in _SCHEDULES:
        raise ValueError(f"Invalid curriculum schedule {kind!r} in {spec}. Use one of {sorted(_SCHEDULES)}.")
    try:
        return _SCHEDULES[kind](**spec)
    except TypeError as error:
        raise ValueError(f"Invalid arguments {spec} for the {kind} curriculum schedule: {error}.") from None


def longest_spans(sample: Mapping[str, Any], layout: VocabularyLayout) -> Dict[str, int]:
    """Return the longest span, in codes, of each non-text modality in a ``SampleBuilder`` output (0 if none)."""
    tokens = np.asarray(sample["tokens"])
    spans = np.asarray(sample["spans"])
    lengths = {}
    for modality in layout.modalities:
        start, end = layout.code_range(modality.name)
        in_range = (tokens >= start) & (tokens < end)
        lengths[modality.name] = int(np.bincount(spans[in_range]).max()) if in_range.any() else 0
    return lengths


class SpanLengthFilter(BaseNode[Dict[str, Any]]):
    """Drop samples that have a span longer than the current maximum of its modality.

    The maximum of modality ``m`` at step ``t`` is ``schedules[m](t)``. ``set_step`` moves the
    step; ``CurriculumClock`` calls it. The state contains the source's state, the step and the
    counts of dropped samples and tokens (per modality that caused the drop, and in all).

    NOTE: the drops change the mix of modalities while the maximum is below the longest spans,
    so the token shares of a mixture reach their targets only once the schedule has ended.

    Args:
        source (BaseNode[Dict[str, Any]]): node yielding ``SampleBuilder`` outputs.
        layout (VocabularyLayout): the model's vocabulary layout.
        schedules (Mapping[str, LengthSchedule]): non-text modality -> schedule of its maximum span.
        max_consecutive_drops (int): drops in a row after which ``next`` raises, because with an
            endless source and no admissible sample it would otherwise never return. Default: 100000.

    Raises:
        KeyError: if a schedule names a modality the layout lacks.
        ValueError: if a schedule is given for text.
        RuntimeError: from ``next``, after ``max_consecutive_drops`` drops in a row.
    """

    SOURCE_KEY = "source"
    STEP_KEY = "step"
    STATS_KEY = "stats"

    def __init__(
        self,
        source: BaseNode[Dict[str, Any]],
        layout: VocabularyLayout,
        schedules: Mapping[str, LengthSchedule],
        max_consecutive_drops: int = 100_000,
    ):
        super().__init__()
        for name in schedules:
            if layout.modality_id(name) == 0:
                raise ValueError("Invalid curriculum: text has no spans to limit. Give schedules for code modalities.")
        self.source = source
        self.layout = layout
        self.schedules = dict(schedules)
        self.max_consecutive_drops = max_consecutive_drops
        self.step = 0
        self.stats = self._empty_stats()

    def _empty_stats(self) -> Dict[str, int]:
        stats = {"dropped_samples": 0, "dropped_tokens": 0}
        stats.update({f"dropped_samples/{name}": 0 for name in self.schedules})
        return stats

    def set_step(self, step: int) -> None:
        """Set the training step whose maxima apply to the next samples."""
        self.step = int(step)

    def max_span_tokens(self, step: Optional[int] = None) -> Dict[str, int]:
        """Return the maximum span per modality at ``step`` (default: the current step)."""
        step = self.step if step is None else step
        return {name: schedule(step) for name, schedule in self.schedules.items()}

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE_KEY])
            self.step = initial_state[self.STEP_KEY]
            self.stats = dict(initial_state[self.STATS_KEY])
        else:
            self.source.reset()
            self.step = 0
            self.stats = self._empty_stats()

    def next(self) -> Dict[str, Any]:
        limits = self.max_span_tokens()
        # Skip counts that dropped samples carry (see ShardSource) go on with the next admitted sample.
        skipped: Dict[str, int] = {}
        for _ in range(self.max_consecutive_drops):
            sample = next(self.source)
            for key, count in (sample.get("skipped") or {}).items():
                skipped[key] = skipped.get(key, 0) + count
            lengths = longest_spans(sample, self.layout)
            over = [name for name, limit in limits.items() if lengths[name] > limit]
            if not over:
                sample["skipped"] = skipped
                return sample
            self.stats["dropped_samples"] += 1
            self.stats["dropped_tokens"] += len(sample["tokens"])
            for name in over:
                self.stats[f"dropped_samples/{name}"] += 1
        raise RuntimeError(
            f"The length curriculum dropped {self.max_consecutive_drops} samples in a row at step {self.step}, "
            f"with maximum spans {limits}: the data has almost no sample that short. Raise the schedule's "
            "first values, or mix in data with shorter spans."
        )

    def get_state(self) -> Dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict(), self.STEP_KEY: self.step, self.STATS_KEY: dict(self.stats)}


class CurriculumClock(BaseNode[Dict[str, Any]]):
    """Set the filter's step from the number of batches produced, and report the curriculum in each batch.

    Before batch ``b`` (from 0) is assembled, the filter's step becomes ``b // batches_per_step``.
    Each batch gets a ``curriculum`` dict: ``step``, ``max_span_tokens`` (modality -> maximum at
    that step) and the filter's running counts ``dropped_samples`` and ``dropped_tokens``.

    Args:
        source (BaseNode[Dict[str, Any]]): node yielding collated batches, fed by ``span_filter``.
        span_filter (SpanLengthFilter): the filter below ``source``, run in the same thread.
        batches_per_step (int): batches one optimizer step consumes (gradient accumulation). Default: 1.

    Raises:
        ValueError: if ``batches_per_step`` is not positive.
    """

    SOURCE_KEY = "source"
    BATCHES_KEY = "batches"

    def __init__(self, source: BaseNode[Dict[str, Any]], span_filter: SpanLengthFilter, batches_per_step: int = 1):
        super().__init__()
        if batches_per_step <= 0:
            raise ValueError(f"Invalid batches_per_step: {batches_per_step}. It must be positive.")
        self.source = source
        self.span_filter = span_filter
        self.batches_per_step = batches_per_step
        self._batches = 0

    def reset(self, initial_state: Optional[Dict[str, Any]] = None):
        super().reset(initial_state)
        if initial_state is not None:
            self.source.reset(initial_state[self.SOURCE_KEY])
            self._batches = initial_state[self.BATCHES_KEY]
        else:
            self.source.reset()
            self._batches = 0

    def next(self) -> Dict[str, Any]:
        step = self._batches // self.batches_per_step
        self.span_filter.set_step(step)
        batch = next(self.source)
        self._batches += 1
        batch["curriculum"] = {
            "step": step,
            "max_span_tokens": self.span_filter.max_span_tokens(step),
            "dropped_samples": self.span_filter.stats["dropped_samples"],
            "dropped_tokens": self.span_filter.stats["dropped_tokens"],
        }
        return batch

    def get_state(self) -> Dict[str, Any]:
        return {self.SOURCE_KEY: self.source.state_dict(), self.BATCHES_KEY: self._batches}
