#!/usr/bin/env bash
# Issue 11's measurements on one host, side by side in one run (BENCHMARKS.md, "Across processes"):
#   1. 4 processes x 1 MiB..256 MiB f32 all_reduce: wccl-bench under mpirun (one rank per process
#      over TCP, data on the devices; the device ring and the host-staged ring, the latter with
#      tensors mapped in place on a CPU adapter and, --no-map, through staging buffers) against
#      Open MPI's MPI_Allreduce over TCP (--mca btl tcp,self, host memory), alternating, ROUNDS
#      rounds;
#   2. the TCP link against a raw socket between two processes, CRC32C on and off (tcp-probe);
#   3. rendezvous + mesh time for 2, 4, 8 and 16 processes (tcp-init).
# Needs: cargo build --release --bin wccl-bench; openmpi-bin, libopenmpi-dev, python3-dev, and
# `pip install mpi4py numpy` for the peer (../shared/peers/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
rounds="${ROUNDS:-3}"
max="${MAX_BYTES:-256M}"
maxb=$(( $(numfmt --from=iec "$max") ))
bench=target/release/wccl-bench
mpi=(mpirun --allow-run-as-root --oversubscribe -np 4)
echo "# $(date -u +%FT%TZ) $(nproc) cores, $(uname -r)"
for r in $(seq 1 "$rounds"); do
    echo "## round $r: Open MPI, TCP"
    "${mpi[@]}" --mca btl tcp,self python3 ../shared/peers/mpi_allreduce.py "$maxb" | grep -v '^#'
    echo "## round $r: wccl, ring and staged ring, TCP (CRC32C on)"
    "${mpi[@]}" -x NODEVICE_SELECT=1 "$bench" all_reduce -b 1M -e "$max" -f 4 -n 5 -w 1 -c 0 \
        --algo ring,staged | grep -v '^#'
    echo "## round $r: wccl, staged ring, TCP, tensors without map usages (through staging buffers)"
    "${mpi[@]}" -x NODEVICE_SELECT=1 "$bench" all_reduce -b 1M -e "$max" -f 4 -n 5 -w 1 -c 0 \
        --algo staged --no-map | grep -v '^#'
    echo "## round $r: wccl, ring, 4 ranks in one process (channels: the same devices, no TCP)"
    "$bench" all_reduce -g 4 -b 1M -e "$max" -f 4 -n 5 -w 1 -c 0 --probe-bytes 0 | grep -v '^#'
done
echo "## wccl, ring and staged ring, TCP (CRC32C off), once"
"${mpi[@]}" -x NODEVICE_SELECT=1 "$bench" all_reduce -b 1M -e "$max" -f 4 -n 5 -w 1 -c 0 --no-crc \
    --algo ring,staged | grep -v '^#'
echo "## the link against a raw socket"
"$bench" tcp-probe --reps 7
echo "## rendezvous + mesh"
"$bench" tcp-init -g 2,4,8,16 --reps 5
