#!/usr/bin/env bash
# Every prepared GPU measurement in one run (about 10 minutes on one H100):
#   1. benchmarks/sync_check.py: host-device synchronisations inside lightning_kd's training steps
#      (CUDA's sync debug mode), small and mid workloads, bf16-mixed;
#   2. benchmarks/step_overhead.py, small workload: hand loop, torchdistill, bare Lightning and
#      lightning_kd, compile on/off, bf16-mixed;
#   3. the same, mid workload (resnet32x4 -> resnet8x4, batch 128), bf16-mixed, channels-last;
#   4. benchmarks/cifar_recipes_gpu.py: every CIFAR-100 recipe at full size on synthetic data, bf16-mixed
#      (time per step, projected epoch and run, peak memory).
#
#   bash benchmarks/gpu_check.sh OUT_DIR              # on the GPU machine, from the repository root
#   DEVICE=cpu bash benchmarks/gpu_check.sh OUT_DIR   # a dry run of the same commands on the CPU (--quick)
#
# Writes OUT_DIR/sync_check.md, OUT_DIR/step_overhead_cuda_small.md, OUT_DIR/step_overhead_cuda_mid.md,
# OUT_DIR/cifar_recipes_cuda.md
# and OUT_DIR/gpu_check.log (the machine, versions and every command's output); a command that
# fails or runs out of its time (90 + 170 + 220 + 150 s at most) is noted in the log and the next one
# runs; step_overhead.py rewrites its table after every round, so a stopped run keeps its rounds.
#
# Python: $PYTHON if set, else .venv/bin/python if present, else python3; the repository root goes
# on PYTHONPATH. Wheels in .whl/ (torchdistill and whatever else the machine lacks, e.g.
# jsonargparse) are installed into /tmp/site first, without network:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl torchdistill==1.1.5 jsonargparse
# Without torchdistill the tables say it was left out.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
DEVICE=${DEVICE:-cuda}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

QUICK=()
if [ "$DEVICE" = cpu ]; then QUICK=(--quick); fi
{
    date -u
    nvidia-smi 2>&1 | head -15
    "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
} >"$LOG" 2>&1

run() {  # run LIMIT_SECONDS ARGS...: one python command, its output appended to the log
    local limit=$1
    shift
    echo "== $(date -u +%T) $PYTHON $*" >>"$LOG"
    timeout "$limit" "$PYTHON" "$@" >>"$LOG" 2>&1
    local status=$?
    if [ "$status" -ne 0 ]; then echo "== exit status $status" >>"$LOG"; fi
}

run 90 benchmarks/sync_check.py --device "$DEVICE" --out "$OUT/sync_check.md" "${QUICK[@]}"
run 170 benchmarks/step_overhead.py --device "$DEVICE" --precision bf16-mixed --workload small \
    --variants hand,hand+compile,torchdistill,torchdistill+compile,bare,bare+log3,ours,ours@log10,ours+fitnet,ours+cache,ours+compile,hand_mutual,mutual \
    --steps 100 --warmup 10 --rounds 5 --out "$OUT/step_overhead_cuda_small.md" "${QUICK[@]}"
run 220 benchmarks/step_overhead.py --device "$DEVICE" --precision bf16-mixed --channels-last --workload mid \
    --batch-size 128 \
    --variants hand,hand+compile,torchdistill,torchdistill+compile,bare,ours,ours+fitnet,ours+cache,ours+compile \
    --steps 50 --warmup 10 --rounds 5 --out "$OUT/step_overhead_cuda_mid.md" "${QUICK[@]}"
CIFAR_QUICK=()
if [ "$DEVICE" = cpu ]; then CIFAR_QUICK=(--quick --recipes kd mlkd); fi
run 150 benchmarks/cifar_recipes_gpu.py --device "$DEVICE" --warmup 10 --steps 100 \
    --out "$OUT/cifar_recipes_cuda.md" "${CIFAR_QUICK[@]}"
echo "== done $(date -u +%T)" >>"$LOG"
