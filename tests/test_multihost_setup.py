"""The pieces behind multi-host runs, each against the real thing on this host: the route to
the master (the kernel's routing table), the interface variables, the heartbeat report over a
real TCPStore, torch's timeout for groups made later, and the launcher command lines.
(tests/test_multihost.py runs them together over network namespaces.)"""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta

import pytest
import torch
from torch.distributed import PrefixStore, TCPStore, distributed_c10d

from launch.launchers import hostfile_command, torchrun_command
from trainer import liveness
from trainer.distributed import _default_group_timeout, choose_socket_interface, node_from_env, route_to


def test_the_route_to_a_loopback_master_is_lo():
    route = route_to("127.0.0.1", 29500)
    assert (route.interface, route.address) == ("lo", "127.0.0.1")


def test_a_master_that_does_not_resolve_is_named():
    with pytest.raises(OSError, match="the master address 'no-such-host.invalid' does not resolve"):
        route_to("no-such-host.invalid", 29500)


def test_interface_variables_the_user_set_are_kept():
    env = {"GLOO_SOCKET_IFNAME": "ib0"}
    line = choose_socket_interface(env, "127.0.0.1", 29500)
    assert env == {"GLOO_SOCKET_IFNAME": "ib0", "NCCL_SOCKET_IFNAME": "lo"}
    assert line == "NCCL_SOCKET_IFNAME=lo: lo (127.0.0.1) is the interface that routes to the master 127.0.0.1"
    assert choose_socket_interface(env, "no-such-host.invalid", 29500) is None  # both set: nothing to look up


def test_node_rank_from_any_launcher():
    assert node_from_env({"GROUP_RANK": "3"}) == 3  # torchrun
    assert node_from_env({"CROSS_RANK": "1"}) == 1  # the DeepSpeed launcher
    assert node_from_env({"SLURM_NODEID": "2"}) == 2
    assert node_from_env({}) is None


def test_groups_made_after_init_time_out_like_the_job(monkeypatch, tmp_path):
    # restored after the test: the module globals are process-wide
    monkeypatch.setattr(distributed_c10d, "default_pg_timeout", distributed_c10d.default_pg_timeout)
    monkeypatch.setattr(distributed_c10d, "default_pg_nccl_timeout", distributed_c10d.default_pg_nccl_timeout)
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=7))
    try:
        _default_group_timeout(timedelta(seconds=7))
        group = torch.distributed.new_group([0])  # as DeepSpeed makes its data-parallel groups
        assert group._get_backend(torch.device("cpu")).options._timeout == timedelta(seconds=7)
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture
def job_store():
    """A real TCPStore server on 127.0.0.1, as torchrun's agent keeps one for the job."""
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    yield server
    liveness.stop()


def peer(server: TCPStore, rank: int, where: dict, beat: bool) -> threading.Event:
    """Another rank as the store sees it: where it runs, and a heartbeat that goes on or has stopped."""
    store = PrefixStore("unclip/liveness/0/", TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False))
    store.set(f"where/{rank}", json.dumps(where))
    store.set(f"beat/{rank}", "0")
    stop = threading.Event()

    def go_on() -> None:
        count = 0
        while not stop.wait(0.05):
            count += 1
            store.set(f"beat/{rank}", str(count))

    if beat:
        threading.Thread(target=go_on, daemon=True).start()
    return stop


def test_the_report_names_the_node_whose_heartbeat_stopped(job_store):
    liveness.start(0, 3, ("127.0.0.1", job_store.port), 6.0, where={"node": 0, "host": "a", "address": "10.0.0.1"})
    alive = peer(job_store, 1, {"node": 0, "host": "a", "address": "10.0.0.1"}, beat=True)
    peer(job_store, 2, {"node": 1, "host": "b", "address": "10.0.0.2"}, beat=False)
    try:
        assert liveness.report() == "lost: node 1 (b, 10.0.0.2): rank 2 stopped beating"
    finally:
        alive.set()


def test_the_report_tells_a_stuck_rank_from_a_lost_one(job_store):
    liveness.start(0, 2, ("127.0.0.1", job_store.port), 6.0, where={"node": 0, "host": "a", "address": "10.0.0.1"})
    alive = peer(job_store, 1, {"node": 1, "host": "b", "address": "10.0.0.2"}, beat=True)
    try:
        line = liveness.report()
    finally:
        alive.set()
    assert line == "no node is lost (every rank still beats); rank 1 did not see the failure: stuck, not gone"


def test_the_report_says_so_when_the_masters_store_is_gone():
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    liveness.start(1, 2, ("127.0.0.1", server.port), 6.0, where={"node": 1, "host": "b", "address": None})
    port = server.port
    del server  # the master node's store goes away
    started = time.monotonic()
    try:
        line = liveness.report()
    finally:
        liveness.stop()
    assert line == (f"the job's store at 127.0.0.1:{port}, on the master node, does not answer: the master node is "
                    "lost, or this host lost its network")
    assert time.monotonic() - started < 15


def test_torchrun_commands_bound_the_rendezvous():
    static = torchrun_command(["--config", "c.yaml"], nproc_per_node=1, nnodes=2, node_rank=1, master_addr="10.0.0.1",
                              rdzv_timeout_s=9.5)
    assert "--rdzv-conf=timeout=10" in static and "--node-rank=1" in static
    elastic = torchrun_command(["--config", "c.yaml"], nproc_per_node=8, nnodes=4, rdzv=True, rdzv_timeout_s=600)
    assert "--rdzv-conf=join_timeout=600" in elastic and "--rdzv-backend=c10d" in elastic
    assert not any(a.startswith("--rdzv-conf") for a in torchrun_command([], nproc_per_node=1))


def test_hostfile_command_runs_deepspeeds_launcher_module(tmp_path):
    cmd = hostfile_command(["--config", "c.yaml"], tmp_path / "hosts", master_port=29600, master_addr="10.0.0.1", python="py")
    assert cmd[:3] == ["py", "-m", "deepspeed.launcher.runner"]
    assert f"--hostfile={tmp_path / 'hosts'}" in cmd and "--master_port=29600" in cmd and "--master_addr=10.0.0.1" in cmd
    assert cmd[-4:] == ["--module", "launch.worker", "--config", "c.yaml"]
