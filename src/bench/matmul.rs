//! `wccl-bench matmul`: the matmul kernels' GFLOP/s on one device, each kernel beside the plain
//! one in the same run, with the result checked against an f64 host reference.

use std::io::Write;
use std::time::{Duration, Instant};

use super::BenchError;
use crate::tp::{Kernels, Matmul, MatmulKernel};
use crate::{Communicator, DType, TensorRef};

/// One measured product.
#[derive(Clone, Debug)]
pub struct MatmulRow {
    /// The product (shape, transposes, kernel).
    pub spec: Matmul,
    /// Element type.
    pub dtype: DType,
    /// Median seconds per product.
    pub seconds: f64,
    /// `2 m n k / seconds`, in GFLOP/s.
    pub gflops: f64,
    /// `||C - ref|| / ||ref||` over the checked entries (all of them up to 4,096, else a sample
    /// of 4,096), if checked.
    pub rel_err: Option<f64>,
}

/// A deterministic value in [-1, 1) for element `i` of operand `which`.
fn value(which: u64, i: u64) -> f32 {
    let mut x = (which << 40) ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Parses `512` (a cube) or `256x512x128` (m x n x k).
pub fn parse_shape(s: &str) -> Result<(usize, usize, usize), String> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| {
            super::parse_size(p.trim())
                .map(|v| v as usize)
                .map_err(|e| format!("'{s}': {e}"))
        })
        .collect::<Result<_, _>>()?;
    match parts[..] {
        [c] => Ok((c, c, c)),
        [m, n, k] => Ok((m, n, k)),
        _ => Err(format!(
            "'{s}' is not a size (512) or a shape (m x n x k: 256x512x128)"
        )),
    }
}

/// Measures every shape with every kernel (plain first where asked, so the others can be put
/// beside it), prints a table to `out` and returns the rows.
#[allow(clippy::too_many_arguments)]
pub fn matmul_rows(
    comm: &Communicator,
    shapes: &[(usize, usize, usize)],
    kernels: &[MatmulKernel],
    dtype: DType,
    iters: usize,
    warmup: usize,
    check: bool,
    out: &mut dyn Write,
) -> Result<Vec<MatmulRow>, BenchError> {
    let dev = comm.device();
    let mut ks = Kernels::new(dev);
    writeln!(
        out,
        "# {:>6} {:>6} {:>6} {:>5} {:>11} {:>10} {:>9} {:>8} {:>9}",
        "m", "n", "k", "type", "kernel", "time_ms", "GFLOP/s", "x_plain", "rel_err"
    )?;
    let mut rows = Vec::new();
    for &(m, n, k) in shapes {
        let a_host: Vec<f32> = (0..m * k).map(|i| value(1, i as u64)).collect();
        let b_host: Vec<f32> = (0..k * n).map(|i| value(2, i as u64)).collect();
        let (a, b, c) = match dtype {
            DType::F16 => {
                let h = |v: &[f32]| {
                    v.iter()
                        .map(|&x| half::f16::from_f32(x))
                        .collect::<Vec<_>>()
                };
                (
                    Operand::F16(comm.upload(&h(&a_host))?),
                    Operand::F16(comm.upload(&h(&b_host))?),
                    Operand::F16(comm.buffer(m * n)?),
                )
            }
            DType::BF16 => {
                let h = |v: &[f32]| {
                    v.iter()
                        .map(|&x| half::bf16::from_f32(x))
                        .collect::<Vec<_>>()
                };
                (
                    Operand::BF16(comm.upload(&h(&a_host))?),
                    Operand::BF16(comm.upload(&h(&b_host))?),
                    Operand::BF16(comm.buffer(m * n)?),
                )
            }
            _ => (
                Operand::F32(comm.upload(&a_host)?),
                Operand::F32(comm.upload(&b_host)?),
                Operand::F32(comm.buffer(m * n)?),
            ),
        };
        let mut plain_seconds = None;
        let mut order = kernels.to_vec();
        order.sort_by_key(|k| *k != MatmulKernel::Plain);
        for kernel in order {
            let spec = Matmul::new(m, n, k).kernel(kernel);
            let mut times = Vec::with_capacity(iters);
            for i in 0..warmup + iters.max(1) {
                let t0 = Instant::now();
                ks.matmul(dev, &spec, a.view(), b.view(), c.view())?;
                ks.finish(dev, Duration::from_secs(600))?;
                if i >= warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            times.sort_by(f64::total_cmp);
            let seconds = times[times.len() / 2];
            if kernel == MatmulKernel::Plain {
                plain_seconds = Some(seconds);
            }
            let rel_err = if check {
                let got = c.read(comm)?;
                Some(sampled_error(&a_host, &b_host, &got, (m, n, k), dtype))
            } else {
                None
            };
            let row = MatmulRow {
                spec,
                dtype,
                seconds,
                gflops: spec.flops() / seconds / 1e9,
                rel_err,
            };
            writeln!(
                out,
                "  {:>6} {:>6} {:>6} {:>5} {:>11} {:>10.3} {:>9.2} {:>8} {:>9}",
                m,
                n,
                k,
                dtype.to_string(),
                if kernel == MatmulKernel::Auto {
                    format!("auto:{}", kernel_name(ks.resolve(&spec)))
                } else {
                    kernel_name(kernel).to_string()
                },
                seconds * 1e3,
                row.gflops,
                plain_seconds.map_or("-".into(), |p| format!("{:.2}", p / seconds)),
                rel_err.map_or("-".into(), |e| format!("{e:.2e}")),
            )?;
            rows.push(row);
        }
    }
    Ok(rows)
}

/// The kernel's name on the command line.
pub fn kernel_name(kernel: MatmulKernel) -> &'static str {
    match kernel {
        MatmulKernel::Plain => "plain",
        MatmulKernel::Tiled => "tiled",
        MatmulKernel::TiledLarge => "tiled-large",
        MatmulKernel::Auto => "auto",
    }
}

enum Operand {
    F32(crate::DeviceBuffer<f32>),
    F16(crate::DeviceBuffer<half::f16>),
    BF16(crate::DeviceBuffer<half::bf16>),
}

impl Operand {
    fn view(&self) -> TensorRef<'_> {
        match self {
            Operand::F32(b) => b.view(),
            Operand::F16(b) => b.view(),
            Operand::BF16(b) => b.view(),
        }
    }

    fn read(&self, comm: &Communicator) -> crate::Result<Vec<f64>> {
        Ok(match self {
            Operand::F32(b) => comm.download(b)?.into_iter().map(f64::from).collect(),
            Operand::F16(b) => comm.download(b)?.into_iter().map(|x| x.to_f64()).collect(),
            Operand::BF16(b) => comm.download(b)?.into_iter().map(|x| x.to_f64()).collect(),
        })
    }
}

/// `||C - ref|| / ||ref||` over every entry (up to 4,096) or a spread sample of 4,096, with
/// the reference computed in f64 from the inputs as the device saw them.
fn sampled_error(
    a: &[f32],
    b: &[f32],
    c: &[f64],
    (m, n, k): (usize, usize, usize),
    dtype: DType,
) -> f64 {
    let round = |x: f32| match dtype {
        DType::F16 => half::f16::from_f32(x).to_f64(),
        DType::BF16 => half::bf16::from_f32(x).to_f64(),
        _ => f64::from(x),
    };
    let total = m * n;
    if total == 0 {
        return 0.0;
    }
    let samples = total.min(4096);
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for s in 0..samples {
        let idx = if samples == total {
            s
        } else {
            // Spread over the whole matrix, edges included.
            ((s as u128 * (total as u128 - 1)) / (samples as u128 - 1).max(1)) as usize
        };
        let (i, j) = (idx / n, idx % n);
        let want: f64 = (0..k)
            .map(|p| round(a[i * k + p]) * round(b[p * n + j]))
            .sum();
        err += (c[idx] - want).powi(2);
        norm += want * want;
    }
    (err / norm.max(f64::MIN_POSITIVE)).sqrt()
}
