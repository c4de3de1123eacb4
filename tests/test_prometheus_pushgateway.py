"""--pushgateway against a real Pushgateway (Debian's `prometheus-pushgateway`, skipped if absent)."""

import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

from trainer.config import MetricsConfig
from trainer.metrics import Metrics

BINARY = shutil.which("prometheus-pushgateway") or shutil.which("pushgateway")


@pytest.mark.slow
@pytest.mark.skipif(BINARY is None, reason="no Pushgateway binary (Debian: apt-get install prometheus-pushgateway)")
def test_a_batch_job_pushes_its_final_values(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gateway = subprocess.Popen([BINARY, f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url + "/-/ready", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        m = Metrics("pushjob", "precompute", 0, 1, None, MetricsConfig(pushgateway=url), console=False).start()
        m.precompute_progress(samples=100, shards=1)
        m.precompute_progress(samples=250, shards=3)
        m.close()  # the final push carries the last values whatever the push interval
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)
    lines = set(text.splitlines())
    # the gateway keeps our job label (it equals the grouping key) and adds the instance
    assert 'unclip_precompute_samples_total{instance="precompute-rank0",job="pushjob",rank="0",stage="precompute"} 250' in lines
    assert 'unclip_precompute_shards_total{instance="precompute-rank0",job="pushjob",rank="0",stage="precompute"} 3' in lines
