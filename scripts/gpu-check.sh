#!/usr/bin/env bash
# The one command to run on an NVIDIA machine with no network (see shared/reference/gpu.md).
#
# Prepare here (this machine has the toolchain and the network):
#   cargo build --release --bin wccl-bench --example tensor_parallel && mkdir -p .gpu &&
#   cp target/release/wccl-bench target/release/examples/tensor_parallel .gpu/ &&
#   cargo test --release --test properties --no-run 2>&1 | grep -o 'target/release/deps/properties-[0-9a-f]*' |
#   xargs -I{} cp {} .gpu/properties
#   and the Vulkan loader packages in .gl/ (gpu.md says how; both folders are git-ignored).
# Run there, from the repository root, carrying .gl and .gpu:
#   bash scripts/gpu-check.sh [OUT_DIR]
# It runs the randomized property test (every collective, op and type against the f64 reference)
# on the GPU, probes the devices, measures the reduce kernel against the adapter's own copy, sweeps
# all_reduce for every algorithm from 1 MiB to 512 MiB on 4 ranks sharing the GPU, measures the
# matmul kernels at 4096^3 (f32 and f16) and runs the tensor-parallel MLP block on 4 ranks, in
# well under 5 minutes; full logs go to OUT_DIR (default ./gpu-check-out), a short table last.
set -uo pipefail
out="${1:-${OUT:-./gpu-check-out}}"
mkdir -p "$out"
bench="${WCCL_BENCH:-.gpu/wccl-bench}"

if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1 || true

echo "== randomized property test on the GPU (every collective x op x type against f64)"
props_status=0
if [ -x .gpu/properties ]; then
    timeout 180 .gpu/properties --test-threads 1 > "$out/properties.log" 2>&1
    props_status=$?
    grep -E "^test |test result" "$out/properties.log"
else
    echo "(no .gpu/properties: build it as the header says)"
    props_status=1
fi

echo "== probe (4 ranks, 256 MiB)"
timeout 120 "$bench" probe -g 4 -b "${GPU_CHECK_PROBE:-256M}" 2>&1 | tee "$out/probe.log"

echo "== matmul kernels, 1024^3 and 4096^3 (target: 10 TFLOP/s f32 at 4096^3)"
timeout 120 "$bench" matmul --sizes "${GPU_CHECK_MM:-1024,4096}" --kernel plain,tiled,tiled-large,auto -n 5 -w 2 \
    > "$out/matmul.log" 2>&1
mm_status=$?
timeout 60 "$bench" matmul --sizes "${GPU_CHECK_MM_HALF:-4096}" --kernel tiled,tiled-large -d half -n 5 -w 2 \
    >> "$out/matmul.log" 2>&1 || mm_status=$?
grep -v '^# rows over' "$out/matmul.log"

echo "== tensor-parallel MLP block, 4 ranks, batch 512, d_model 2048, d_ffn 8192"
tp="${WCCL_TP:-.gpu/tensor_parallel}"
timeout 90 "$tp" --ranks 4 ${GPU_CHECK_TP:---batch 512 --d-model 2048 --d-ffn 8192} --iters 5 > "$out/tensor_parallel.log" 2>&1
tp_status=$?
cat "$out/tensor_parallel.log"

# Checked at every buffer shift up to 64 MiB (the checker reads every rank's whole output back);
# 256 and 512 MiB are timed only (-c 0): correctness there rests on the smaller sizes and the
# property test above.
echo "== all_reduce sweep, 4 ranks, 1 MiB .. 64 MiB, checked"
timeout 200 "$bench" all_reduce -b 1M -e "${GPU_CHECK_MAX_CHECKED:-64M}" -f 4 -g 4 -n 5 -w 2 --algo ring,central,naive,auto \
    --probe-bytes "${GPU_CHECK_PROBE:-64M}" --csv "$out/all_reduce.csv" --plot "$out/all_reduce.svg" \
    > "$out/all_reduce.log" 2>&1
status=$?
grep -v '^#  rank' "$out/all_reduce.log" | tail -n 22
echo "== all_reduce, 4 ranks, 256 MiB and 512 MiB, timed only"
timeout 150 "$bench" all_reduce -b "${GPU_CHECK_BIG_MIN:-256M}" -e "${GPU_CHECK_MAX:-512M}" -f 2 -g 4 -n 3 -w 1 -c 0 \
    --algo ring,central,naive,auto --probe-bytes "${GPU_CHECK_PROBE:-64M}" --csv "$out/all_reduce_big.csv" \
    > "$out/all_reduce_big.log" 2>&1
big_status=$?
grep -v '^#  rank' "$out/all_reduce_big.log" | tail -n 12

echo
echo "== summary (GPU: $(head -n 2 "$out/nvidia-smi.txt" | tail -n 1))"
grep -E "reduce kernel traffic" "$out/probe.log" | head -n 1
grep -E "^#\s+(rank 0|together)\s+[0-9]" "$out/probe.log"
echo "size(B) algo oop_busbw(GB/s) ip_busbw(GB/s) model_us bound"
awk -F, 'FNR > 1 && ($1 == 268435456 || $1 == 536870912 || $1 == 16777216 || $1 == 67108864) { print $1, $6, $9, $13, $15, $16 }' "$out/all_reduce.csv" "$out/all_reduce_big.csv"
grep -E "^\s+4096\s+4096\s+4096" "$out/matmul.log"
grep -E "ranks:|matches" "$out/tensor_parallel.log"
grep -E "test result" "$out/properties.log" 2>/dev/null
[ "$status" -eq 0 ] && status=$big_status
[ "$status" -eq 0 ] && status=$mm_status
[ "$status" -eq 0 ] && status=$tp_status
[ "$status" -eq 0 ] && status=$props_status
exit $status
