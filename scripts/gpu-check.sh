#!/usr/bin/env bash
# The one command to run on an NVIDIA machine with no network (see shared/reference/gpu.md).
#
# Prepare here (this machine has the toolchain and the network):
#   cargo build --release --bin wccl-bench --example tensor_parallel && mkdir -p .gpu &&
#   cp target/release/wccl-bench target/release/examples/tensor_parallel .gpu/ &&
#   for t in properties half disagree device_errors collectives survive ps ps_chains ps_replication ps_checkpoint ps_wire; do
#     cargo test --release --test $t --no-run 2>&1 | grep -o "target/release/deps/$t-[0-9a-f]*" |
#     head -n 1 | xargs -I{} cp {} .gpu/$t; done &&
#   cargo bench --bench ps_faults --no-run 2>&1 | grep -o "target/release/deps/ps_faults-[0-9a-f]*" |
#     head -n 1 | xargs -I{} cp {} .gpu/ps_faults
#   and the Vulkan loader packages in .gl/ (gpu.md says how; both folders are git-ignored).
# Run there, from the repository root, carrying .gl and .gpu:
#   bash scripts/gpu-check.sh [OUT_DIR]
# Steps (GPU_CHECK_STEPS picks some, default all, in this order):
#   tests   the test binaries in .gpu/ (the randomized property test and the full matrix on 1 to 8
#           ranks, WCCL_FULL_MATRIX set: every collective, op and type against f64; packed f16/bf16; every rank errs
#           when ranks disagree; device errors; a ring finishing among survivors of a kill;
#           the parameter server: modes, chains and cycles, 100 kills, heal then kill)
#   probe   the devices, and the reduce kernel against the adapter's own copy
#   matmul  the matmul kernels at 1024^3 and 4096^3, f32 and f16
#   tp      the tensor-parallel MLP block on 4 ranks, against an f64 host reference
#   ps      the replicated parameter server under faults (head-of-line, failover, straggler)
#   sweep   all_reduce on 4 ranks sharing the GPU, the host-staged ring beside the device ring
#           (issue 14), central, naive and auto: 1-16 MiB checked at every buffer shift (the
#           host-side check is the slow part), f16 and bf16 at 4 and 16 MiB with every op
#           checked, 256 and 512 MiB timed only
# Full logs go to OUT_DIR (default ./gpu-check-out), a short table last; about 5 minutes.
set -uo pipefail
out="${1:-${OUT:-./gpu-check-out}}"
mkdir -p "$out"
bench="${WCCL_BENCH:-.gpu/wccl-bench}"
steps=" ${GPU_CHECK_STEPS:-tests probe matmul tp ps sweep} "
want() { [[ "$steps" == *" $1 "* ]]; }
status=0
fail() { [ "$1" -eq 0 ] || status=$1; }

if [ -d .gl ] && ! ldconfig -p | grep -q libvulkan.so.1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
fi
if [ -z "${VK_DRIVER_FILES:-}" ] && [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.txt" 2>&1 || true

if want tests; then
    echo "== test binaries on the GPU"
    found=0
    for t in properties half disagree device_errors collectives survive ps ps_chains ps_replication ps_checkpoint ps_wire; do
        [ -x ".gpu/$t" ] || continue
        found=1
        WCCL_FULL_MATRIX=1 timeout 150 ".gpu/$t" --test-threads 4 > "$out/test-$t.log" 2>&1
        rc=$?
        fail $rc
        echo "$t (exit $rc): $(grep -E '^test result' "$out/test-$t.log" | tail -n 1)"
    done
    [ "$found" -eq 1 ] || { echo "(no test binaries in .gpu/: build them as the header says)"; fail 1; }
fi

if want probe; then
    echo "== probe (4 ranks, 256 MiB)"
    timeout 120 "$bench" probe -g 4 -b "${GPU_CHECK_PROBE:-256M}" > "$out/probe.log" 2>&1
    fail $?
    cat "$out/probe.log"
fi

if want matmul; then
    echo "== matmul kernels, 1024^3 and 4096^3 (target: 10 TFLOP/s f32 at 4096^3)"
    timeout 120 "$bench" matmul --sizes "${GPU_CHECK_MM:-1024,4096}" --kernel plain,tiled,tiled-large,auto -n 5 -w 2 \
        > "$out/matmul.log" 2>&1
    fail $?
    timeout 60 "$bench" matmul --sizes "${GPU_CHECK_MM_HALF:-4096}" --kernel tiled,tiled-large -d half -n 5 -w 2 \
        >> "$out/matmul.log" 2>&1
    fail $?
    grep -v '^# rows over' "$out/matmul.log"
fi

if want tp; then
    echo "== tensor-parallel MLP block, 4 ranks, batch 512, d_model 2048, d_ffn 8192"
    tp="${WCCL_TP:-.gpu/tensor_parallel}"
    timeout 120 "$tp" --ranks 4 ${GPU_CHECK_TP:---batch 512 --d-model 2048 --d-ffn 8192} --iters 5 > "$out/tensor_parallel.log" 2>&1
    fail $?
    cat "$out/tensor_parallel.log"
fi

if want ps; then
    echo "== the replicated parameter server under faults"
    timeout 240 "${WCCL_PS_FAULTS:-.gpu/ps_faults}" > "$out/ps_faults.log" 2>&1
    fail $?
    tail -n 20 "$out/ps_faults.log"
fi

if want sweep; then
    # Checked at every buffer shift up to 16 MiB (the checker reads every rank's whole output
    # back); 256 and 512 MiB are timed only (-c 0): correctness there rests on the smaller sizes
    # and the property test.
    echo "== all_reduce sweep, 4 ranks, 1 MiB .. 16 MiB, checked"
    timeout 240 "$bench" all_reduce -b 1M -e "${GPU_CHECK_MAX_CHECKED:-16M}" -f 4 -g 4 -n 5 -w 2 --algo ring,staged,central,naive,auto \
        --probe-bytes "${GPU_CHECK_PROBE_SWEEP:-64M}" --csv "$out/all_reduce.csv" --plot "$out/all_reduce.svg" \
        > "$out/all_reduce.log" 2>&1
    fail $?
    grep -v '^#  rank' "$out/all_reduce.log" | tail -n 26
    for d in half bfloat16; do
        echo "== all_reduce $d, 4 ranks, 4 and 16 MiB, every op, checked"
        timeout 90 "$bench" all_reduce -b 4M -e 16M -f 4 -g 4 -n 5 -w 2 -d "$d" -o all --probe-bytes 0 \
            > "$out/all_reduce_$d.log" 2>&1
        fail $?
        grep -E '^ +[0-9]|Out of bounds' "$out/all_reduce_$d.log"
    done
    echo "== all_reduce, 4 ranks, 256 MiB and 512 MiB, timed only"
    timeout 200 "$bench" all_reduce -b "${GPU_CHECK_BIG_MIN:-256M}" -e "${GPU_CHECK_MAX:-512M}" -f 2 -g 4 -n 3 -w 1 -c 0 \
        --algo ring,staged,central,naive,auto --probe-bytes "${GPU_CHECK_PROBE_SWEEP:-64M}" --csv "$out/all_reduce_big.csv" \
        > "$out/all_reduce_big.log" 2>&1
    fail $?
    grep -v '^#  rank' "$out/all_reduce_big.log" | tail -n 14
fi

echo
echo "== summary (GPU: $(head -n 2 "$out/nvidia-smi.txt" | tail -n 1))"
grep -h -E '^test result' "$out"/test-*.log 2>/dev/null
grep -E "reduce kernel traffic" "$out/probe.log" 2>/dev/null | head -n 1
grep -E "^\s+4096\s+4096\s+4096" "$out/matmul.log" 2>/dev/null
grep -E "ranks:|matches" "$out/tensor_parallel.log" 2>/dev/null
echo "size(B) algo oop_busbw(GB/s) ip_busbw(GB/s) model_us bound"
for f in "$out/all_reduce.csv" "$out/all_reduce_big.csv"; do
    [ -f "$f" ] && awk -F, 'FNR > 1 && ($1 == 16777216 || $1 == 67108864 || $1 == 268435456 || $1 == 536870912) { print $1, $6, $9, $13, $15, $16 }' "$f"
done
echo "exit $status"
exit $status
