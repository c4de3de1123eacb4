"""Suite-wide settings.

The models under test are tiny: one intra-op thread is faster than two for them (no
fork/join per kernel) and leaves the second core to the multi-process DeepSpeed tests' peers.
"""

import os
from typing import Iterator

import pytest
import torch

from tests.infra.s3 import S3Server

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test starts on one intra-op thread, whatever an earlier one set (in-process code
    such as the demo's report or a benchmark may set more): on a shared 2-core machine a second
    thread only adds synchronisation for these tiny models (an overfit test took 40 s with 2
    threads under load, 1.6 s with one)."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def slurm():
    """A real one-node SLURM cluster (munged, slurmctld, slurmd) for the session; skips where
    the binaries are missing or we are not root (`tests/infra/slurm.py`)."""
    from tests.infra.slurm import running_cluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 API server (moto's) on 127.0.0.1, started once for the tests that ask."""
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()
