"""Side-by-side benchmarks of the unclip models; `python -m benchmarks --quick` runs them all
and rewrites benchmarks/RESULTS.md (see benchmarks/__main__.py).

The machine these run on is shared: when other jobs hold the cores, OpenMP threads that spin
at every barrier (libgomp's default) wait for a core to come back, and a 2-thread step can run
5-30x slower than a 1-thread one. Passive waiting (threads sleep instead of spinning) removes
that collapse and costs nothing measurable on large kernels, so it is the default here, set
before torch loads OpenMP, for both implementations alike (and inherited by the
peak-memory subprocesses).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
