"""Who is still there: a heartbeat per rank in the job's store, read when a collective fails.

A collective that times out or loses a connection says only that some peer did not answer;
in a ring every rank waits on its neighbour, so the rank that notices is rarely the one next
to the rank that is gone. To name it, every rank beats from a daemon thread into the TCPStore
that every launcher provides at MASTER_ADDR:MASTER_PORT (torchrun's agent on node 0, or
rank 0 itself), and records once where it runs. After a failure, `report()` reads the beats
twice, a few periods apart: a rank whose beat stood still is lost (killed, its host down or
its link cut); one that still beats is alive and only stuck. The store lives on the master
node, so when the store does not answer, the master node is lost (or this host's own link).

A beat is one small `set` per rank per period (at most one a second): nothing next to a step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from datetime import timedelta
from typing import Any, Iterable, Optional

from torch.distributed import PrefixStore, TCPStore


@dataclasses.dataclass
class _Watch:
    store: Any  # the main thread's own connection; the beating thread has another
    rank: int
    world_size: int
    master: tuple[str, int]
    period_s: float
    stopped: threading.Event


_watch: Optional[_Watch] = None


def period_for(timeout_s: float) -> float:
    """Seconds between beats: a thirtieth of the collective timeout, within 0.2-1 s."""
    return min(1.0, max(0.2, timeout_s / 30))


def start(rank: int, world_size: int, master: tuple[str, int], timeout_s: float, where: dict[str, Any]) -> None:
    """Record where this rank runs (`where`: node, host, address) and start its heartbeat."""
    global _watch
    stop()
    host, port = master
    # torchrun restarts keep the agent's store: each attempt beats under its own prefix
    prefix = f"unclip/liveness/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    client = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    store = PrefixStore(prefix, client)
    store.set(f"where/{rank}", json.dumps(where))
    store.set(f"beat/{rank}", "0")
    period = period_for(timeout_s)
    stopped = threading.Event()
    beats = PrefixStore(prefix, client.clone())
    threading.Thread(target=_beat, args=(beats, rank, period, stopped), name="unclip-heartbeat", daemon=True).start()
    _watch = _Watch(store, rank, world_size, master, period, stopped)


def _beat(store: Any, rank: int, period: float, stopped: threading.Event) -> None:
    count = 0
    while not stopped.wait(period):
        count += 1
        try:
            store.set(f"beat/{rank}", str(count))
        except Exception:  # the store is gone; report() finds out the same way and says so
            return


def stop() -> None:
    """Stop beating (at the end of a run, before the store's host goes away)."""
    global _watch
    if _watch is not None:
        _watch.stopped.set()
        _watch = None


def report() -> Optional[str]:
    """After a failed collective: one line naming the lost node(s); None before `start`.

    Takes about three beat periods (at most ~3 s): long enough for every live rank to beat,
    and for the other survivors to say that they saw the failure too. Some store calls wait
    on the socket without a timeout (`check`), so the reading runs in a thread with a deadline:
    a store out of reach (the master lost, or this host's link) cannot keep this rank waiting.
    """
    watch = _watch
    if watch is None:
        return None
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(_diagnose(watch)), name="unclip-liveness", daemon=True)
    reader.start()
    reader.join(3 * watch.period_s + 10)
    return found[0] if found else _unreachable(watch)


def _diagnose(watch: _Watch) -> str:
    window = 3 * watch.period_s
    everyone = range(watch.world_size)
    try:
        watch.store.set_timeout(timedelta(seconds=max(2.0, window)))
        watch.store.set(f"noticed/{watch.rank}", "1")
        before = _read(watch.store, "beat", everyone)
        time.sleep(window)
        after = _read(watch.store, "beat", everyone)
        noticed = set(_read(watch.store, "noticed", everyone))
        lost = [r for r in everyone if r != watch.rank and (r not in before or before[r] == after.get(r))]
        where = {r: json.loads(v) for r, v in _read(watch.store, "where", lost).items()}
    except (RuntimeError, OSError):  # torch's DistStoreError/DistNetworkError are RuntimeErrors
        return _unreachable(watch)
    if lost:
        return "lost: " + "; ".join(_describe(place, ranks) for place, ranks in _by_place(lost, where))
    stuck = [r for r in everyone if r not in noticed]
    if stuck:
        return f"no node is lost (every rank still beats); {_ranks(stuck)} did not see the failure: stuck, not gone"
    return "no node is lost: every rank still beats and saw the failure"


def _unreachable(watch: _Watch) -> str:
    host, port = watch.master
    return (f"the job's store at {host}:{port}, on the master node, does not answer: the master node is lost, "
            "or this host lost its network")


def _read(store: Any, kind: str, ranks: Iterable[int]) -> dict[int, str]:
    """{rank: value} of the keys `kind/<rank>` that exist (a get would wait for a missing one)."""
    ranks = list(ranks)
    keys = [f"{kind}/{r}" for r in ranks]
    if keys and store.check(keys):
        return {r: v.decode() for r, v in zip(ranks, store.multi_get(keys))}
    return {r: store.get(k).decode() for r, k in zip(ranks, keys) if store.check([k])}


def _by_place(ranks: list[int], where: dict[int, dict]) -> list[tuple[tuple, list[int]]]:
    groups: dict[tuple, list[int]] = {}
    for r in ranks:
        place = where.get(r)
        key = (place.get("node"), place.get("host"), place.get("address")) if place else (None, None, None)
        groups.setdefault(key, []).append(r)
    return list(groups.items())


def _describe(place: tuple, ranks: list[int]) -> str:
    node, host, address = place
    if host is None:
        return f"{_ranks(ranks)} (never recorded where it ran)"
    label = f"node {node}" if node is not None else "the node"
    at = ", ".join(str(x) for x in (host, address) if x)
    return f"{label} ({at}): {_ranks(ranks)} stopped beating"


def _ranks(ranks: list[int]) -> str:
    shown = ", ".join(str(r) for r in ranks[:16])
    more = f" and {len(ranks) - 16} more" if len(ranks) > 16 else ""
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}{more}"
