#!/usr/bin/env bash
# One short GPU session on a machine that reaches no package registry (this project's lent H200): the
# packages it lacks travel as an unpacked site folder, then the CUDA test suite, then bench/gpu_check.sh.
#
# Here, once:  python3 -m pip install --no-deps --target /tmp/site --platform manylinux2014_x86_64 \
#                --python-version 3.12 --only-binary=:all: WHEELS...   (albumentations, albucore, pydantic,
#                pydantic_core, annotated-types, typing-inspection, typing_extensions, stringzilla, simsimd,
#                pytorch-metric-learning, timm, ray, jsonschema and its three helpers; exact pins from
#                constraints.txt); rm -rf /tmp/site/ray/jars /tmp/site/ray/dashboard/client/build \
#                /tmp/site/ray/rllib (Java, the web UI, RL: 80 MB Ray wheel down to fit 64 MiB); then
#                tar -C /tmp/site -cf - . | xz -T2 > .whl/site.tar.xz     (.whl/ is git-ignored)
# There:       bash bench/gpu_session.sh     (carry .whl; $OUT collects the logs)
#   TESTS_LIMIT=240   seconds for `pytest -n 16`; each test's verdict is logged as it ends (-v), so a cut run
#                     still names its failures
#   LIMIT=270 EXTRA_SET=...   passed to bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
T0=$(date +%s); since() { echo $(( $(date +%s) - T0 )); }
export PYTHONUNBUFFERED=1
if [ -f .whl/site.tar.xz ]; then
  python3 -c "import tarfile; tarfile.open('.whl/site.tar.xz').extractall('/tmp/site')" || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
if [ ! -x .venv/bin/python ]; then  # the machine's own python3 (it holds torch) stands in for make setup's venv
  mkdir -p .venv/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python
  chmod +x .venv/bin/python && touch .venv/.installed
fi
python3 -c "import torch, timm, albumentations; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
                                                  'timm', timm.__version__)" 2>&1 | tail -1

OMP_NUM_THREADS=1 timeout "${TESTS_LIMIT:-240}" python3 -m pytest -n "$(nproc)" -o addopts= -v -rfE -p no:cacheprovider \
    -W ignore tests > "$OUT/pytest.log" 2>&1
echo "tests: exit $? after $(since) s; $(grep -c ' PASSED ' "$OUT/pytest.log") passed"
grep -E " (FAILED|ERROR) " "$OUT/pytest.log" | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | sort -u | head -40

EXECUTOR=$(python3 -c "import ray" 2>/dev/null && echo ray || echo serial) bash bench/gpu_check.sh > "$OUT/gpu_check.log" 2>&1
echo "gpu_check: exit $? after $(since) s"
grep -vE "it/s\]|s/it\]|logging.cc|^ +@" "$OUT/gpu_check.log" | tail -30
cp runs/full/full/_run/jobs.csv "$OUT/" 2>/dev/null
exit 0
