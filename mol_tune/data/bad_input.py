"""Bad input: the error that names an invalid input item, and the counter that skips such items.

Both the shard converter (``mol_tune.data.convert``) and the shard reader (``ShardSource``) take an
``on_error`` policy. ``"raise"`` stops at the first bad item with a ``BadInputError`` whose message
names the file and the row or manifest line. ``"skip"`` drops the item, counts it under the error's
``reason`` and logs it through a ``SkipCounter``: the first few per reason in full, then a running
count at 10, 100, 1000, ... skips, so a large data set with many bad items does not flood the log.
"""

import logging
from typing import Dict, Mapping, Optional

ON_ERROR_POLICIES = ("raise", "skip")

# Reasons an input item is bad. They are the keys of skip counts in logs, summaries and states.
MISSING_FILE = "missing_file"
UNREADABLE_FILE = "unreadable_file"
EMPTY_SAMPLE = "empty_sample"
CODE_OUT_OF_RANGE = "code_out_of_range"
TEXT_ID_OUT_OF_RANGE = "text_id_out_of_range"
UNKNOWN_MODALITY = "unknown_modality"
CODEBOOK_MISMATCH = "codebook_mismatch"
INVALID_SHARD = "invalid_shard"
INVALID_ROW = "invalid_row"
INVALID_VALUES = "invalid_values"
TOKENIZER_ERROR = "tokenizer_error"
INVALID = "invalid"


class BadInputError(ValueError):
    """An input item (a media file, a manifest line, a shard or one of its rows) is invalid.

    The message names the item and the next step. ``reason`` is one of this module's reason
    constants, the key under which a skipped item is counted.

    Args:
        message (str): the error message.
        reason (str): why the item is bad. Default: ``INVALID``.
    """

    # ``reason`` has a default because torchdata re-raises an error from a worker thread by calling
    # the exception type with the message alone.
    def __init__(self, message: str, reason: str = INVALID):
        super().__init__(message)
        self.reason = reason


def check_on_error(on_error: str) -> str:
    """Return ``on_error`` if it is a known policy.

    Raises:
        ValueError: if ``on_error`` is not ``"raise"`` or ``"skip"``.
    """
    if on_error not in ON_ERROR_POLICIES:
        raise ValueError(f"Invalid on_error: {on_error!r}. Use one of {ON_ERROR_POLICIES}.")
    return on_error


class SkipCounter:
    """Count skipped items per reason and log them, rate-limited.

    The first ``max_logged`` skips of each reason are logged as warnings with the full error
    message. Later ones are counted, and the count is logged when it reaches or passes 10, 100, 1000
    and so on.

    Args:
        unit (str): what is skipped, for the log, e.g. ``"row"``, ``"shard"`` or ``"sample"``.
        logger (logging.Logger): where to log.
        max_logged (int): skips logged in full per reason. Default: 5.
        counts (Optional[Mapping[str, int]]): counts to start from, e.g. from a saved state. Default: None.
    """

    def __init__(
        self,
        unit: str,
        logger: logging.Logger,
        max_logged: int = 5,
        counts: Optional[Mapping[str, int]] = None,
    ):
        self.unit = unit
        self.logger = logger
        self.max_logged = max_logged
        self.counts: Dict[str, int] = dict(counts or {})

    @property
    def total(self) -> int:
        """Skipped items over all reasons."""
        return sum(self.counts.values())

    def record(self, error: BadInputError, count: int = 1) -> None:
        """Count the skipped items that ``error`` describes and log them if the rate limit allows.

        Args:
            error (BadInputError): the error, whose ``reason`` is the key of the count.
            count (int): items that the error covers, e.g. the rows of a damaged row group. Default: 1.
        """
        reason = getattr(error, "reason", INVALID)
        before = self.counts.get(reason, 0)
        total = before + count
        self.counts[reason] = total
        if before < self.max_logged:
            if count == 1:
                self.logger.warning("Skipped %s (%s): %s", self.unit, reason, error)
            else:
                self.logger.warning("Skipped %d %ss (%s): %s", count, self.unit, reason, error)
            if total >= self.max_logged:
                self.logger.warning(
                    "Further %ss skipped for %s are counted and not logged in full.", self.unit, reason
                )
        elif _passes_power_of_ten(before, total):
            self.logger.warning("Skipped %d %ss for %s so far.", total, self.unit, reason)

    def summary(self) -> str:
        """Return the counts as one line, e.g. ``"3 rows skipped (empty_sample: 1, code_out_of_range: 2)"``."""
        if not self.counts:
            return f"0 {self.unit}s skipped"
        parts = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.counts.items()))
        return f"{self.total} {self.unit}s skipped ({parts})"


def _passes_power_of_ten(before: int, after: int) -> bool:
    """Return whether a power of ten above 1 lies in ``(before, after]``."""
    power = 10
    while power <= after:
        if power > before:
            return True
        power *= 10
    return False
