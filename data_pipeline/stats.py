"""Skip counters: bad data is counted by reason and logged at a bounded rate."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Optional

log = logging.getLogger("data_pipeline.skips")

# The reasons a sample (or a whole shard) is skipped; metrics expose them as labels.
REASONS = (
    "unreadable_source",  # a shard/file that cannot be opened or read at all
    "truncated_tar",  # a tar that ends mid-member; the members before it are kept
    "unsafe_member_name",  # `../x`, `/abs/path` or other names that could escape a folder
    "empty_file",  # a zero-byte member
    "member_too_large",  # over the per-member byte limit (memory stays bounded)
    "duplicate_key",  # the same key twice in one shard (or twice in one source listing)
    "missing_image",
    "missing_caption",
    "undecodable_image",
    "image_too_large",  # over PIL's pixel limit: a decompression bomb
    "image_too_small",
    "caption_not_utf8",
    "caption_too_long",
    "missing_embedding",
    "nan_embedding",
    "embedding_dim_mismatch",
    "bad_embedding",  # an embedding file that does not parse as .npy
)


class SkipCounter:
    """Counts skips by reason; logs the first of each reason, then every `log_every`-th.

    Never one log line per bad sample: a corrupt shard of 10k samples makes a handful of
    lines, not 10k.
    """

    def __init__(self, log_every: int = 1000, logger: Optional[logging.Logger] = None):
        self.counts: Counter[str] = Counter()
        self._undrained: Counter[str] = Counter()
        self.log_every = log_every
        self._log = logger or log
        # Muted while a restored position is replayed, so those skips are not counted twice.
        self.muted = False

    def skip(self, reason: str, where: str = "", n: int = 1) -> None:
        if self.muted:
            return
        before = self.counts[reason]
        self.counts[reason] += n
        self._undrained[reason] += n
        after = self.counts[reason]
        if before == 0 or before // self.log_every != after // self.log_every:
            self._log.warning("skipped %s (%s; %d so far)", where or "sample", reason, after)

    def update(self, other: Mapping[str, int]) -> None:
        for reason, n in other.items():
            if n:
                self.counts[reason] += n

    def drain(self) -> dict[str, int]:
        """The counts since the last drain (deltas shipped out of a loader worker)."""
        out = {k: v for k, v in sorted(self._undrained.items()) if v}
        self._undrained.clear()
        return out

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.counts.items()) if v}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"
