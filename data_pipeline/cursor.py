"""One slot's raw samples with an exact, serialisable position.

A *slot* is one (rank, loader worker) of a layout of `total_slots` slots. What it reads:

- its own stream (`SlotStream`): per source, the units dealt to it (epoch mode: a seeded
  permutation of all units, dealt round-robin; resampled: rounds of ~units/slots draws with
  replacement), read in blocks of `shuffle_buffer` raw samples mixed by source weight and
  shuffled. Position: (epoch, block, records emitted from it, per-source cursors at the
  block's start and after its read, the block's length);
- before that, after a resume at another layout (world size or worker count), its share of
  the old layout's unfinished work (`CarriedWork`, planned by `data_pipeline.reshard`):
  blocks that were in flight (re-read from their start cursors, the records not yet emitted)
  and explicit *pieces* (unit, first sample), read once like an epoch of their own.

Layouts are numbered (`gen`): every change of layout starts a new one, whose resampled draws
and shuffles are seeded apart from every earlier layout's, so no draw is ever replayed.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Optional

from data_pipeline.sources import SourcePlan
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import RawSample

Piece = list  # [unit url, first sample]: a unit read from a position on (JSON-friendly)


class EmptySourceError(RuntimeError):
    """A source yielded no sample at all: an error, never a silently empty epoch."""


def dealt_units(plan: SourcePlan, *, seed: int, slot: int, total_slots: int, epoch: int, resampled: bool,
                gen: int = 0) -> list[str]:
    """The units of `plan` that slot `slot` of `total_slots` reads in `epoch` (resampled: round)."""
    if resampled:
        tag = f"{seed}:{plan.index}:{slot}:{epoch}" + (f":g{gen}" if gen else "")
        return random.Random(tag).choices(plan.units, k=max(1, math.ceil(len(plan.units) / total_slots)))
    order = list(plan.units)
    random.Random(f"{seed}:{plan.index}:{epoch}").shuffle(order)
    return order[slot::total_slots]


class SourceCursor:
    """Position in one source for one slot: (epoch, unit number, samples read from it).

    With `pieces`, the units are that explicit list (read once, whatever the mode)."""

    def __init__(self, plan: SourcePlan, slot: int, total_slots: int, seed: int, resampled: bool,
                 skips: SkipCounter, state: Optional[dict] = None, *, gen: int = 0,
                 pieces: Optional[list[Piece]] = None):
        self.plan, self.slot, self.total_slots = plan, slot, total_slots
        self.seed, self.skips, self.gen, self.pieces = seed, skips, gen, pieces
        self.resampled = resampled and pieces is None
        state = state or {"epoch": 0, "unit": 0, "offset": 0}
        self.epoch, self.unit, self.offset = state["epoch"], state["unit"], state["offset"]
        self._units_epoch: Optional[int] = None
        self._units: list[Piece] = []
        self._records: Optional[Iterator[RawSample]] = None
        self._units_without_samples = 0
        self.read_total = 0

    def state(self) -> dict:
        return {"epoch": self.epoch, "unit": self.unit, "offset": self.offset}

    def units(self) -> list[Piece]:
        if self.pieces is not None:
            return self.pieces
        if self._units_epoch != self.epoch:
            self._units = [[u, 0] for u in dealt_units(self.plan, seed=self.seed, slot=self.slot, gen=self.gen,
                                                       total_slots=self.total_slots, epoch=self.epoch,
                                                       resampled=self.resampled)]
            self._units_epoch = self.epoch
        return self._units

    def next(self) -> Optional[RawSample]:
        """The next raw sample, or None when this epoch's units are done (epoch mode, pieces)."""
        while True:
            if self._records is None:
                units = self.units()
                if self.unit >= len(units):
                    if not self.resampled:
                        return None
                    self.epoch, self.unit, self.offset = self.epoch + 1, 0, 0
                    continue
                self._check_not_empty()
                url, first = units[self.unit]
                self._records = self.plan.read(url, self.skips, first + self.offset)
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


def initial_state(n_sources: int, epoch: int = 0, gen: int = 0) -> dict:
    return {"epoch": epoch, "block": 0, "emitted": 0, "cursors": [None] * n_sources, "gen": gen}


def at_epoch_start(state: dict) -> bool:
    if state.get("carry"):
        return False
    start = {"epoch": state["epoch"], "unit": 0, "offset": 0}
    return state["block"] == 0 and state["emitted"] == 0 and all(c in (None, start) for c in state["cursors"])


class SlotStream:
    """The shuffled, mixed stream of raw samples of one slot, with an exact position.

    `pieces` (one list per source) replaces the dealt units: the stream is then one pass over
    them. `label` names the stream in its shuffle seeds (default: the slot, and its layout)."""

    def __init__(self, plans: list[SourcePlan], slot: int, total_slots: int, *, seed: int, resampled: bool,
                 shuffle_buffer: int, skips: SkipCounter, state: Optional[dict] = None, gen: Optional[int] = None,
                 pieces: Optional[list[list[Piece]]] = None, label: Optional[str] = None):
        state = state or initial_state(len(plans), gen=gen or 0)
        self.gen = int(state.get("gen", 0) if gen is None else gen)
        self.plans, self.slot, self.total_slots, self.seed = plans, slot, total_slots, seed
        self.resampled = resampled and pieces is None
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle_buffer > 0
        self.block_size = shuffle_buffer if shuffle_buffer > 0 else 256
        self.label = label if label is not None else (str(slot) if self.gen == 0 else f"{slot}g{self.gen}")
        self.weights = [p.weight for p in plans]
        self._resumed_mid_epoch = not at_epoch_start(state)
        self.epoch, self.block, self.emitted = state["epoch"], state["block"], state["emitted"]
        # a cursor not yet moved starts this epoch's deal (resampled: its first round)
        fresh = {"epoch": 0 if self.resampled else self.epoch, "unit": 0, "offset": 0}
        self.cursors = [SourceCursor(p, slot, total_slots, seed, resampled, skips, c or fresh, gen=self.gen,
                                     pieces=None if pieces is None else pieces[i])
                        for i, (p, c) in enumerate(zip(plans, state["cursors"]))]
        self._block_start = [c.state() for c in self.cursors]
        # After the block's read: known when saved by this version, or when nothing was read yet.
        self._block_end = state.get("read_to") or (self._block_start if self.emitted == 0 else None)
        self._block_len = state.get("block_len", 0 if self.emitted == 0 else None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self.block, "emitted": self.emitted, "cursors": self._block_start,
                "read_to": self._block_end, "block_len": self._block_len, "gen": self.gen}

    def read_block(self) -> list[RawSample]:
        """Read the current block from the cursors (and shuffle it); the cursors move past it."""
        self._block_start = [c.state() for c in self.cursors]
        rng = random.Random(f"{self.seed}:{self.label}:{self.epoch}:{self.block}")
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
        self._block_end, self._block_len = [c.state() for c in self.cursors], len(records)
        return records

    def one_pass(self) -> Iterator[RawSample]:
        """The rest of the current pass (resampled: endless); the position then is the next
        pass's start. Returns how many records it yielded."""
        produced = 0
        while True:
            records = self.read_block()
            start = self.emitted
            for i in range(start, len(records)):
                self.emitted = i + 1
                produced += 1
                yield records[i]
            if len(records) == self.block_size or self.resampled:
                self.block, self.emitted = self.block + 1, 0
                continue
            self.epoch, self.block, self.emitted = self.epoch + 1, 0, 0
            for cursor in self.cursors:
                cursor.start_epoch(self.epoch)
            self._block_start = [c.state() for c in self.cursors]
            self._block_end, self._block_len = self._block_start, 0
            return produced

    def __iter__(self) -> Iterator[RawSample]:
        """Resampled: endless. Epoch mode: the rest of the current epoch (or, if that is
        already finished, the next one), after which the position is the next epoch's start."""
        produced = yield from self.one_pass()
        if produced == 0 and self._resumed_mid_epoch:  # restored at the very end of an epoch
            self._resumed_mid_epoch = False
            yield from self.one_pass()
        self._resumed_mid_epoch = False

    def read_counts(self) -> list[int]:
        """Raw samples read per source since this stream was built."""
        return [c.read_total for c in self.cursors]


def tail_stream(plans: list[SourcePlan], tail: dict, *, seed: int, resampled: bool, skips: SkipCounter) -> SlotStream:
    """The stream a block in flight (`tail`, see data_pipeline.reshard) was read by, at that block."""
    state = {k: tail[k] for k in ("epoch", "block", "emitted", "cursors")}
    return SlotStream(plans, tail["slot"], tail["total_slots"], seed=seed, resampled=resampled,
                      shuffle_buffer=tail["shuffle_buffer"], skips=skips, state=state, gen=tail["gen"],
                      pieces=tail.get("pieces"), label=tail["label"])


class CarriedWork:
    """The share of an earlier layout's unfinished work that a change of layout gave a slot:
    the blocks in flight (re-read, then the records not yet emitted), then one pass over
    the pieces. State: `{"tails": [...], "pieces": [per source], "label", "shuffle_buffer",
    "stream": the pass's SlotStream position or None}`."""

    def __init__(self, plans: list[SourcePlan], slot: int, state: dict, *, seed: int, resampled: bool,
                 skips: SkipCounter):
        self.plans, self.slot, self.seed, self.resampled, self.skips = plans, slot, seed, resampled, skips
        self.tails = [dict(t) for t in state["tails"]]
        self.pieces, self.label, self.shuffle_buffer = state["pieces"], state["label"], state["shuffle_buffer"]
        self.stream = SlotStream(plans, slot, 1, seed=seed, resampled=resampled, shuffle_buffer=self.shuffle_buffer,
                                 skips=skips, state=state.get("stream"), gen=0, pieces=self.pieces, label=self.label)
        self.read_total = [0] * len(plans)

    def state_dict(self) -> dict:
        return {"tails": [dict(t) for t in self.tails], "pieces": self.pieces, "label": self.label,
                "shuffle_buffer": self.shuffle_buffer, "stream": self.stream.state_dict()}

    def __iter__(self) -> Iterator[RawSample]:
        while self.tails:
            tail = self.tails[0]
            replay = tail_stream(self.plans, tail, seed=self.seed, resampled=self.resampled, skips=self.skips)
            records = replay.read_block()
            self.read_total = [a + b for a, b in zip(self.read_total, replay.read_counts())]
            for i in range(tail["emitted"], len(records)):
                tail["emitted"] = i + 1
                yield records[i]
            self.tails.pop(0)
        yield from self.stream.one_pass()

    def read_counts(self) -> list[int]:
        return [a + b for a, b in zip(self.read_total, self.stream.read_counts())]


class SlotReader:
    """Everything one slot reads: its carried work (if a change of layout gave it some), then
    its own stream. In epoch mode the carried work is a pass of its own (unless it is empty)."""

    def __init__(self, plans: list[SourcePlan], slot: int, total_slots: int, *, seed: int, resampled: bool,
                 shuffle_buffer: int, skips: SkipCounter, state: Optional[dict] = None):
        state = state or initial_state(len(plans))
        self.resampled = resampled
        self.carry = (CarriedWork(plans, slot, state["carry"], seed=seed, resampled=resampled, skips=skips)
                      if state.get("carry") else None)
        own = {k: v for k, v in state.items() if k != "carry"}
        self.own = SlotStream(plans, slot, total_slots, seed=seed, resampled=resampled, shuffle_buffer=shuffle_buffer,
                              skips=skips, state=own)
        self._carried_counts = [0] * len(plans)

    def state_dict(self) -> dict:
        state = self.own.state_dict()
        if self.carry is not None:
            state["carry"] = self.carry.state_dict()
        return state

    def __iter__(self) -> Iterator[RawSample]:
        if self.carry is not None:
            produced = 0
            for record in self.carry:
                produced += 1
                yield record
            self._carried_counts = self.carry.read_counts()
            self.carry = None
            if produced and not self.resampled:
                return
        yield from self.own

    def read_counts(self) -> list[int]:
        carried = self.carry.read_counts() if self.carry is not None else self._carried_counts
        return [a + b for a, b in zip(carried, self.own.read_counts())]
