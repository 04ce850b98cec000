//! Shared test helpers: random inputs per element type, a CPU reference in f64, poisoned
//! outputs, and a checker that runs one collective over a whole group.
#![allow(dead_code)]

use rand::Rng;
use wccl::link::LinkStack;
use wccl::{
    CollectiveKind, CommConfig, CommGroup, Communicator, DType, ReduceOp, TensorRef, bf16, f16,
};

/// The collectives that move data.
pub const KINDS: [CollectiveKind; 5] = [
    CollectiveKind::AllReduce,
    CollectiveKind::ReduceScatter,
    CollectiveKind::AllGather,
    CollectiveKind::Broadcast,
    CollectiveKind::Reduce,
];

/// The ops a matrix runs in its `k`-th (element type, count) cell: every op of `ops` when
/// `full` or when `WCCL_FULL_MATRIX` is set (as `scripts/gpu-check.sh` sets it), else one, the
/// `k`-th in turn. Element types and counts (which decide the bytes, so the chunking, the
/// slices and which path runs) stay a full product either way; a type that meets at least
/// `ops.len()` counts, with `k` counting its counts, still meets every op. Callers add the
/// rank count to `k`, so that each rank count pairs ops with other sizes. The rank counts
/// where the product of all three runs keep CI's time in bounds.
pub fn ops_for(ops: &[ReduceOp], k: usize, full: bool) -> &[ReduceOp] {
    if full || ops.is_empty() || std::env::var_os("WCCL_FULL_MATRIX").is_some() {
        ops
    } else {
        std::slice::from_ref(&ops[k % ops.len()])
    }
}

/// The call of `kind` over one rank's views (`op` and `root` where the kind takes them).
pub fn collective<'a>(
    kind: CollectiveKind,
    input: TensorRef<'a>,
    output: TensorRef<'a>,
    op: ReduceOp,
    root: usize,
) -> wccl::Collective<'a> {
    match kind {
        CollectiveKind::AllReduce => wccl::Collective::AllReduce { input, output, op },
        CollectiveKind::ReduceScatter => wccl::Collective::ReduceScatter { input, output, op },
        CollectiveKind::AllGather => wccl::Collective::AllGather { input, output },
        CollectiveKind::Broadcast => wccl::Collective::Broadcast {
            input,
            output,
            root,
        },
        CollectiveKind::Reduce => wccl::Collective::Reduce {
            input,
            output,
            op,
            root,
        },
        _ => wccl::Collective::Barrier,
    }
}

/// A group of `n` ranks on the machine's adapters (the software adapter in CI).
pub fn group(n: usize) -> CommGroup {
    group_with(n, CommConfig::default())
}

pub fn group_with(n: usize, config: CommConfig) -> CommGroup {
    group_linked(n, config, LinkStack::new())
}

/// A group of `n` ranks whose links `links` wraps (emulated, faulty).
pub fn group_linked(n: usize, config: CommConfig, links: LinkStack) -> CommGroup {
    match CommGroup::builder()
        .ranks(n)
        .config(config)
        .links(links)
        .build()
    {
        Ok(g) => g,
        Err(e) => panic!("cannot build a group of {n} ranks: {e}"),
    }
}

/// Random values for `op` on `dtype`, exactly representable in `dtype`, in ranges where the
/// reduction of up to 16 ranks neither overflows nor loses everything to rounding (17 ranks:
/// all but integer products).
pub fn random_values(rng: &mut impl Rng, dtype: DType, op: ReduceOp, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| {
            let v: f64 = match (dtype, op) {
                (DType::F32 | DType::F16 | DType::BF16, ReduceOp::Prod) => {
                    rng.random_range(0.5..1.5)
                }
                (DType::F32 | DType::F16 | DType::BF16, ReduceOp::Min | ReduceOp::Max) => {
                    rng.random_range(-100.0..100.0)
                }
                (DType::F32 | DType::F16 | DType::BF16, _) => rng.random_range(-1.0..1.0),
                (DType::I32, ReduceOp::Prod) => rng.random_range(-3..=3) as f64,
                (DType::I32, _) => rng.random_range(-100_000..=100_000) as f64,
                (DType::U32, ReduceOp::Prod) => rng.random_range(0..=4) as f64,
                (DType::U32, _) => rng.random_range(0..=100_000) as f64,
                (d, _) => panic!("no test values for {d}"),
            };
            round_to(dtype, v)
        })
        .collect()
}

/// `v` rounded to the nearest value of `dtype`.
pub fn round_to(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F32 => v as f32 as f64,
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
        DType::I32 | DType::U32 => v.round(),
        d => panic!("no rounding for {d}"),
    }
}

/// The bytes of `values` as `dtype`.
pub fn encode(dtype: DType, values: &[f64]) -> Vec<u8> {
    match dtype {
        DType::F32 => {
            bytemuck::cast_slice(&values.iter().map(|&v| v as f32).collect::<Vec<_>>()).to_vec()
        }
        DType::F16 => {
            bytemuck::cast_slice(&values.iter().map(|&v| f16::from_f64(v)).collect::<Vec<_>>())
                .to_vec()
        }
        DType::BF16 => bytemuck::cast_slice(
            &values
                .iter()
                .map(|&v| bf16::from_f64(v))
                .collect::<Vec<_>>(),
        )
        .to_vec(),
        DType::I32 => {
            bytemuck::cast_slice(&values.iter().map(|&v| v as i32).collect::<Vec<_>>()).to_vec()
        }
        DType::U32 => {
            bytemuck::cast_slice(&values.iter().map(|&v| v as u32).collect::<Vec<_>>()).to_vec()
        }
        d => panic!("no encoding for {d}"),
    }
}

/// A value no correct run produces: NaN for floats, a sentinel for integers.
pub fn poison(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => f64::NAN,
        DType::I32 => -123_456_789.0,
        DType::U32 => 3_999_999_999.0,
        d => panic!("no poison for {d}"),
    }
}

/// A caller-owned wgpu buffer of `len` elements (plus `pad` elements before and after) filled
/// with `values` at element offset `pad`, the rest poisoned.
pub fn make_buffer(comm: &Communicator, dtype: DType, values: &[f64], pad: usize) -> wgpu::Buffer {
    make_buffer_with(comm, dtype, values, pad, true)
}

/// [`make_buffer`], mappable in place (the device's [`tensor_usages`]) or not (`STORAGE |
/// COPY_SRC | COPY_DST` only, so that every path stages through staging buffers).
///
/// [`tensor_usages`]: wccl::RankDevice::tensor_usages
pub fn make_buffer_with(
    comm: &Communicator,
    dtype: DType,
    values: &[f64],
    pad: usize,
    mappable: bool,
) -> wgpu::Buffer {
    let mut all = vec![poison(dtype); pad];
    all.extend_from_slice(values);
    all.extend(std::iter::repeat_n(poison(dtype), pad));
    let mut bytes = encode(dtype, &all);
    bytes.resize(bytes.len().next_multiple_of(4).max(4), 0);
    let buf = comm
        .device()
        .device()
        .create_buffer(&wgpu::BufferDescriptor {
            label: Some("test tensor"),
            size: bytes.len() as u64,
            // Mappable in place where the device's memory is the host's (a CPU adapter): the
            // host-staged ring then runs in the tensors themselves.
            usage: if mappable {
                comm.device().tensor_usages()
            } else {
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST
            },
            mapped_at_creation: false,
        });
    comm.device().queue().write_buffer(&buf, 0, &bytes);
    buf
}

/// Reads `t` back as f64 values.
pub fn read(comm: &Communicator, t: TensorRef<'_>) -> Vec<f64> {
    let r = match t.dtype {
        DType::F32 => comm
            .read::<f32>(t)
            .map(|v| v.into_iter().map(f64::from).collect()),
        DType::F16 => comm
            .read::<f16>(t)
            .map(|v| v.into_iter().map(|x| x.to_f64()).collect()),
        DType::BF16 => comm
            .read::<bf16>(t)
            .map(|v| v.into_iter().map(|x| x.to_f64()).collect()),
        DType::I32 => comm
            .read::<i32>(t)
            .map(|v| v.into_iter().map(f64::from).collect()),
        DType::U32 => comm
            .read::<u32>(t)
            .map(|v| v.into_iter().map(f64::from).collect()),
        d => panic!("no read-back for {d}"),
    };
    match r {
        Ok(v) => v,
        Err(e) => panic!("read-back failed: {e}"),
    }
}

/// The reduction of `inputs` (one per rank) in f64, with the element type's integer semantics.
pub fn reference(dtype: DType, op: ReduceOp, inputs: &[Vec<f64>]) -> Vec<f64> {
    let n = inputs.len();
    let len = inputs.first().map_or(0, |v| v.len());
    (0..len)
        .map(|i| {
            let xs = inputs.iter().map(|v| v[i]);
            match op {
                ReduceOp::Sum => xs.sum(),
                ReduceOp::Prod => xs.product(),
                ReduceOp::Min => xs.fold(f64::INFINITY, f64::min),
                ReduceOp::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                ReduceOp::Avg => {
                    let s: f64 = xs.sum();
                    if dtype.is_float() {
                        s / n as f64
                    } else {
                        (s / n as f64).trunc()
                    }
                }
                other => panic!("no f64 reference for {other}"),
            }
        })
        .collect()
}

/// Allowed error of one reduced element: exact for integers, min and max; a bound from the
/// element type's rounding for float sums and products.
pub fn tolerance(dtype: DType, op: ReduceOp, inputs: &[Vec<f64>], i: usize, expected: f64) -> f64 {
    let eps = match dtype {
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
        _ => return 0.0,
    };
    let n = inputs.len() as f64;
    let abs_sum: f64 = inputs.iter().map(|v| v[i].abs()).sum();
    match op {
        ReduceOp::Min | ReduceOp::Max => 0.0,
        ReduceOp::Sum => (n + 1.0) * eps * abs_sum,
        ReduceOp::Avg => (n + 2.0) * eps * abs_sum / n + eps * expected.abs(),
        ReduceOp::Prod => (n + 1.0) * eps * expected.abs(),
        other => panic!("no tolerance for {other}"),
    }
}

/// Asserts that `got` matches `expected` element by element (NaN never matches).
#[track_caller]
pub fn assert_close(what: &str, got: &[f64], expected: &[f64], tol: impl Fn(usize) -> f64) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let t = tol(i);
        assert!(
            (g - e).abs() <= t,
            "{what}: element {i} is {g}, expected {e} (tolerance {t})"
        );
    }
}

/// One collective to check.
#[derive(Clone, Copy, Debug)]
pub struct Case {
    pub kind: CollectiveKind,
    pub op: ReduceOp,
    pub dtype: DType,
    /// Elements per rank (the receive count for reduce_scatter, the send count for all_gather).
    pub count: usize,
    pub in_place: bool,
    pub root: usize,
    /// Elements of poison before and after each tensor in its buffer.
    pub pad: usize,
}

/// Runs `case` on every rank of `group` (as one group call) with fresh random inputs and
/// poisoned outputs, and checks every rank's output against the f64 reference, that
/// out-of-place inputs are unchanged, and that nothing outside the tensors was written.
pub fn check(group: &mut CommGroup, case: Case, rng: &mut impl Rng) {
    check_with(group, case, rng, true);
}

/// [`check`] with tensors mappable in place or not (see [`make_buffer_with`]).
pub fn check_with(group: &mut CommGroup, case: Case, rng: &mut impl Rng, mappable: bool) {
    let n = group.size();
    let Case {
        kind,
        op,
        dtype,
        count,
        in_place,
        root,
        pad,
    } = case;
    let (in_len, out_len) = match kind {
        CollectiveKind::ReduceScatter => (n * count, count),
        CollectiveKind::AllGather => (count, n * count),
        _ => (count, count),
    };
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|_| random_values(rng, dtype, op, in_len))
        .collect();
    // Buffers: for in-place calls one buffer per rank laid out as NCCL expects.
    let mut bufs = Vec::new();
    for r in 0..n {
        let comm = group.comm(r);
        if in_place {
            let values = match kind {
                CollectiveKind::AllGather => {
                    let mut v = vec![poison(dtype); out_len];
                    v[r * count..(r + 1) * count].copy_from_slice(&inputs[r]);
                    v
                }
                _ => inputs[r].clone(),
            };
            bufs.push((make_buffer_with(comm, dtype, &values, pad, mappable), None));
        } else {
            let input = make_buffer_with(comm, dtype, &inputs[r], pad, mappable);
            let poisoned = vec![poison(dtype); out_len];
            let output = make_buffer_with(comm, dtype, &poisoned, pad, mappable);
            bufs.push((input, Some(output)));
        }
    }
    let es = dtype.size() as u64;
    let base = pad as u64 * es;
    let views: Vec<(TensorRef<'_>, TensorRef<'_>)> = (0..n)
        .map(|r| {
            let (a, b) = &bufs[r];
            match b {
                Some(out) => (
                    TensorRef::new(a, base, in_len, dtype),
                    TensorRef::new(out, base, out_len, dtype),
                ),
                None => {
                    let whole = TensorRef::new(a, base, in_len.max(out_len), dtype);
                    match kind {
                        CollectiveKind::ReduceScatter => (whole, whole.slice(r * count, count)),
                        CollectiveKind::AllGather => (whole.slice(r * count, count), whole),
                        _ => (whole, whole),
                    }
                }
            }
        })
        .collect();
    let calls: Vec<wccl::Collective<'_>> = views
        .iter()
        .map(|&(input, output)| collective(kind, input, output, op, root))
        .collect();
    if let Err(e) = group.run(&calls, wccl::CallOptions::default()) {
        panic!("{case:?} on {n} ranks failed: {e}");
    }

    let reduced = reference(dtype, op, &inputs);
    for r in 0..n {
        let what = format!("{case:?} on {n} ranks, rank {r}");
        let comm = group.comm(r);
        let (input, output) = views[r];
        let got = read(comm, output);
        match kind {
            CollectiveKind::AllReduce => assert_close(&what, &got, &reduced, |i| {
                tolerance(dtype, op, &inputs, i, reduced[i])
            }),
            CollectiveKind::ReduceScatter => {
                let lo = r * count;
                assert_close(&what, &got, &reduced[lo..lo + count], |i| {
                    tolerance(dtype, op, &inputs, lo + i, reduced[lo + i])
                })
            }
            CollectiveKind::AllGather => {
                let all: Vec<f64> = inputs.concat();
                assert_close(&what, &got, &all, |_| 0.0)
            }
            CollectiveKind::Broadcast => assert_close(&what, &got, &inputs[root], |_| 0.0),
            CollectiveKind::Reduce if r == root => assert_close(&what, &got, &reduced, |i| {
                tolerance(dtype, op, &inputs, i, reduced[i])
            }),
            CollectiveKind::Reduce => {
                if !in_place {
                    // Non-root outputs are not written.
                    assert!(
                        got.iter().all(|g| same(*g, poison(dtype))),
                        "{what}: non-root output written"
                    );
                }
            }
            CollectiveKind::Barrier => {}
        }
        // Out-of-place inputs are untouched.
        if !in_place {
            assert_close(
                &format!("{what} (input kept)"),
                &read(comm, input),
                &inputs[r],
                |_| 0.0,
            );
        }
        // The poison around each tensor is intact.
        if pad > 0 {
            for (buf, len) in [
                (
                    Some(&bufs[r].0),
                    in_len.max(if in_place { out_len } else { 0 }),
                ),
                (bufs[r].1.as_ref(), out_len),
            ] {
                if let Some(b) = buf {
                    let before = read(comm, TensorRef::new(b, 0, pad, dtype));
                    let after = read(comm, TensorRef::new(b, base + len as u64 * es, pad, dtype));
                    assert!(
                        before.iter().chain(&after).all(|g| same(*g, poison(dtype))),
                        "{what}: wrote outside the tensor"
                    );
                }
            }
        }
    }
}

fn same(a: f64, b: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan())
}

/// The flags for the tests' own instances: wgpu's from the environment, without
/// `InstanceFlags::DEBUG` (debug builds' default) unless `WGPU_DEBUG` was set, as wccl's own
/// instances have them: with it, the Vulkan loader looks a device up for every object name in
/// its lists of every device of the process without a lock, and tests make and drop devices on
/// other threads meanwhile (see README, "`WGPU_DEBUG`").
pub fn instance_flags() -> wgpu::InstanceFlags {
    let flags = wgpu::InstanceFlags::from_env_or_default();
    if std::env::var("WGPU_DEBUG").is_ok() {
        flags
    } else {
        flags.difference(wgpu::InstanceFlags::DEBUG)
    }
}

/// `n` devices of the caller's own (not wccl's) on the first primary adapter (the software
/// adapter in CI), each opened separately, on an instance with [`instance_flags`].
pub fn user_devices(n: usize) -> Vec<(wgpu::Device, wgpu::Queue)> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::PRIMARY,
        flags: instance_flags(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::PRIMARY))
        .into_iter()
        .next()
        .expect("a Vulkan adapter (apt-get install mesa-vulkan-drivers)");
    (0..n)
        .map(|_| {
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default()))
                .expect("a device")
        })
        .collect()
}
