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
5. At another layout (world size or worker count), `load_state_dicts(every old rank's
   position)` deals the old layout's unfinished pass over the new slots (data_pipeline.reshard).

Positions and slot streams live in data_pipeline.cursor.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.config import DataConfig
from data_pipeline.cursor import EmptySourceError, SlotReader, SlotStream, at_epoch_start
from data_pipeline.decode import Skip
from data_pipeline.io import mask_url
from data_pipeline.reshard import carry_over, split_skips
from data_pipeline.sources import ExampleSpec, SourcePlan, collate, plan_sources, to_example
from data_pipeline.stats import SkipCounter

__all__ = ["EmptySourceError", "SlotStream", "StreamLoader", "build_loader"]

# 2: positions record each block's end and length (needed to carry them to another layout)
STATE_VERSION = 2
READABLE_VERSIONS = (1, 2)


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
        stream = SlotReader(self.plans, slot, self.total_slots,
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


def _check_version(state: dict) -> None:
    if state.get("version") not in READABLE_VERSIONS:
        raise ValueError(f"data position has version {state.get('version')}, expected one of {READABLE_VERSIONS}")


def keep_batch(item: Any) -> Any:
    """Batches are collated in the worker; skip DataLoader's recursive default_convert."""
    return item


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
                "shuffle_buffer": self.cfg.shuffle_buffer, "slots": {str(k): v for k, v in self._slot_states.items()}}

    def layout_matches(self, state: dict) -> bool:
        """Whether `state` was saved by this layout (world size and workers): then this rank's
        own position is all it needs; otherwise every old rank's (`load_state_dicts`)."""
        return (state["world_size"], state["workers"]) == (self.world_size, self.workers)

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where this rank's `state_dict()` left off (same layout)."""
        _check_version(state)
        if not self.layout_matches(state):
            raise ValueError(f"data position was saved with {state['world_size']} rank(s) x {state['workers']} "
                             f"worker(s); this run has {self.world_size} x {self.workers}: give every old rank's "
                             f"position to load_state_dicts to carry it over")
        self._slot_states = {int(k): v for k, v in state["slots"].items()}
        self._rotation = int(state["rotation"])
        self._skips = SkipCounter()
        self._skips.update(state.get("skipped", {}))

    def load_state_dicts(self, states: list[dict]) -> None:
        """Continue the pass that the job which saved `states` (every rank's `state_dict()`, in
        rank order) was in, at this loader's layout: each sample of it not yet delivered is
        delivered once by the new ranks (see data_pipeline.reshard and docs/training.md)."""
        for state in states:
            _check_version(state)
        if len(states) == self.world_size and self.layout_matches(states[self.rank]):
            self.load_state_dict(states[self.rank])
            return
        mine = range(self.rank * self.workers, (self.rank + 1) * self.workers)
        self._slot_states = carry_over(self.plans, states, seed=self.cfg.seed, resampled=self.cfg.resampled,
                                       shuffle_buffer=self.cfg.shuffle_buffer, total_slots=self.total_slots, slots=mine)
        self._rotation = 0
        self._skips = SkipCounter()
        self._skips.update(split_skips(states, self.rank, self.world_size))

    def _dataset(self) -> _BatchStream:
        return _BatchStream(self.plans, self.spec, batch_size=self.batch_size, rank=self.rank, workers=self.workers,
                            total_slots=self.total_slots, seed=self.cfg.seed, resampled=self.cfg.resampled, shuffle_buffer=self.cfg.shuffle_buffer,
                            drop_last=self.drop_last, tokenizer=self.tokenizer, slot_states=dict(self._slot_states),
                            rotation=self._rotation)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        whole_epoch = all(map(at_epoch_start, self._slot_states.values()))
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
            if n == 0 and whole_epoch:
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
