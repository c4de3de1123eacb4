"""A one-rank process group inside the test process (gloo), as `unclip train` makes one, for
tests that build a DeepSpeed engine or the trainer in process:

    from tests.process_group import process_group  # noqa: F401 - a pytest fixture
"""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def process_group():
    from trainer import distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(dist.WorldInfo(0, 0, 1), timeout_s=60)
    yield
    dist.destroy()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
