//! Tensor parallelism: the matmul kernels against an f64 host reference (odd shapes, transposes,
//! offsets, row blocks, f16), the column- and row-parallel splits against the single-device
//! product on 1 to 8 ranks, the layers and the MLP block forward and backward, and bad input.

mod common;

use std::time::Duration;

use common::{group, group_with, make_buffer, poison, read};
use rand::Rng;
use wccl::tp::{
    self, ColumnParallel, ColumnParallelLinear, Kernels, Matmul, MatmulKernel, ParallelMlp,
    RowParallel, RowParallelLinear,
};
use wccl::{CommConfig, CommGroup, Communicator, DType, Error, TensorRef};

const KERNELS: [MatmulKernel; 3] = [
    MatmulKernel::Plain,
    MatmulKernel::Tiled,
    MatmulKernel::TiledLarge,
];

// ---------------------------------------------------------------- host reference (f64)

/// `op(A) op(B)` with A stored `m x k` (or `k x m` transposed) and B `k x n` (or `n x k`).
fn matmul_ref(a: &[f64], b: &[f64], spec: &Matmul) -> Vec<f64> {
    let Matmul { m, n, k, .. } = *spec;
    let at = |i: usize, p: usize| {
        if spec.trans_a {
            a[p * m + i]
        } else {
            a[i * k + p]
        }
    };
    let bt = |p: usize, j: usize| {
        if spec.trans_b {
            b[j * k + p]
        } else {
            b[p * n + j]
        }
    };
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
        }
    }
    c
}

fn transpose(x: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut t = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

const S: f64 = 0.797_884_560_802_865_4;
const C: f64 = 0.044715;

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + (S * (v + C * v * v * v)).tanh())
}

fn gelu_grad(v: f64) -> f64 {
    let t = (S * (v + C * v * v * v)).tanh();
    0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * S * (1.0 + 3.0 * C * v * v)
}

/// `||got - want|| / ||want||`.
fn rel_err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    let err: f64 = got.iter().zip(want).map(|(g, w)| (g - w).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    if norm == 0.0 {
        err.sqrt()
    } else {
        (err / norm).sqrt()
    }
}

fn assert_close(what: &str, got: &[f64], want: &[f64], limit: f64) {
    assert!(
        got.iter().all(|v| v.is_finite()),
        "{what}: unwritten (NaN-poisoned) or non-finite elements in {got:?}"
    );
    let e = rel_err(got, want);
    assert!(e < limit, "{what}: relative error {e:e} over {limit:e}");
}

fn random(rng: &mut impl Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| rng.random_range(-1.0f64..1.0) as f32 as f64)
        .collect()
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Uploads `values` between `pad` poisoned elements on each side; returns the buffer.
fn padded(comm: &Communicator, dtype: DType, values: &[f64], pad: usize) -> wgpu::Buffer {
    make_buffer(comm, dtype, values, pad)
}

/// Runs `spec` on `a` and `b` on rank 0's device and returns C, checking that the poisoned
/// padding around C is untouched.
fn run_matmul(
    comm: &Communicator,
    kernels: &mut Kernels,
    spec: &Matmul,
    dtype: DType,
    (a, b): (&[f64], &[f64]),
    pad: usize,
) -> Result<Vec<f64>, Error> {
    let ab = padded(comm, dtype, a, pad);
    let bb = padded(comm, dtype, b, pad + 1);
    let cb = padded(comm, dtype, &vec![poison(dtype); spec.m * spec.n], pad + 2);
    let es = dtype.size() as u64;
    let view = |buf, p: usize, count| TensorRef::new(buf, p as u64 * es, count, dtype);
    kernels.matmul(
        comm.device(),
        spec,
        view(&ab, pad, a.len()),
        view(&bb, pad + 1, b.len()),
        view(&cb, pad + 2, spec.m * spec.n),
    )?;
    let whole = read(comm, view(&cb, 0, spec.m * spec.n + 2 * (pad + 2)));
    let (before, rest) = whole.split_at(pad + 2);
    let (c, after) = rest.split_at(spec.m * spec.n);
    assert!(
        before.iter().chain(after).all(|v| v.is_nan()),
        "the padding around C was written"
    );
    Ok(c.to_vec())
}

// ---------------------------------------------------------------- the kernels

#[test]
fn matmul_matches_the_f64_reference_on_odd_shapes_transposes_and_offsets() {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    let mut rng = rand::rng();
    let mut shapes = vec![
        (1, 1, 1),
        (2, 3, 5),
        (7, 13, 31),
        (65, 67, 17),
        (129, 63, 130),
        (3, 200, 1),
        (64, 64, 64),
        (131, 257, 33),
    ];
    // And fresh random shapes each run, up to a few tiles in every direction.
    for _ in 0..6 {
        shapes.push((
            rng.random_range(1..=300),
            rng.random_range(1..=300),
            rng.random_range(1..=150),
        ));
    }
    for (m, n, k) in shapes {
        for kernel in KERNELS {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let mut spec = Matmul::new(m, n, k).kernel(kernel);
                spec.trans_a = ta;
                spec.trans_b = tb;
                let a = random(&mut rng, m * k);
                let b = random(&mut rng, k * n);
                let got = run_matmul(comm, &mut kernels, &spec, DType::F32, (&a, &b), 3)
                    .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
                assert_close(&format!("{spec:?}"), &got, &matmul_ref(&a, &b, &spec), 1e-5);
            }
        }
    }
}

#[test]
fn matmul_in_f16_accumulates_in_f32() {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    let mut rng = rand::rng();
    for (m, n, k) in [(1, 1, 1), (33, 17, 70), (130, 65, 257)] {
        for kernel in KERNELS {
            let spec = Matmul::new(m, n, k).kernel(kernel).trans_b();
            let round = |v: Vec<f64>| -> Vec<f64> {
                v.into_iter()
                    .map(|x| wccl::f16::from_f64(x).to_f64())
                    .collect()
            };
            let a = round(random(&mut rng, m * k));
            let b = round(random(&mut rng, k * n));
            let result = run_matmul(comm, &mut kernels, &spec, DType::F16, (&a, &b), 2);
            if !comm.device().native_f16() {
                assert!(matches!(result, Err(Error::UnsupportedDType { .. })));
                println!("skipped matmul_in_f16_accumulates_in_f32 {spec:?}: no SHADER_F16");
                continue;
            }
            let got = result.unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_close(
                &format!("f16 {spec:?}"),
                &got,
                &matmul_ref(&a, &b, &spec),
                1e-2,
            );
        }
    }
}

#[test]
fn products_larger_than_one_binding_run_in_row_blocks() {
    let g = group(1);
    let comm = g.comm(0);
    // 16 KiB bindings: A (300 x 30 f32, 36 KB) and C need three row blocks.
    let mut kernels = Kernels::with_binding_limit(comm.device(), 16 << 10);
    let mut rng = rand::rng();
    let (m, n, k) = (300, 20, 30);
    for kernel in KERNELS {
        for tb in [false, true] {
            let mut spec = Matmul::new(m, n, k).kernel(kernel);
            spec.trans_b = tb;
            let a = random(&mut rng, m * k);
            let b = random(&mut rng, k * n);
            let got = run_matmul(comm, &mut kernels, &spec, DType::F32, (&a, &b), 5)
                .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
            assert_close(&format!("{spec:?}"), &got, &matmul_ref(&a, &b, &spec), 1e-5);
        }
    }
    // A transposed A cannot be cut into row blocks: it must fit one binding, else a clear error.
    let spec = Matmul::new(m, n, k).trans_a();
    let a = random(&mut rng, m * k);
    let b = random(&mut rng, k * n);
    match run_matmul(comm, &mut kernels, &spec, DType::F32, (&a, &b), 0) {
        Err(Error::InvalidArgument { message, .. }) => {
            assert!(message.contains("transposed A"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // With a transposed A that fits, C still runs in row blocks.
    let (m, k) = (200, 10);
    let spec = Matmul::new(m, n, k).trans_a();
    let a = random(&mut rng, m * k);
    let b = random(&mut rng, k * n);
    let got = run_matmul(comm, &mut kernels, &spec, DType::F32, (&a, &b), 1).unwrap();
    assert_close("trans_a blocks", &got, &matmul_ref(&a, &b, &spec), 1e-5);
}

#[test]
fn empty_products() {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    // k = 0: C is an empty sum, zero.
    let got = run_matmul(
        comm,
        &mut kernels,
        &Matmul::new(3, 5, 0),
        DType::F32,
        (&[], &[]),
        1,
    )
    .unwrap();
    assert_eq!(got, vec![0.0; 15]);
    // m = 0 or n = 0: nothing to write, and the padding stays poisoned.
    let b = vec![1.0; 4];
    assert!(
        run_matmul(
            comm,
            &mut kernels,
            &Matmul::new(0, 4, 1),
            DType::F32,
            (&[], &b),
            1
        )
        .unwrap()
        .is_empty()
    );
    let a = vec![1.0; 4];
    assert!(
        run_matmul(
            comm,
            &mut kernels,
            &Matmul::new(4, 0, 1),
            DType::F32,
            (&a, &[]),
            1
        )
        .unwrap()
        .is_empty()
    );
}

#[test]
fn gelu_forward_and_backward_match_the_reference() {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    let mut rng = rand::rng();
    for len in [1usize, 7, 256, 1000] {
        let mut x: Vec<f64> = (0..len)
            .map(|_| rng.random_range(-6.0f64..6.0) as f32 as f64)
            .collect();
        x[0] = 40.0; // far out, where a naive tanh overflows
        let dy = random(&mut rng, len);
        let xb = comm.upload(&f32s(&x)).unwrap();
        let dyb = comm.upload(&f32s(&dy)).unwrap();
        let out = comm.upload(&vec![f32::NAN; len]).unwrap();
        kernels.gelu(comm.device(), xb.view(), out.view()).unwrap();
        let want: Vec<f64> = x.iter().map(|&v| gelu(v)).collect();
        assert_close("gelu", &f64s(&comm.download(&out).unwrap()), &want, 1e-6);
        let dx = comm.upload(&vec![f32::NAN; len]).unwrap();
        kernels
            .gelu_backward(comm.device(), xb.view(), dyb.view(), dx.view())
            .unwrap();
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&v, &d)| d * gelu_grad(v)).collect();
        assert_close("gelu'", &f64s(&comm.download(&dx).unwrap()), &want, 1e-5);
    }
}

#[test]
fn bad_matmul_input_is_refused_without_writing() {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    let dev = comm.device();
    let a = comm.upload(&[1.0f32; 6]).unwrap();
    let b = comm.upload(&[1.0f32; 6]).unwrap();
    let c = comm.upload(&[f32::NAN; 4]).unwrap();
    let spec = Matmul::new(2, 2, 3);
    let invalid = |r: wccl::Result<()>, needle: &str| match r {
        Err(Error::InvalidArgument { message, at }) => {
            assert!(
                message.contains(needle),
                "'{message}' should say '{needle}'"
            );
            assert_eq!(at.rank, 0);
        }
        other => panic!("expected InvalidArgument ({needle}), got {other:?}"),
    };
    // Shapes that do not match the buffers.
    invalid(
        kernels.matmul(dev, &Matmul::new(2, 2, 4), a.view(), b.view(), c.view()),
        "a has 6 elements",
    );
    invalid(
        kernels.matmul(dev, &spec, a.view(), b.range(0, 5), c.view()),
        "b has 5 elements",
    );
    invalid(
        kernels.matmul(dev, &spec, a.view(), b.view(), c.range(0, 3)),
        "c has 3 elements",
    );
    // C in A's buffer.
    let big = comm.upload(&[1.0f32; 10]).unwrap();
    invalid(
        kernels.matmul(dev, &spec, big.range(0, 6), b.view(), big.range(6, 4)),
        "buffer of its own",
    );
    // Integers are not matmul types; mixed types are refused.
    let ints = comm.upload(&[1i32; 6]).unwrap();
    invalid(
        kernels.matmul(dev, &spec, ints.view(), ints.view(), c.view()),
        "operands of int32 and float",
    );
    let ic = comm.buffer::<i32>(4).unwrap();
    invalid(
        kernels.matmul(dev, &spec, ints.view(), ints.view(), ic.view()),
        "int32 is not supported",
    );
    invalid(
        kernels.gelu(dev, a.view(), c.view()),
        "operands of 6 and 4 elements",
    );
    assert!(comm.download(&c).unwrap().iter().all(|v| v.is_nan()));
}

/// bf16 inputs, f32 accumulation, one rounding of each output to bf16: against the f64 product of
/// the bf16 inputs, within the output's rounding (2^-8 relative per element; accumulating in bf16
/// would be far off at k = 257). Operands at odd element offsets and odd widths, so neighbouring
/// outputs share words, on every kernel and transpose, and on a device without `SHADER_F16`.
#[test]
fn matmul_in_bf16_accumulates_in_f32() {
    let g = CommGroup::from_devices(plain_devices(1), CommConfig::default()).unwrap();
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    let mut rng = rand::rng();
    let round = |v: Vec<f64>| -> Vec<f64> {
        v.into_iter()
            .map(|x| wccl::bf16::from_f64(x).to_f64())
            .collect()
    };
    for (m, n, k) in [(1, 1, 1), (33, 17, 70), (130, 65, 257)] {
        for kernel in KERNELS {
            for (ta, tb) in [(false, false), (true, true)] {
                let mut spec = Matmul::new(m, n, k).kernel(kernel);
                spec.trans_a = ta;
                spec.trans_b = tb;
                let a = round(random(&mut rng, m * k));
                let b = round(random(&mut rng, k * n));
                let got = run_matmul(comm, &mut kernels, &spec, DType::BF16, (&a, &b), 1)
                    .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
                assert_close(
                    &format!("bf16 {spec:?}"),
                    &got,
                    &matmul_ref(&a, &b, &spec),
                    4e-3,
                );
            }
        }
    }
}

/// `n` devices on the first adapter, opened with no optional feature.
fn plain_devices(n: usize) -> Vec<(wgpu::Device, wgpu::Queue)> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        flags: common::instance_flags(),
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    });
    let adapters =
        wccl::device::discover_adapters(&instance, &wccl::AdapterSelector::default()).unwrap();
    (0..n)
        .map(|_| {
            pollster::block_on(adapters[0].request_device(&wgpu::DeviceDescriptor {
                required_features: wgpu::Features::empty(),
                ..Default::default()
            }))
            .unwrap()
        })
        .collect()
}

#[test]
fn f16_matmul_on_a_device_without_shader_f16_is_a_clear_error() {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        flags: common::instance_flags(),
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    });
    let adapters =
        wccl::device::discover_adapters(&instance, &wccl::AdapterSelector::default()).unwrap();
    let (device, queue) = pollster::block_on(adapters[0].request_device(&wgpu::DeviceDescriptor {
        required_features: wgpu::Features::empty(),
        ..Default::default()
    }))
    .unwrap();
    let g = CommGroup::from_devices(vec![(device, queue)], CommConfig::default()).unwrap();
    let comm = g.comm(0);
    let raw = comm.buffer::<u32>(8).unwrap();
    let t = TensorRef::new(raw.raw(), 0, 4, DType::F16);
    let out = comm.buffer::<u32>(8).unwrap();
    let c = TensorRef::new(out.raw(), 0, 4, DType::F16);
    let mut kernels = Kernels::new(comm.device());
    match kernels.matmul(comm.device(), &Matmul::new(2, 2, 2), t, t, c) {
        Err(Error::UnsupportedDType {
            dtype: DType::F16, ..
        }) => {}
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
    // GELU takes float and half only (its kernel would run on bf16's u32 words): refused by name.
    let t = TensorRef::new(raw.raw(), 0, 4, DType::BF16);
    let c = TensorRef::new(out.raw(), 0, 4, DType::BF16);
    match kernels.gelu(comm.device(), t, c) {
        Err(Error::InvalidArgument { message, .. }) => assert!(message.contains("bfloat16")),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

// ---------------------------------------------------------------- the splits

/// Runs `f` on every rank of a fresh group of `n`, each on its own thread; panics on an error.
fn each<R: Send>(n: usize, f: impl Fn(&mut Communicator) -> wccl::Result<R> + Sync) -> Vec<R> {
    let mut g = group(n);
    g.run_each(f)
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect()
}

#[test]
fn column_parallel_equals_the_single_device_product_on_1_to_8_ranks() {
    let mut rng = rand::rng();
    for ranks in 1..=8 {
        // n not a multiple of the rank count (except where it cannot help it), m over a tile.
        let (m, n, k) = (70, 3 * ranks + 1, 19);
        let a = random(&mut rng, m * k);
        let b = random(&mut rng, k * n);
        let want = matmul_ref(&a, &b, &Matmul::new(m, n, k));
        let single = single_device_product(&a, &b, (m, n, k));
        assert_close("single device", &single, &want, 1e-5);
        let out = each(ranks, |comm| {
            let mut kernels = Kernels::new(comm.device());
            let mut split = ColumnParallel::new(comm, m, n, k)?;
            let cols = split.columns();
            let ab = comm.upload(&f32s(&a))?;
            let bb = comm.upload(&f32s(&tp::columns_of(&b, n, cols.clone())))?;
            let shard = comm.upload(&vec![f32::NAN; m * cols.len()])?;
            split.forward(comm, &mut kernels, ab.view(), bb.view(), shard.view())?;
            let full = comm.upload(&vec![f32::NAN; m * n])?;
            split.forward_gathered(comm, &mut kernels, ab.view(), bb.view(), full.view())?;
            // A second call reuses the scratch buffers.
            let again = comm.upload(&vec![f32::NAN; m * n])?;
            split.forward_gathered(comm, &mut kernels, ab.view(), bb.view(), again.view())?;
            Ok((
                cols,
                f64s(&comm.download(&shard)?),
                f64s(&comm.download(&full)?),
                f64s(&comm.download(&again)?),
            ))
        });
        let mut covered = 0;
        for (r, (cols, shard, full, again)) in out.into_iter().enumerate() {
            covered += cols.len();
            let what = format!("{ranks} ranks, rank {r}");
            assert_close(&what, &shard, &tp::columns_of(&single, n, cols), 1e-6);
            assert_close(&what, &full, &single, 1e-6);
            assert_close(&what, &again, &want, 1e-5);
        }
        assert_eq!(covered, n, "the shards must cover every column once");
    }
}

fn single_device_product(a: &[f64], b: &[f64], (m, n, k): (usize, usize, usize)) -> Vec<f64> {
    let g = group(1);
    let comm = g.comm(0);
    let mut kernels = Kernels::new(comm.device());
    run_matmul(
        comm,
        &mut kernels,
        &Matmul::new(m, n, k),
        DType::F32,
        (a, b),
        0,
    )
    .unwrap()
}

#[test]
fn row_parallel_equals_the_single_device_product_on_1_to_8_ranks() {
    let mut rng = rand::rng();
    for ranks in 1..=8 {
        let (m, n, k) = (33, 66, 5 * ranks + 3);
        let a = random(&mut rng, m * k);
        let b = random(&mut rng, k * n);
        let want = matmul_ref(&a, &b, &Matmul::new(m, n, k));
        let single = single_device_product(&a, &b, (m, n, k));
        let out = each(ranks, |comm| {
            let mut kernels = Kernels::new(comm.device());
            let split = RowParallel::new(comm, m, n, k)?;
            let rows = split.rows();
            let a_shard = comm.upload(&f32s(&tp::columns_of(&a, k, rows.clone())))?;
            let b_shard = comm.upload(&f32s(tp::rows_of(&b, n, rows.clone())))?;
            let c = comm.upload(&vec![f32::NAN; m * n])?;
            split.forward(comm, &mut kernels, a_shard.view(), b_shard.view(), c.view())?;
            Ok(f64s(&comm.download(&c)?))
        });
        for (r, c) in out.into_iter().enumerate() {
            let what = format!("{ranks} ranks, rank {r}");
            assert_close(&what, &c, &want, 1e-5);
            assert_close(&what, &c, &single, 1e-5);
        }
    }
}

#[test]
fn a_split_over_more_ranks_than_columns_is_refused() {
    let errors = {
        let mut g = group(4);
        g.run_each(|comm| {
            let col = ColumnParallel::new(comm, 8, 3, 8).err();
            let row = RowParallel::new(comm, 8, 8, 3).err();
            let w = vec![0.0f32; 8 * 3];
            let lin = ColumnParallelLinear::new(comm, 8, 3, &w).err();
            Ok((col, row, lin))
        })
    };
    for r in errors {
        let (col, row, lin) = r.unwrap();
        for e in [col, row, lin] {
            match e {
                Some(Error::InvalidArgument { message, .. }) => {
                    assert!(message.contains("over 4 ranks"), "{message}")
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------- layers

/// The f64 reference of the MLP block: (y, dx, dW1, dW2).
fn mlp_ref(
    x: &[f64],
    w1: &[f64],
    w2: &[f64],
    dy: &[f64],
    (batch, d_in, ffn, d_out): (usize, usize, usize, usize),
) -> [Vec<f64>; 4] {
    let h = matmul_ref(x, w1, &Matmul::new(batch, ffn, d_in));
    let z: Vec<f64> = h.iter().map(|&v| gelu(v)).collect();
    let y = matmul_ref(&z, w2, &Matmul::new(batch, d_out, ffn));
    let dw2 = matmul_ref(&z, dy, &Matmul::new(ffn, d_out, batch).trans_a());
    let dz = matmul_ref(dy, w2, &Matmul::new(batch, ffn, d_out).trans_b());
    let dh: Vec<f64> = dz.iter().zip(&h).map(|(d, &v)| d * gelu_grad(v)).collect();
    let dw1 = matmul_ref(x, &dh, &Matmul::new(d_in, ffn, batch).trans_a());
    let dx = matmul_ref(&dh, w1, &Matmul::new(batch, d_in, ffn).trans_b());
    [y, dx, dw1, dw2]
}

#[test]
fn mlp_block_forward_and_backward_match_the_reference_on_1_to_8_ranks() {
    let mut rng = rand::rng();
    for ranks in [1, 2, 3, 4, 8] {
        let (batch, d_in, ffn, d_out) = (9, 24, 4 * ranks + 3, 17);
        let x = random(&mut rng, batch * d_in);
        let w1 = random(&mut rng, d_in * ffn);
        let w2 = random(&mut rng, ffn * d_out);
        let dy = random(&mut rng, batch * d_out);
        let [y, dx, dw1, dw2] = mlp_ref(&x, &w1, &w2, &dy, (batch, d_in, ffn, d_out));
        let out = each(ranks, |comm| {
            let mut kernels = Kernels::new(comm.device());
            let mut mlp = ParallelMlp::new(comm, (d_in, ffn, d_out), &f32s(&w1), &f32s(&w2))?;
            let xb = comm.upload(&f32s(&x))?;
            let dyb = comm.upload(&f32s(&dy))?;
            let yb = comm.upload(&vec![f32::NAN; batch * d_out])?;
            let dxb = comm.upload(&vec![f32::NAN; batch * d_in])?;
            mlp.forward(comm, &mut kernels, xb.view(), yb.view())?;
            mlp.backward(comm, &mut kernels, xb.view(), dyb.view(), dxb.view())?;
            Ok((
                mlp.fc1().columns(),
                f64s(&comm.download(&yb)?),
                f64s(&comm.download(&dxb)?),
                f64s(&comm.download(mlp.fc1().weight_grad())?),
                f64s(&comm.download(mlp.fc2().weight_grad())?),
                comm.bytes_sent(),
            ))
        });
        for (r, (cols, yr, dxr, dw1r, dw2r, sent)) in out.into_iter().enumerate() {
            let what = format!("{ranks} ranks, rank {r}");
            assert_close(&format!("{what} y"), &yr, &y, 1e-5);
            assert_close(&format!("{what} dx"), &dxr, &dx, 1e-5);
            assert_close(
                &format!("{what} dW1"),
                &dw1r,
                &tp::columns_of(&dw1, ffn, cols.clone()),
                1e-5,
            );
            assert_close(
                &format!("{what} dW2"),
                &dw2r,
                tp::rows_of(&dw2, d_out, cols),
                1e-5,
            );
            // Two all-reduces (y forward, dx backward), each a ring moving 2 (n-1)/n of the
            // buffer out of every rank: nothing else crossed the links.
            let ring = |len: usize| 2 * (ranks - 1) * len.div_ceil(ranks) * 4;
            let lo = 2 * (ranks - 1) * ((batch * d_out) / ranks + (batch * d_in) / ranks) * 4;
            let hi = ring(batch * d_out) + ring(batch * d_in);
            assert!(
                (lo as u64..=hi as u64).contains(&sent),
                "{what}: sent {sent} bytes, expected {lo}..={hi}"
            );
        }
    }
}

#[test]
fn column_parallel_linear_gathered_forward_and_backward() {
    let mut rng = rand::rng();
    for ranks in [1, 3, 4] {
        let (batch, d_in, d_out) = (5, 11, 2 * ranks + 1);
        let x = random(&mut rng, batch * d_in);
        let w = random(&mut rng, d_in * d_out);
        let dy = random(&mut rng, batch * d_out);
        let y = matmul_ref(&x, &w, &Matmul::new(batch, d_out, d_in));
        let dw = matmul_ref(&x, &dy, &Matmul::new(d_in, d_out, batch).trans_a());
        let dx = matmul_ref(
            &dy,
            &transpose(&w, d_in, d_out),
            &Matmul::new(batch, d_in, d_out),
        );
        let out = each(ranks, |comm| {
            let mut kernels = Kernels::new(comm.device());
            let mut layer = ColumnParallelLinear::new(comm, d_in, d_out, &f32s(&w))?;
            let xb = comm.upload(&f32s(&x))?;
            let dyb = comm.upload(&f32s(&dy))?;
            let yb = comm.upload(&vec![f32::NAN; batch * d_out])?;
            let dxb = comm.upload(&vec![f32::NAN; batch * d_in])?;
            layer.forward_gathered(comm, &mut kernels, xb.view(), yb.view())?;
            layer.backward_gathered(comm, &mut kernels, xb.view(), dyb.view(), dxb.view())?;
            Ok((
                layer.columns(),
                f64s(&comm.download(&yb)?),
                f64s(&comm.download(&dxb)?),
                f64s(&comm.download(layer.weight_grad())?),
            ))
        });
        for (r, (cols, yr, dxr, dwr)) in out.into_iter().enumerate() {
            let what = format!("{ranks} ranks, rank {r}");
            assert_close(&format!("{what} y"), &yr, &y, 1e-5);
            assert_close(&format!("{what} dx"), &dxr, &dx, 1e-5);
            assert_close(
                &format!("{what} dW"),
                &dwr,
                &tp::columns_of(&dw, d_out, cols),
                1e-5,
            );
        }
    }
}

#[test]
fn row_parallel_linear_forward_and_backward() {
    let mut rng = rand::rng();
    let ranks = 3;
    let (batch, d_in, d_out) = (6, 10, 7);
    let x = random(&mut rng, batch * d_in);
    let w = random(&mut rng, d_in * d_out);
    let dy = random(&mut rng, batch * d_out);
    let y = matmul_ref(&x, &w, &Matmul::new(batch, d_out, d_in));
    let dw = matmul_ref(&x, &dy, &Matmul::new(d_in, d_out, batch).trans_a());
    let dx = matmul_ref(&dy, &w, &Matmul::new(batch, d_in, d_out).trans_b());
    let out = each(ranks, |comm| {
        let mut kernels = Kernels::new(comm.device());
        let mut layer = RowParallelLinear::new(comm, d_in, d_out, &f32s(&w))?;
        let rows = layer.rows();
        let xb = comm.upload(&f32s(&tp::columns_of(&x, d_in, rows.clone())))?;
        let dyb = comm.upload(&f32s(&dy))?;
        let yb = comm.upload(&vec![f32::NAN; batch * d_out])?;
        let dxb = comm.upload(&vec![f32::NAN; batch * rows.len()])?;
        layer.forward(comm, &mut kernels, xb.view(), yb.view())?;
        layer.backward(comm, &mut kernels, xb.view(), dyb.view(), dxb.view())?;
        Ok((
            rows,
            f64s(&comm.download(&yb)?),
            f64s(&comm.download(&dxb)?),
            f64s(&comm.download(layer.weight_grad())?),
        ))
    });
    for (r, (rows, yr, dxr, dwr)) in out.into_iter().enumerate() {
        let what = format!("rank {r}");
        assert_close(&format!("{what} y"), &yr, &y, 1e-5);
        assert_close(
            &format!("{what} dx"),
            &dxr,
            &tp::columns_of(&dx, d_in, rows.clone()),
            1e-5,
        );
        assert_close(
            &format!("{what} dW"),
            &dwr,
            tp::rows_of(&dw, d_out, rows),
            1e-5,
        );
    }
}

#[test]
fn one_rank_with_bad_shapes_stops_the_others_at_once() {
    let config = CommConfig::default().timeout(Duration::from_secs(30));
    let mut g = group_with(3, config);
    let (batch, d_in, d_out) = (4, 6, 5);
    let w = vec![0.5f32; d_in * d_out];
    let results = g.run_each(|comm| {
        let mut kernels = Kernels::new(comm.device());
        let mut layer = RowParallelLinear::new(comm, d_in, d_out, &w)?;
        // Rank 1 passes one row too few of its input shard.
        let rows = layer.rows().len();
        let len = batch * rows - if comm.rank() == 1 { rows } else { 0 };
        let x = comm.upload(&vec![1.0f32; len])?;
        let y = comm.buffer::<f32>(batch * d_out)?;
        layer.forward(comm, &mut kernels, x.view(), y.view())
    });
    // At once: the others stop on rank 1's abort (below), not by the 30 s deadline.
    for (r, res) in results.into_iter().enumerate() {
        match (r, res) {
            (1, Err(Error::InvalidArgument { message, .. })) => {
                assert!(message.contains("matmul"), "{message}")
            }
            (_, Err(Error::PeerAborted { peer: 1, .. })) => {}
            (r, other) => panic!("rank {r}: {other:?}"),
        }
    }
}

#[test]
fn column_parallel_gathers_f16_shards_of_odd_sizes() {
    let mut rng = rand::rng();
    let ranks = 3;
    // Odd m and a width that leaves shards of 3, 2 and 2 columns: blocks of odd f16 counts.
    let (m, n, k) = (5, 7, 9);
    let half = |v: Vec<f64>| -> Vec<f64> {
        v.into_iter()
            .map(|x| wccl::f16::from_f64(x).to_f64())
            .collect()
    };
    let a = half(random(&mut rng, m * k));
    let b = half(random(&mut rng, k * n));
    let want = matmul_ref(&a, &b, &Matmul::new(m, n, k));
    let to16 =
        |v: &[f64]| -> Vec<wccl::f16> { v.iter().map(|&x| wccl::f16::from_f64(x)).collect() };
    let out = each(ranks, |comm| {
        if !comm.device().native_f16() {
            println!("skipped column_parallel_gathers_f16_shards_of_odd_sizes: no SHADER_F16");
            return Ok(None);
        }
        let mut kernels = Kernels::new(comm.device());
        let mut split = ColumnParallel::new(comm, m, n, k)?;
        let ab = comm.upload(&to16(&a))?;
        let bb = comm.upload(&to16(&tp::columns_of(&b, n, split.columns())))?;
        let c = comm.upload(&vec![wccl::f16::NAN; m * n])?;
        split.forward_gathered(comm, &mut kernels, ab.view(), bb.view(), c.view())?;
        Ok(Some(
            comm.download(&c)?
                .iter()
                .map(|x| x.to_f64())
                .collect::<Vec<_>>(),
        ))
    });
    for (r, c) in out.into_iter().enumerate() {
        match c {
            Some(c) => assert_close(&format!("f16 rank {r}"), &c, &want, 1e-2),
            None => assert!(!group(1).comm(0).device().native_f16()),
        }
    }
}

#[test]
fn mlp_backward_needs_a_forward_pass_on_the_same_batch() {
    let (d, ffn) = (4, 8);
    let w = vec![0.1f32; d * ffn];
    let results = group(2).run_each(|comm| {
        let mut kernels = Kernels::new(comm.device());
        let mut mlp = ParallelMlp::new(comm, (d, ffn, d), &w, &w)?;
        let x = comm.upload(&vec![1.0f32; 3 * d])?;
        let dx = comm.buffer::<f32>(3 * d)?;
        mlp.backward(comm, &mut kernels, x.view(), x.view(), dx.view())
    });
    for r in results {
        match r {
            Err(Error::InvalidArgument { message, .. }) => {
                assert!(message.contains("without a forward pass"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

#[test]
fn auto_takes_the_large_tiles_where_the_product_has_enough_of_them() {
    use MatmulKernel::*;
    // On a GPU (256 large tiles wanted) and on a CPU adapter (one is enough).
    assert_eq!(Auto.resolve(4096, 4096, 256), TiledLarge);
    assert_eq!(Auto.resolve(1024, 1024, 256), Tiled);
    assert_eq!(Auto.resolve(2048, 2048, 256), TiledLarge);
    assert_eq!(Auto.resolve(512, 512, 1), TiledLarge);
    assert_eq!(Auto.resolve(127, 4096, 1), Tiled);
    // Other kernels stand for themselves.
    assert_eq!(Plain.resolve(4096, 4096, 1), Plain);
    assert_eq!(Tiled.resolve(4096, 4096, 1), Tiled);
    assert_eq!(TiledLarge.resolve(1, 1, 256), TiledLarge);
    // The default is Auto, and a device resolves it by its type.
    let g = group(1);
    let comm = g.comm(0);
    let kernels = Kernels::new(comm.device());
    let spec = Matmul::new(512, 512, 512);
    assert_eq!(spec.kernel, Auto);
    let cpu = comm.device().info().device_type == wgpu::DeviceType::Cpu;
    let want = if cpu { TiledLarge } else { Tiled };
    assert_eq!(kernels.resolve(&spec), want);
    assert_eq!(kernels.resolve(&Matmul::new(100, 37, 129)), Tiled);
}
