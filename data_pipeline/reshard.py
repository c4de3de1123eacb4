"""Carrying a data position over to another layout: a new world size or loader worker count.

Every slot (rank x worker) of the old layout saved its exact position. The work the old
layout had not finished is, per old slot:

- the block in flight: the records of its current shuffle block not yet emitted (re-read
  from the block's start cursors by whoever takes it: a *tail*);
- the rest of the units it was reading: the unit it was in, from the sample after the last
  one read, and the units after it (*pieces*);
- epoch mode: the whole deal of every later epoch that some other old slot had already
  begun (ranks run into the next epoch at different times), so that every epoch any old
  slot began is finished exactly once; resampled: only each source's current round;
- whatever it was itself still carrying from an earlier change of layout.

Tails and pieces are dealt round-robin over the new layout's slots, which read them first
(`data_pipeline.cursor.CarriedWork`) and then start their own streams: epoch mode at the
epoch after the last one begun, resampled in a new layout number, whose draws are seeded
apart from every earlier draw. Every new rank computes the same plan from all old ranks'
positions (a pure function: listings and arithmetic, no shard is read unless a position was
saved by an older version without its block's end).
"""

from __future__ import annotations

import collections
from typing import Iterable, Optional

from data_pipeline.cursor import Piece, at_epoch_start, dealt_units, initial_state, tail_stream
from data_pipeline.sources import SourcePlan
from data_pipeline.stats import SkipCounter


def old_slots(states: list[dict], n_sources: int) -> list[tuple[int, int, dict]]:
    """(slot, total slots, position) of every slot of the layout that saved `states` (one per
    rank); a slot that never handed out a batch is at its start."""
    world, workers = int(states[0]["world_size"]), int(states[0]["workers"])
    if len(states) != world or any((int(s["world_size"]), int(s["workers"])) != (world, workers) for s in states):
        raise ValueError(f"data positions of {len(states)} rank(s) do not form one layout of {world} rank(s) x "
                         f"{workers} worker(s)")
    out = []
    for rank, state in enumerate(states):
        if int(state["rank"]) != rank:
            raise ValueError(f"data position {rank} was saved by rank {state['rank']}")
        for worker in range(workers):
            slot = rank * workers + worker
            out.append((slot, world * workers, state["slots"].get(str(slot)) or initial_state(n_sources)))
    return out


class _Plan:
    """The unfinished work of an old layout, gathered slot by slot."""

    def __init__(self, plans: list[SourcePlan], *, seed: int, resampled: bool):
        self.plans, self.seed, self.resampled = plans, seed, resampled
        self.tails: list[dict] = []
        self.carried: list[list[Piece]] = [[] for _ in plans]  # older layouts' pieces first
        self.by_epoch: dict[int, list[list[Piece]]] = collections.defaultdict(lambda: [[] for _ in plans])
        self._orders: dict[tuple[int, int], list[str]] = {}  # (source, epoch) -> the epoch's permutation

    def dealt(self, i: int, *, slot: int, total_slots: int, epoch: int, gen: int) -> list[str]:
        """`dealt_units`, with each epoch's permutation computed once for all old slots."""
        plan = self.plans[i]
        if self.resampled:
            return dealt_units(plan, seed=self.seed, slot=slot, total_slots=total_slots, epoch=epoch, resampled=True,
                               gen=gen)
        if (i, epoch) not in self._orders:
            self._orders[(i, epoch)] = dealt_units(plan, seed=self.seed, slot=0, total_slots=1, epoch=epoch,
                                                   resampled=False)
        return self._orders[(i, epoch)][slot::total_slots]

    def add_stream(self, state: dict, desc: dict, epoch: Optional[int]) -> None:
        """The rest of one stream's pass (its tail and pieces). `desc`: how the stream deals
        (slot, total_slots, gen, pieces, label, shuffle_buffer); `epoch` files its pieces (None:
        carried from an earlier layout). A resampled round not begun is owed to no one."""
        state = {**initial_state(len(self.plans), state.get("epoch", 0)), **state}
        read_to, block_len = state.get("read_to"), state.get("block_len")
        if state["emitted"] == 0:
            read_to, block_len = state["cursors"], 0
        elif read_to is None or block_len is None:  # saved before positions recorded a block's end
            replay = tail_stream(self.plans, {**desc, **state}, seed=self.seed, resampled=self.resampled,
                                 skips=SkipCounter())
            block_len = len(replay.read_block())
            read_to = replay.state_dict()["read_to"]
        if state["emitted"] < block_len:
            self.tails.append({**desc, **{k: state[k] for k in ("epoch", "block", "emitted", "cursors")}})
        target = self.carried if epoch is None else self.by_epoch[epoch]
        for i in range(len(self.plans)):
            cursor = read_to[i] or {"epoch": 0 if self.resampled else state["epoch"], "unit": 0, "offset": 0}
            if desc.get("pieces") is not None:
                units = desc["pieces"][i]
            else:
                units = [[u, 0] for u in self.dealt(i, slot=desc["slot"], total_slots=desc["total_slots"],
                                                    epoch=cursor["epoch"], gen=desc["gen"])]
            unbegun_draw = self.resampled and desc.get("pieces") is None and (cursor["unit"], cursor["offset"]) == (0, 0)
            if cursor["unit"] < len(units) and not unbegun_draw:
                url, first = units[cursor["unit"]]
                target[i].append([url, first + cursor["offset"]])
                target[i].extend(units[cursor["unit"] + 1:])

    def add_epoch(self, slot: int, total_slots: int, epoch: int) -> None:
        """A whole epoch's deal of one old slot that had not begun it."""
        for i in range(len(self.plans)):
            self.by_epoch[epoch][i].extend([u, 0] for u in self.dealt(i, slot=slot, total_slots=total_slots,
                                                                      epoch=epoch, gen=0))

    def pieces(self) -> list[list[Piece]]:
        """Per source: carried pieces, then each epoch's in order; known-empty pieces dropped."""
        out = []
        for i, plan in enumerate(self.plans):
            merged = self.carried[i] + [p for e in sorted(self.by_epoch) for p in self.by_epoch[e][i]]
            if plan.sizes is not None:
                merged = [p for p in merged if p[1] < plan.sizes.get(p[0], p[1] + 1)]
            out.append(merged)
        return out


def _own_desc(slot: int, total_slots: int, state: dict, shuffle_buffer: int) -> dict:
    gen = int(state.get("gen", 0))
    return {"slot": slot, "total_slots": total_slots, "gen": gen, "pieces": None, "shuffle_buffer": shuffle_buffer,
            "label": str(slot) if gen == 0 else f"{slot}g{gen}"}


def _begun(state: dict) -> bool:
    return not at_epoch_start({k: v for k, v in state.items() if k != "carry"})


def carry_over(plans: list[SourcePlan], states: list[dict], *, seed: int, resampled: bool, shuffle_buffer: int,
               total_slots: int, slots: Iterable[int]) -> dict[int, dict]:
    """New slot -> its position: its share of the unfinished work of the layout that saved
    `states` (every old rank's `StreamLoader.state_dict()`, in rank order), for the new
    layout of `total_slots` slots; only the slots in `slots` are returned."""
    old = old_slots(states, len(plans))
    old_buffer = int(states[0].get("shuffle_buffer", shuffle_buffer))
    work = _Plan(plans, seed=seed, resampled=resampled)
    last_epoch = max((st["epoch"] if _begun(st) else st["epoch"] - 1) for _, _, st in old)
    gen = max(int(st.get("gen", 0)) for _, _, st in old) + 1
    for slot, total, state in old:
        carry = state.get("carry")
        if carry:
            work.tails.extend(dict(t) for t in carry["tails"])
            desc = {"slot": slot, "total_slots": 1, "gen": 0, "pieces": carry["pieces"], "label": carry["label"],
                    "shuffle_buffer": carry["shuffle_buffer"]}
            work.add_stream(carry.get("stream") or {}, desc, None)
    for slot, total, state in old:
        own = {k: v for k, v in state.items() if k != "carry"}
        desc = _own_desc(slot, total, own, old_buffer)
        if resampled:
            work.add_stream(own, desc, 0)
            continue
        if own["epoch"] <= last_epoch:
            work.add_stream(own, desc, own["epoch"])
        for epoch in range(own["epoch"] + 1, last_epoch + 1):
            work.add_epoch(slot, total, epoch)
    pieces = work.pieces()
    wanted = set(slots)
    out = {}
    for new in sorted(wanted):
        tails = [t for k, t in enumerate(work.tails) if k % total_slots == new]
        shift = len(work.tails)
        mine = [[p for k, p in enumerate(src) if (k + shift) % total_slots == new] for src in pieces]
        state = initial_state(len(plans), 0 if resampled else last_epoch + 1, gen)
        if tails or any(mine):
            state["carry"] = {"tails": tails, "pieces": mine, "label": f"c{gen}:{new}", "shuffle_buffer": shuffle_buffer,
                              "stream": None}
        out[new] = state
    return out


def split_skips(states: list[dict], rank: int, world_size: int) -> dict[str, int]:
    """The skip counts new rank `rank` continues from: old rank r's go to new rank r mod
    world_size, so the job's totals are kept."""
    total: collections.Counter = collections.Counter()
    for old_rank, state in enumerate(states):
        if old_rank % world_size == rank:
            total.update(state.get("skipped", {}))
    return dict(total)
