"""A data position carried over to another world size (data_pipeline/reshard.py): the pass the
old ranks were in goes on at the new world size, every sample of it delivered exactly once
across old and new ranks; keys are counted across the boundary."""

from __future__ import annotations

import collections
import itertools

import pytest

from data_pipeline.config import DataConfig, SourceConfig
from data_pipeline.cursor import dealt_units
from data_pipeline.sources import plan_sources
from data_pipeline.stream import build_loader
from data_pipeline.tario import TarWriter

SIZES = (5, 3, 7, 4, 6, 2, 8, 5, 3)  # samples per shard: uneven, so ranks drift apart


def write_caption_shards(folder, sizes=SIZES):
    """Caption-only shards; key `s{shard}_{i}` is in exactly one shard. Returns (urls, keys per url)."""
    urls, keys = [], {}
    for s, n in enumerate(sizes):
        url = str(folder / f"part-{s:06d}.tar")
        with TarWriter(url) as w:
            for i in range(n):
                w.write(f"s{s}_{i}", {"txt": f"caption {s} {i}".encode()})
        urls.append(url)
        keys[url] = [f"s{s}_{i}" for i in range(n)]
    return urls, keys


def cfg(urls, *, workers, resampled=False, shuffle_buffer=4):
    return DataConfig(sources=[SourceConfig(shards=urls)], resampled=resampled, shuffle_buffer=shuffle_buffer,
                      num_workers=workers, seed=3)


def loaders(urls, world, workers, states=None, **kw):
    out = [build_loader(cfg(urls, workers=workers, **kw), batch_size=3, rank=r, world_size=world, want={"caption"})
           for r in range(world)]
    if states is not None:
        for loader in out:
            loader.load_state_dicts(states)
    return out


def endless(loader):
    """Batches as the trainer draws them: pass after pass (trainer/loop.py Batches)."""
    while True:
        yield from loader


def step_lockstep(iterators, steps):
    """Every rank takes `steps` batches (ranks step together); the keys they delivered."""
    got = collections.Counter()
    for _ in range(steps):
        for it in iterators:
            got.update(next(it)["key"])
    return got


def one_pass(loader):
    return collections.Counter(k for batch in loader for k in batch["key"])


@pytest.mark.parametrize("old_world,old_workers,new_world,new_workers",
                         [(2, 0, 1, 0), (1, 0, 2, 0), (2, 0, 3, 0), (2, 2, 3, 1)])
def test_the_pass_continues_at_another_world_size_exactly_once(tmp_path, old_world, old_workers, new_world,
                                                              new_workers):
    urls, keys = write_caption_shards(tmp_path)
    everything = collections.Counter(k for ks in keys.values() for k in ks)
    old = loaders(urls, old_world, old_workers)
    iterators = [iter(loader) for loader in old]
    delivered = step_lockstep(iterators, 3)  # 9 samples per rank: mid-pass, blocks in flight
    states = [loader.state_dict() for loader in old]
    del iterators  # the old job is gone
    new = loaders(urls, new_world, new_workers, states)
    for loader in new:
        delivered.update(one_pass(loader))
    assert delivered == everything  # none repeated, none skipped
    # the passes after it follow the new layout: each again exactly once
    assert sum((one_pass(loader) for loader in new), collections.Counter()) == everything


def test_ranks_in_different_epochs_finish_every_epoch_begun(tmp_path):
    # rank 0 or 1 gets the 9-sample shard: the other runs out first and begins epoch 1
    urls, keys = write_caption_shards(tmp_path, sizes=(3, 3, 3, 9))
    everything = collections.Counter(k for ks in keys.values() for k in ks)
    old = loaders(urls, 2, 0)
    delivered = step_lockstep([endless(loader) for loader in old], 3)
    states = [loader.state_dict() for loader in old]
    assert {s["slots"][str(r)]["epoch"] for r, s in enumerate(states)} == {0, 1}
    for new_world in (1, 3):
        new = loaders(urls, new_world, 0, states)
        carried = sum((one_pass(loader) for loader in new), collections.Counter())
        assert delivered + carried == everything + everything, new_world  # epochs 0 and 1, once each
        assert sum((one_pass(loader) for loader in new), collections.Counter()) == everything  # epoch 2


def test_a_second_change_of_world_size_while_carrying(tmp_path):
    urls, keys = write_caption_shards(tmp_path)
    everything = collections.Counter(k for ks in keys.values() for k in ks)
    first = loaders(urls, 2, 0)
    delivered = step_lockstep([iter(loader) for loader in first], 2)
    second = loaders(urls, 3, 0, [loader.state_dict() for loader in first])
    delivered += step_lockstep([iter(loader) for loader in second], 2)  # mid-way through the carried work
    states = [loader.state_dict() for loader in second]
    assert all("carry" in s["slots"][str(r)] for r, s in enumerate(states))
    (third,) = loaders(urls, 1, 0, states)
    delivered += one_pass(third)
    assert delivered == everything


def test_resampled_rounds_begun_are_read_to_their_end_once(tmp_path):
    """Resampled mode has no passes: the shards each old slot had drawn (its current round)
    are finished exactly once by the new ranks; then the new slots draw afresh."""
    urls, keys = write_caption_shards(tmp_path, sizes=(4, 6, 5, 3, 7, 2))
    old = loaders(urls, 2, 0, resampled=True)
    delivered = step_lockstep([iter(loader) for loader in old], 4)
    states = [loader.state_dict() for loader in old]
    plans, _ = plan_sources(cfg(urls, workers=0, resampled=True), frozenset({"caption"}))
    owed = collections.Counter()
    for slot, state in enumerate(states):
        cursor = state["slots"][str(slot)]["read_to"][0]
        last_round = cursor["epoch"] - ((cursor["unit"], cursor["offset"]) == (0, 0))
        for rnd in range(last_round + 1):
            for url in dealt_units(plans[0], seed=3, slot=slot, total_slots=2, epoch=rnd, resampled=True):
                owed.update(keys[url])
    carried = collections.Counter()
    for rank in range(3):
        (loader,) = [build_loader(cfg(urls, workers=0, resampled=True), batch_size=1, rank=rank, world_size=3,
                                  want={"caption"})]
        loader.load_state_dicts(states)
        for batch in itertools.islice(loader, 200):
            if "carry" not in loader.state_dict()["slots"][str(rank)]:
                break  # the first sample of its own, fresh draws
            carried.update(batch["key"])
        assert loader.state_dict()["slots"][str(rank)]["gen"] == 1  # seeded apart from the old draws
    assert delivered + carried == owed


def test_a_position_of_another_layout_needs_every_rank(tmp_path):
    urls, _ = write_caption_shards(tmp_path)
    (one,) = loaders(urls, 1, 0)
    next(iter(one))
    state = one.state_dict()
    two = build_loader(cfg(urls, workers=0), batch_size=3, rank=0, world_size=2, want={"caption"})
    assert not two.layout_matches(state)
    with pytest.raises(ValueError, match="load_state_dicts"):
        two.load_state_dict(state)
    with pytest.raises(ValueError, match="do not form one layout"):
        two.load_state_dicts([state, state])
