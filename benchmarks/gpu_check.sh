#!/usr/bin/env bash
# The one check of the GPU path (docs/gpu.md) for a machine with a CUDA device, in one go
# (< 8 minutes): the CUDA tests on the inproc and zmq transports, then `bench gpu`.
# Installs nothing beyond `pip install -e ".[test]"`, and only when the test dependencies
# are missing (the machine is assumed to have a CUDA build of torch). Writes its logs and
# bench_gpu.json to $OUT when set (else to ./gpu_check_out).
#
#   bash benchmarks/gpu_check.sh
#
# Exit status: 0 all passed; 2 no CUDA device; else the first failing step's status.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
out=${OUT:-$PWD/gpu_check_out}
mkdir -p "$out"
status=0

step() {  # step NAME SECONDS CMD...: run CMD under a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$out/summary.txt"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

if ! python -c "import pytest, pytest_timeout, pytest_asyncio, tensordict, zmq, msgpack" 2>/dev/null; then
    step install 180 pip install -e ".[test]"
fi

python - <<'EOF' 2>&1 | tee "$out/device.txt"
import sys
import torch

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}")
if not torch.cuda.is_available():
    print("CUDA is not available here: nothing to check")
    sys.exit(2)
p = torch.cuda.get_device_properties(0)
print(f"device 0 of {torch.cuda.device_count()}: {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then exit 2; fi

# CUDA tests: the staging path (test_gpu), the older CUDA tests, the pool's CPU tests and
# the CUDA cases of the routing and store unit tests; on the inproc and zmq transports
tests=(tests/test_gpu.py tests/test_cuda.py tests/unit/test_staging.py)
step tests_inproc 150 python -m pytest "${tests[@]}" tests/unit/test_routing.py \
    tests/unit/test_store.py --transport=inproc -q -p no:cacheprovider -rs
step tests_zmq 150 python -m pytest "${tests[@]}" --transport=zmq -q -p no:cacheprovider -rs

step bench_gpu 200 python -m transferqueue bench gpu --json "$out/bench_gpu.json"

cat "$out/summary.txt"
exit "$status"
