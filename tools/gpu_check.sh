#!/usr/bin/env bash
# The library's CUDA paths, checked and measured on a GPU machine in one go (about 5 minutes on one H100-class GPU):
#   1. install the package (its dependencies are expected there already: torch, tiktoken, safetensors, transformers);
#   2. the tests marked `cuda` (tests/test_cuda.py): mixed precision, exact resume, the KV cache, chapter 16's
#      decoders, DDP over NCCL;
#   3. training tokens/s and MFU of the `medium` preset and of GPT-2 124M in bf16, against the measured bf16 matmul
#      peak and transformers' GPT2LMHeadModel in the same precision (benchmarks/gpu_bench.py train);
#   4. chapter 13's speedrun-5e13 recipe on the GPU: validation loss, FLOPs, seconds (benchmarks/speedrun.py);
#   5. batch-1 generation tokens/s against the measured memory bandwidth (benchmarks/gpu_bench.py generate).
# Every part has its own time limit and the script goes on after a failed part; it prints one JSON line per
# measurement and ends with a summary line. Everything is also written under $OUT when that is set.
#
#   bash tools/gpu_check.sh              # on a CUDA machine, from the repository's root
#   SMOKE=1 bash tools/gpu_check.sh      # on a CPU: the same parts at CPU size (the cuda tests skip, saying why)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
log="$out/gpu_check.log"
results="$out/gpu_check.jsonl"
: > "$results"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree, installed or not
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, keep its JSON lines, note a failure
    local name=$1 limit=$(( $2 * slack )); shift 2
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.out" 2> >(tee -a "$log" >&2)
    local status=$?
    cat "$out/$name.out" | tee -a "$log"
    grep '^{' "$out/$name.out" >> "$results"
    echo "== $name: exit $status after $(( SECONDS - start ))s" | tee -a "$log"
    [ "$status" -eq 0 ] || failed+=("$name")
}

if [ "${SMOKE:-0}" = 1 ]; then  # CPU size; a CPU shared with other work may need the time limits 3 times over
    device=cpu; train_shapes=(tiny); gen_shape=tiny; budget_flags=(--budget 5e13 --smoke); slack=3
else device=cuda; train_shapes=(medium gpt2); gen_shape=gpt2; budget_flags=(--budget 5e13); slack=1; fi

echo "== machine" | tee -a "$log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"; } \
  | tee -a "$log"

# No network there: install without dependencies and without a build environment (PYTHONPATH above is the fallback).
# (Not in a smoke run: there the package is installed already, perhaps from another checkout, which stays as it is.)
if [ "${SMOKE:-0}" != 1 ]; then
    python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$log" 2>&1 || echo "pip install failed: using PYTHONPATH" | tee -a "$log"
fi

part cuda_tests 240 python3 -m pytest -p no:nbval -o addopts="" -p no:cacheprovider -m cuda -rs -q tests/test_cuda.py
for shape in "${train_shapes[@]}"; do
    part "train_$shape" 150 python3 benchmarks/gpu_bench.py train --shape "$shape" --device "$device" --rounds 5
done
part speedrun 240 python3 benchmarks/speedrun.py "${budget_flags[@]}" --device "$device"
part generate 120 python3 benchmarks/gpu_bench.py generate --shape "$gen_shape" --device "$device" --rounds 3

names=""; for f in "${failed[@]}"; do names="$names${names:+, }\"$f\""; done
summary="{\"gpu_check\": \"done\", \"device\": \"$device\", \"failed_parts\": [$names], \"seconds\": $SECONDS}"
echo "$summary" | tee -a "$log" "$results"
echo "results: $results; log: $log"
[ ${#failed[@]} -eq 0 ]
