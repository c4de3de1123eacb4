"""Repeated multi-host fault trials behind the figures in docs/RELIABILITY.md (not collected).

    .venv/bin/python -m tests.infra.multihost_trials --link-down 5 --init 2 --absent 2 --seed 0

The job is the tiny prior of tests/test_multihost.py (60 steps, a checkpoint every 10,
`deepspeed.timeout_s: 10`), one rank per host, hosts made by `infra.netns`:

- link-down: a random host's link is pulled at a random step 5-45 (the master's too).
  Expected: every survivor exits 1 and names the lost node (a survivor of a lost master says
  the master's store does not answer); the link comes back, every node is restarted, the job
  resumes at the newest checkpoint and ends bit-identical to an uninterrupted run.
- init: a random non-master host's rank dies while the process group forms (its user named
  an interface it lacks). Measured: how long the others wait before they give up.
- absent: one node never starts. Measured: how long the master's rendezvous waits.

Prints one line per trial and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

from tests.helpers import TINY_PRIOR, differing, end_state, env_for_tests, latest_step, merged, write_job
from tests.infra.netns import Hosts
from tests.infra.nodes import Node, launch_job

TIMEOUT_S, STEPS, EVERY = 10, 60, 10
RUN_S = 400


def job_config(root: Path) -> Path:
    job = merged(TINY_PRIOR, train={**TINY_PRIOR["train"], "steps": STEPS}, deepspeed={"zero_stage": 2, "timeout_s": TIMEOUT_S},
                 checkpoint={"every_steps": EVERY, "keep_last": 10})
    return write_job(root / "prior.yaml", job)


def user_env() -> dict[str, str]:
    env = env_for_tests()
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def wait_all(nodes: list[Node]) -> list[int]:
    return [node.wait(RUN_S) for node in nodes]


def reference(root: Path, config: Path, count: int) -> tuple[Path, float]:
    run_dir = root / "reference"
    with Hosts(count) as hosts:
        started = time.monotonic()
        codes = wait_all(launch_job(hosts, config, run_dir, 29500, user_env()))
    assert codes == [0] * count, codes
    return run_dir, time.monotonic() - started


def link_down(root: Path, config: Path, ref: Path, count: int, victim: int, step: int, trial: int) -> dict:
    run_dir = root / f"link{trial}"
    record: dict = {"kind": "link-down", "hosts": count, "victim": victim, "step": step}
    with Hosts(count) as hosts:
        started = time.monotonic()
        nodes = launch_job(hosts, config, run_dir, 29510 + 10 * trial, user_env())
        nodes[0].wait_for(f"] step {step} |", RUN_S)
        hosts.link_down(victim)
        down = time.monotonic()
        codes = wait_all(nodes)
        survivors = [n for n in nodes if n.host != victim]
        if victim == 0:
            want = re.compile(rf"{re.escape(hosts.addresses[0])}:\d+, on the master node, does not answer")
        else:
            want = re.compile(rf"lost: node {victim} \([^)]*{re.escape(hosts.addresses[victim])}\): rank {victim} stopped beating")
        named = [n.first("[unclip worker] rank") for n in survivors if want.search(n.stderr)]
        record.update(
            crashed_s=round(time.monotonic() - started, 1),
            survivors_exit_1=all(codes[n.host] == 1 for n in survivors),
            named_by=len(named), survivors=len(survivors),
            named_after_s=round(max(named) - down, 1) if named else None,
            exit_after_s=round(max(n.ended for n in survivors) - down, 1),
        )
        saved = latest_step(run_dir)
        hosts.link_up(victim)
        restarted = time.monotonic()
        nodes = launch_job(hosts, config, run_dir, 29515 + 10 * trial, user_env())
        codes = wait_all(nodes)
        resumed = f"resumed from {run_dir / 'checkpoints' / f'step_{saved:07d}'}" in nodes[0].stdout
        record.update(
            saved=saved, resumed_at_saved=resumed and codes == [0] * count,
            identical=codes == [0] * count and not differing(end_state(run_dir, STEPS, count), end_state(ref, STEPS, count)),
            restart_s=round(time.monotonic() - restarted, 1),
        )
    return record


def init_failure(root: Path, config: Path, count: int, victim: int, trial: int) -> dict:
    with Hosts(count) as hosts:
        nodes = launch_job(hosts, config, root / f"init{trial}", 29700 + trial, user_env(),
                           host_env={victim: {"GLOO_SOCKET_IFNAME": "nosuch0"}})
        codes = wait_all(nodes)
    died = nodes[victim].first(f"[unclip worker] rank {victim} failed")
    gave_up = [n.first("the process group did not form") for n in nodes if n.host != victim]
    return {
        "kind": "init", "hosts": count, "victim": victim, "all_exit_1": codes == [1] * count,
        "others_gave_up_after_s": round(max(g for g in gave_up if g) - died, 1) if died and all(gave_up) else None,
        "all_ended_after_s": round(max(n.ended for n in nodes) - died, 1) if died else None,
    }


def absent(root: Path, config: Path, count: int, trial: int) -> dict:
    with Hosts(count) as hosts:
        (node,) = launch_job(hosts, config, root / f"absent{trial}", 29800 + trial, user_env(), only=[0])
        code = node.wait(RUN_S)
    started = node.first("torch.distributed.run", "stdout")
    return {
        "kind": "absent", "hosts": count, "exit_1": code == 1, "joined_message": f"1/{count} clients joined" in node.stderr,
        "ended_after_s": round(node.ended - started, 1) if started else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--link-down", type=int, default=3, metavar="N")
    parser.add_argument("--init", type=int, default=1, metavar="N")
    parser.add_argument("--absent", type=int, default=1, metavar="N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    records = []
    with tempfile.TemporaryDirectory(prefix="unclip-multihost-") as tmp:
        root = Path(tmp)
        config = job_config(root)
        ref, ref_s = reference(root, config, args.hosts)
        print(json.dumps({"kind": "reference", "hosts": args.hosts, "wall_s": round(ref_s, 1)}), flush=True)
        for trial in range(args.link_down):
            victim, step = rng.randrange(args.hosts), rng.randint(5, 45)
            records.append(link_down(root, config, ref, args.hosts, victim, step, trial))
            print(json.dumps(records[-1]), flush=True)
        for trial in range(args.init):
            records.append(init_failure(root, config, args.hosts, rng.randrange(1, args.hosts), trial))
            print(json.dumps(records[-1]), flush=True)
        for trial in range(args.absent):
            records.append(absent(root, config, args.hosts, trial))
            print(json.dumps(records[-1]), flush=True)
    links = [r for r in records if r["kind"] == "link-down"]
    summary = {
        "seed": args.seed, "hosts": args.hosts,
        "link_downs": len(links),
        "survived_and_named": sum(r["survivors_exit_1"] and r["named_by"] == r["survivors"] for r in links),
        "exact_resumes": sum(r["resumed_at_saved"] and r["identical"] for r in links),
        "named_after_s_max": max((r["named_after_s"] for r in links if r["named_after_s"] is not None), default=None),
        "init_gave_up_after_s_max": max((r["others_gave_up_after_s"] or 0 for r in records if r["kind"] == "init"), default=None),
        "absent_ended_after_s_max": max((r["ended_after_s"] or 0 for r in records if r["kind"] == "absent"), default=None),
    }
    print(json.dumps({"summary": summary}), flush=True)


if __name__ == "__main__":
    main()
