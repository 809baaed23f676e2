#!/usr/bin/env bash
# Every multi-GPU measurement in one go, on a host with two or more GPUs (one process per GPU):
#   1. correctness: the NCCL tests of tests/test_cuda.py (every op, dtype and priority, send/recv, a lost rank)
#   2. bus bandwidth and latency, 8 B to 1 GiB, ours awaited against bare torch.distributed NCCL
#   3. examples/tp_decode.py on CUDA, overlap on and off, 2 and 4 processes
#   4. KV transfer from GPU 0 to GPU 1 (CUDA IPC and the shm rings) against a GPU 0 -> GPU 1 copy
# Writes every JSON and log under OUT (default results/multigpu) and prints the tables.
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): the shared machines require it.
#
#   bash scripts/multigpu.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/multigpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
n=$($py -c "import torch; print(torch.cuda.device_count())")
if [ "$n" -lt 2 ]; then
    echo "scripts/multigpu.sh needs at least two GPUs; torch sees $n" >&2
    exit 2
fi
status=0
step() {  # step NAME COMMAND...: run, keep its output in OUT/NAME.log, remember a failure
    local name=$1; shift
    echo "### $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "### $name FAILED (exit $rc)"; status=1; }
}
$py -c "import torch; print(torch.__version__, [torch.cuda.get_device_name(i) for i in range($n)])" | tee "$out/machine.txt"
nvidia-smi topo -m >> "$out/machine.txt" 2>&1 || true

step correctness $py -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "nccl or gpus or lost"
worlds=2
[ "$n" -ge 4 ] && worlds="2 4"
[ "$n" -ge 8 ] && worlds="2 4 8"
for w in $worlds; do
    step "nccl_world$w" $py -m sagellm_comm.cli bench nccl --world "$w" \
        --sizes 8,64,1K,16K,256K,1M,4M,16M,64M,256M,1G --json "$out/nccl_world$w.json"
done
for w in $worlds; do
    [ "$w" -gt 4 ] && continue  # the model's heads divide by 1, 2 or 4
    for mode in overlap no-overlap; do
        flag=""; [ "$mode" = no-overlap ] && flag=--no-overlap
        step "tp_decode_world${w}_$mode" $py examples/tp_decode.py --world "$w" --device cuda --dtype float32 \
            --steps 32 $flag
    done
done
step kv_two_gpus $py -m sagellm_comm.cli bench kv --device cuda --gpus 2 --transport shm \
    --tokens 1024,4096,16384 --json "$out/kv_two_gpus.json"
step kv_two_gpus_no_ipc $py -m sagellm_comm.cli bench kv --device cuda --gpus 2 --transport shm --no-ipc \
    --tokens 1024,4096,16384 --json "$out/kv_two_gpus_no_ipc.json"
exit $status
