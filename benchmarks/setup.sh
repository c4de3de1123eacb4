#!/usr/bin/env bash
# The benchmark's own environment, .venv-bench/: our package with the `bench` extra and the
# peer, dalle2-pytorch 1.15.6 (lucidrains), side by side. Never needed to train or test.
#
#   bash benchmarks/setup.sh            # then: .venv-bench/bin/python -m benchmarks --quick
#
# dalle2-pytorch's metadata pins open-clip-torch<3 while we need >=3. It imports open_clip
# only inside its OpenClipAdapter (a CLIP we do not run: the benchmark feeds precomputed
# embeddings), so we install it with --no-deps after its other imports, which the `bench`
# extra lists; the last step checks that `import dalle2_pytorch` works with open_clip 3.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv-bench}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
# not the `test` extra: beside the bench extra's pins, moto[server]'s dependencies backtrack to a
# release that needs functools32 (Python 2 only); the benchmark needs pytest alone
"$VENV/bin/pip" install -q -e '.[bench]' pytest
"$VENV/bin/pip" install -q --no-deps dalle2-pytorch==1.15.6
"$VENV/bin/python" -c "import dalle2_pytorch, open_clip; print('dalle2_pytorch', dalle2_pytorch.__version__, 'with open_clip', open_clip.__version__)"
