"""The streaming loader: sources -> split by node and worker -> mix -> shuffle -> decode -> batch.

The chain, and why each step sits where it does:

1. Each source's units (shards) are split across *slots*, one per (rank, worker): in epoch
   mode a seeded permutation of all shards is dealt round-robin, so every sample is read
   exactly once per epoch across all nodes and workers; in resampled mode each slot draws
   shards with replacement from its own seeded generator (rounds of ~N/slots shards).
2. A slot reads *blocks* of `shuffle_buffer` raw (undecoded) samples, choosing the source of
   each by weight, and emits a block in a seeded random order. Shuffling raw bytes before
   decoding bounds memory; blocks, rather than a reservoir, make the position exact and
   cheap to restore: (source cursors at the block's start, block number, samples emitted),
   so a restart re-reads at most one block and continues with the samples not consumed.
3. Decoding happens last, per sample, in the worker; bad data raises `Skip` and is counted
   by reason (shipped to the main process with each batch, `loader.skipped`).
4. Batches are built in the worker and carry the slot's position; the main process keeps
   the position of the last batch it handed out, per slot (`loader.state_dict()`).
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.decode import Skip
from data_pipeline.io import mask_url
from data_pipeline.sources import ExampleSpec, SourcePlan, collate, plan_sources, to_example
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import RawSample

STATE_VERSION = 1


class EmptySourceError(RuntimeError):
    """A source yielded no sample at all: an error, never a silently empty epoch."""


class SourceCursor:
    """Position in one source for one slot: (epoch, unit number, samples read from it)."""

    def __init__(self, plan: SourcePlan, slot: int, total_slots: int, seed: int, resampled: bool,
                 skips: SkipCounter, state: Optional[dict] = None):
        self.plan, self.slot, self.total_slots = plan, slot, total_slots
        self.seed, self.resampled, self.skips = seed, resampled, skips
        state = state or {"epoch": 0, "unit": 0, "offset": 0}
        self.epoch, self.unit, self.offset = state["epoch"], state["unit"], state["offset"]
        self._units_epoch: Optional[int] = None
        self._units: list[str] = []
        self._records: Optional[Iterator[RawSample]] = None
        self._units_without_samples = 0
        self.read_total = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "offset": self.offset}

    def units(self) -> list[str]:
        if self._units_epoch != self.epoch:
            all_units = self.plan.units
            if self.resampled:
                rng = random.Random(f"{self.seed}:{self.plan.index}:{self.slot}:{self.epoch}")
                self._units = rng.choices(all_units, k=max(1, math.ceil(len(all_units) / self.total_slots)))
            else:
                order = list(all_units)
                random.Random(f"{self.seed}:{self.plan.index}:{self.epoch}").shuffle(order)
                self._units = order[self.slot :: self.total_slots]
            self._units_epoch = self.epoch
        return self._units

    def next(self) -> Optional[RawSample]:
        """The next raw sample, or None when this epoch's units are done (epoch mode)."""
        while True:
            if self._records is None:
                units = self.units()
                if self.unit >= len(units):
                    if not self.resampled:
                        return None
                    self.epoch, self.unit, self.offset = self.epoch + 1, 0, 0
                    continue
                self._check_not_empty()
                self._records = self.plan.read(units[self.unit], self.skips, self.offset)
                self._units_without_samples += 1
            record = next(self._records, None)
            if record is None:
                self._records = None
                self.unit, self.offset = self.unit + 1, 0
                continue
            self.offset += 1
            self.read_total += 1
            self._units_without_samples = 0
            return record

    def _check_not_empty(self) -> None:
        # Resampled: this many draws in a row without a sample mean there is (almost surely)
        # nothing readable in the source. Epoch mode is checked per pass by the loader.
        if self.resampled and self._units_without_samples >= 10 * len(self.plan.units) + 10:
            raise EmptySourceError(f"{self.plan.name()} yielded no samples from {self._units_without_samples} "
                                   f"shard(s) in a row (skipped so far: {self.skips.as_dict()})")

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.unit, self.offset = epoch, 0, 0
        self._records = None


class SlotStream:
    """The shuffled, mixed stream of raw samples of one slot, with an exact position."""

    def __init__(self, plans: list[SourcePlan], slot: int, total_slots: int, *, seed: int, resampled: bool,
                 shuffle_buffer: int, skips: SkipCounter, state: Optional[dict] = None):
        self.plans, self.slot, self.seed, self.resampled = plans, slot, seed, resampled
        self.shuffle = shuffle_buffer > 0
        self.block_size = shuffle_buffer if shuffle_buffer > 0 else 256
        self.weights = [p.weight for p in plans]
        state = state or {"epoch": 0, "block": 0, "emitted": 0, "cursors": [None] * len(plans)}
        self._resumed_mid_epoch = not _at_epoch_start(state)
        self.epoch, self.block, self.emitted = state["epoch"], state["block"], state["emitted"]
        self.cursors = [SourceCursor(p, slot, total_slots, seed, resampled, skips, c)
                        for p, c in zip(plans, state["cursors"])]
        self._block_start = [c.state() for c in self.cursors]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "emitted": self.emitted, "cursors": self._block_start}

    def _read_block(self) -> list[RawSample]:
        self._block_start = [c.state() for c in self.cursors]
        rng = random.Random(f"{self.seed}:{self.slot}:{self.epoch}:{self.block}")
        active = list(range(len(self.cursors)))
        records: list[RawSample] = []
        while len(records) < self.block_size and active:
            i = active[0] if len(active) == 1 else rng.choices(active, [self.weights[a] for a in active])[0]
            record = self.cursors[i].next()
            if record is None:
                active.remove(i)
            else:
                records.append(record)
        if self.shuffle:
            rng.shuffle(records)
        return records

    def __iter__(self) -> Iterator[RawSample]:
        """Resampled: endless. Epoch mode: the rest of the current epoch (or, if that is
        already finished, the next one), after which the position is the next epoch's start."""
        produced = 0
        while True:
            records = self._read_block()
            start, self.emitted = self.emitted, self.emitted
            for i in range(start, len(records)):
                self.emitted = i + 1
                produced += 1
                yield records[i]
            if len(records) == self.block_size or self.resampled:
                self.block, self.emitted = self.block + 1, 0
                continue
            restored_finished_epoch = produced == 0 and self._resumed_mid_epoch
            self._resumed_mid_epoch = False
            self.epoch, self.block, self.emitted = self.epoch + 1, 0, 0
            for cursor in self.cursors:
                cursor.start_epoch(self.epoch)
            self._block_start = [c.state() for c in self.cursors]
            if not restored_finished_epoch:
                return

    def read_counts(self) -> list[int]:
        """Raw samples read per source since this stream was built."""
        return [c.read_total for c in self.cursors]


class _BatchStream(IterableDataset):
    """Runs in each DataLoader worker: one slot's stream, decoded and batched.

    Every item carries `_meta` (slot, its position after the batch, skip and read deltas);
    a last item with `final` set reports the position at the end of the pass.
    """

    def __init__(self, plans: list[SourcePlan], spec: ExampleSpec, *, batch_size: int, rank: int, workers: int,
                 total_slots: int, seed: int, resampled: bool, shuffle_buffer: int, drop_last: bool,
                 tokenizer: Optional[Callable], slot_states: dict[int, dict], rotation: int):
        super().__init__()
        self.plans, self.spec, self.batch_size, self.rank, self.workers = plans, spec, batch_size, rank, workers
        self.total_slots = total_slots
        self.seed, self.resampled, self.shuffle_buffer, self.drop_last = seed, resampled, shuffle_buffer, drop_last
        self.tokenizer, self.slot_states, self.rotation = tokenizer, slot_states, rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        position = ((info.id if info is not None else 0) + self.rotation) % self.workers
        slot = self.rank * self.workers + position
        skips = SkipCounter()
        stream = SlotStream(self.plans, slot, self.total_slots,
                            seed=self.seed, resampled=self.resampled, shuffle_buffer=self.shuffle_buffer,
                            skips=skips, state=self.slot_states.get(slot))
        reported = [0] * len(self.plans)

        def meta(final: bool) -> dict:
            counts = stream.read_counts()
            delta = [c - r for c, r in zip(counts, reported)]
            reported[:] = counts
            return {"slot": slot, "position": position, "state": stream.state_dict(), "skips": skips.drain(),
                    "read": delta, "final": final}

        examples: list[dict[str, Any]] = []
        for raw in stream:
            try:
                examples.append(to_example(raw, self.spec))
            except Skip as skip:
                skips.skip(skip.reason, f"{raw.key!r} in {mask_url(raw.shard)}")
                continue
            if len(examples) == self.batch_size:
                yield {**collate(examples, self.tokenizer), "_meta": meta(False)}
                examples = []
        if examples and not self.drop_last:
            yield {**collate(examples, self.tokenizer), "_meta": meta(False)}
        yield {"_meta": meta(True)}


def keep_batch(item: Any) -> Any:
    """Batches are collated in the worker; skip DataLoader's recursive default_convert."""
    return item


def _at_epoch_start(state: dict) -> bool:
    start = {"epoch": state["epoch"], "unit": 0, "offset": 0}
    return state["block"] == 0 and state["emitted"] == 0 and all(c in (None, start) for c in state["cursors"])


class StreamLoader:
    """Iterable of collated batches for one rank; `state_dict()`/`load_state_dict()` save and
    restore the position exactly; `skipped` counts skipped samples by reason.

    Resampled: one endless pass. Epoch mode: each `iter()` is (the rest of) one epoch.
    """

    def __init__(self, plans: list[SourcePlan], spec: ExampleSpec, cfg: DataConfig, *, batch_size: int, rank: int,
                 world_size: int, tokenizer: Optional[Callable] = None, drop_last: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.plans, self.spec, self.cfg = plans, spec, cfg
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.tokenizer, self.drop_last = tokenizer, drop_last
        self.workers = max(1, cfg.num_workers)
        self.total_slots = self.workers * world_size
        if not cfg.resampled:
            for plan in plans:
                if len(plan.units) < self.total_slots:
                    raise ValueError(f"{plan.name()}: {len(plan.units)} shard(s) cannot be split across "
                                     f"{world_size} rank(s) x {self.workers} worker(s) in epoch mode; "
                                     f"write more shards, use fewer workers, or set data.resampled: true")
        self._slot_states: dict[int, dict] = {}
        self._rotation = 0
        self._skips = SkipCounter()
        self.epoch_passes = 0

    @property
    def skipped(self) -> dict[str, int]:
        return self._skips.as_dict()

    @property
    def samples_per_epoch(self) -> Optional[int]:
        """Samples this rank reads per epoch, from `sizes.json` (None if unknown)."""
        total = 0
        for plan in self.plans:
            if plan.sizes is None:
                return None
            total += sum(plan.sizes.values())
        return total // self.world_size

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "world_size": self.world_size, "workers": self.workers,
                "rank": self.rank, "rotation": self._rotation, "skipped": self.skipped,
                "slots": {str(k): v for k, v in self._slot_states.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data position has version {state.get('version')}, expected {STATE_VERSION}")
        if (state["world_size"], state["workers"]) != (self.world_size, self.workers):
            raise ValueError(f"data position was saved with {state['world_size']} rank(s) x {state['workers']} "
                             f"worker(s); this run has {self.world_size} x {self.workers}: resume with the same "
                             f"data.num_workers and world size")
        self._slot_states = {int(k): v for k, v in state["slots"].items()}
        self._rotation = int(state["rotation"])
        self._skips = SkipCounter()
        self._skips.update(state.get("skipped", {}))

    def _dataset(self) -> _BatchStream:
        return _BatchStream(self.plans, self.spec, batch_size=self.batch_size, rank=self.rank, workers=self.workers,
                            total_slots=self.total_slots, seed=self.cfg.seed, resampled=self.cfg.resampled, shuffle_buffer=self.cfg.shuffle_buffer,
                            drop_last=self.drop_last, tokenizer=self.tokenizer, slot_states=dict(self._slot_states),
                            rotation=self._rotation)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        at_epoch_start = all(_at_epoch_start(s) for s in self._slot_states.values())
        read = [0] * len(self.plans)
        loader = DataLoader(self._dataset(), batch_size=None, num_workers=self.cfg.num_workers, collate_fn=keep_batch,
                            persistent_workers=False, prefetch_factor=2 if self.cfg.num_workers else None,
                            multiprocessing_context="fork" if self.cfg.num_workers else None)
        for item in loader:
            meta = item.pop("_meta")
            self._slot_states[meta["slot"]] = meta["state"]
            self._skips.update(meta["skips"])
            read = [a + b for a, b in zip(read, meta["read"])]
            if meta["final"]:
                continue
            self._rotation = (meta["position"] + 1) % self.workers
            yield item
        self.epoch_passes += 1
        for plan, n in zip(self.plans, read):
            if n == 0 and at_epoch_start:
                raise EmptySourceError(f"{plan.name()} yielded no samples in a whole epoch "
                                       f"(skipped by reason: {self.skipped})")


def build_loader(cfg: DataConfig, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 want: set[str] | frozenset[str] = frozenset({"image", "caption", "key"}),
                 tokenizer: Optional[Callable] = None, state: Optional[dict] = None,
                 drop_last: bool = False) -> StreamLoader:
    """The loader a training stage iterates. `want` picks the batch fields:

    `image` FloatTensor [B, 3, S, S] in [-1, 1] (S = cfg.image_size), `caption` list[str],
    `tokens` LongTensor [B, L] (needs `tokenizer`: list[str] -> LongTensor), `image_embed` /
    `text_embed` [B, D] float32, `text_encodings` [B, L, W] float32 with `text_mask` [B, L]
    bool, `key` list[str] (always present). Embedding fields need `embeddings` on each
    source (or a clip-retrieval source). `state`: a previous `loader.state_dict()`.
    """
    want = frozenset(want) | {"key"}
    if "text_mask" in want:  # the mask comes with the encodings it masks
        want = want | {"text_encodings"}
    if "tokens" in want and tokenizer is None:
        raise ValueError("build_loader: 'tokens' wanted but no tokenizer given")
    if tokenizer is not None:
        want = want | {"caption"}
    plans, spec = plan_sources(cfg, want)
    loader = StreamLoader(plans, spec, cfg, batch_size=batch_size, rank=rank, world_size=world_size,
                          tokenizer=tokenizer, drop_last=drop_last)
    if state is not None:
        loader.load_state_dict(state)
    return loader
