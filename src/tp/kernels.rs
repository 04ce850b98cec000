//! The device work of tensor parallelism on one rank: matmul, GELU and the column copies that
//! split and join shards, each checked before anything is recorded.

use std::time::Duration;

use crate::device::{RankDevice, TensorRef};
use crate::error::{At, Error, Result};
use crate::kernels::{ElementwiseKernels, MatmulCall, MatmulKernel, MatmulKernels};
use crate::types::DType;

/// The shape of one product `C = op(A) op(B)`: C is `m x n`, op(A) is `m x k`, op(B) is `k x n`,
/// all row-major. With `trans_a`, A is stored `k x m` (op(A) = Aᵀ); with `trans_b`, B is stored
/// `n x k`.
///
/// ```
/// use wccl::tp::Matmul;
/// let grad = Matmul::new(512, 256, 64).trans_a(); // Xᵀ dY for X: 64 x 512, dY: 64 x 256
/// assert_eq!(grad.flops(), 2.0 * 512.0 * 256.0 * 64.0);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Matmul {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// A is stored transposed (`k x m`).
    pub trans_a: bool,
    /// B is stored transposed (`n x k`).
    pub trans_b: bool,
    /// Which kernel computes it.
    pub kernel: MatmulKernel,
}

impl Matmul {
    /// `C (m x n) = A (m x k) B (k x n)`, with the kernel chosen for its shape
    /// ([`MatmulKernel::Auto`]).
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Matmul {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            kernel: MatmulKernel::Auto,
        }
    }

    /// Takes A as stored `k x m`.
    pub fn trans_a(self) -> Self {
        Matmul {
            trans_a: true,
            ..self
        }
    }

    /// Takes B as stored `n x k`.
    pub fn trans_b(self) -> Self {
        Matmul {
            trans_b: true,
            ..self
        }
    }

    /// Runs with `kernel`.
    pub fn kernel(self, kernel: MatmulKernel) -> Self {
        Matmul { kernel, ..self }
    }

    /// Floating-point operations of the product (`2 m n k`).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// The compiled tensor-parallel kernels of one rank's device (pipelines are built on first use
/// and kept). Every method checks its arguments, records the work and submits it without
/// waiting: the device's queue keeps it in order with the collectives that follow, and the next
/// read-back or [`finish`](Self::finish) waits for it.
///
/// ```no_run
/// # fn main() -> wccl::Result<()> {
/// use wccl::tp::{Kernels, Matmul};
/// let mut group = wccl::CommGroup::builder().ranks(1).build()?;
/// let comm = group.comm(0);
/// let a = comm.upload(&[1.0f32, 2.0, 3.0, 4.0])?; // 2 x 2
/// let b = comm.upload(&[5.0f32, 6.0, 7.0, 8.0])?; // 2 x 2
/// let c = comm.buffer::<f32>(4)?;
/// let mut kernels = Kernels::new(comm.device());
/// kernels.matmul(comm.device(), &Matmul::new(2, 2, 2), a.view(), b.view(), c.view())?;
/// assert_eq!(comm.download(&c)?, vec![19.0, 22.0, 43.0, 50.0]);
/// # Ok(()) }
/// ```
pub struct Kernels {
    matmul: MatmulKernels,
    elementwise: ElementwiseKernels,
}

impl std::fmt::Debug for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernels").finish_non_exhaustive()
    }
}

impl Kernels {
    /// Kernels for `dev`.
    pub fn new(dev: &RankDevice) -> Self {
        Kernels {
            matmul: MatmulKernels::new(dev, None),
            elementwise: ElementwiseKernels::new(dev),
        }
    }

    /// Kernels that treat the storage-binding limit as `bytes` (below the device's own), so that
    /// the row blocks large products need can be tested on small ones.
    pub fn with_binding_limit(dev: &RankDevice, bytes: u64) -> Self {
        Kernels {
            matmul: MatmulKernels::new(dev, Some(bytes)),
            elementwise: ElementwiseKernels::new(dev),
        }
    }

    /// `c = op(a) op(b)` with the shape and kernel in `spec`. The three views must have the same
    /// element type (f32; f16 where the device has `SHADER_F16`; bf16 on any device; the 16-bit
    /// types accumulate in f32) and
    /// exactly `m*k`, `k*n` and `m*n` elements; `c` may not share a buffer with `a` or `b`.
    pub fn matmul(
        &mut self,
        dev: &RankDevice,
        spec: &Matmul,
        a: TensorRef<'_>,
        b: TensorRef<'_>,
        c: TensorRef<'_>,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let at = At::rank(dev.rank());
        let bad = |message: String| Error::InvalidArgument {
            at,
            message: format!("matmul {}x{}x{}: {message}", spec.m, spec.n, spec.k),
        };
        let dtype = float_dtype(dev, at, "matmul", &[&a, &b, &c], true)?;
        // Checked: the shape is the caller's, and a wrapped product could match a small view.
        let product = |x: usize, y: usize| {
            x.checked_mul(y)
                .ok_or_else(|| bad(format!("{x} x {y} elements overflow")))
        };
        for (t, what, want) in [
            (&a, "a", product(spec.m, spec.k)?),
            (&b, "b", product(spec.k, spec.n)?),
            (&c, "c", product(spec.m, spec.n)?),
        ] {
            t.validate(at, what)?;
            if t.count != want {
                return Err(bad(format!(
                    "{what} has {} elements, the shape needs {want}",
                    t.count
                )));
            }
        }
        if c.buffer == a.buffer || c.buffer == b.buffer {
            return Err(bad(
                "c must be in a buffer of its own (not a's or b's)".into()
            ));
        }
        if spec.m == 0 || spec.n == 0 {
            return Ok(());
        }
        let mut enc = dev.device().create_command_encoder(&Default::default());
        if spec.k == 0 {
            // An empty sum: C = 0.
            if !c.offset.is_multiple_of(4) || !c.bytes().is_multiple_of(4) {
                return Err(bad(
                    "k = 0 needs c at a 4-byte boundary and of whole 4-byte words".into(),
                ));
            }
            if !c.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(bad(
                    "k = 0 clears c, whose buffer lacks COPY_DST usage".into()
                ));
            }
            enc.clear_buffer(c.buffer, c.offset, Some(c.bytes()));
            dev.queue().submit([enc.finish()]);
            return Ok(());
        }
        let call = MatmulCall {
            a: (a.buffer, a.offset),
            b: (b.buffer, b.offset),
            c: (c.buffer, c.offset),
            m: spec.m,
            n: spec.n,
            k: spec.k,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            dtype,
            kernel: self.resolve(spec),
        };
        let rows = self.matmul.rows_per_dispatch(&call).map_err(bad)?;
        self.matmul.encode(dev, &mut enc, &call, rows);
        dev.queue().submit([enc.finish()]);
        Ok(())
    }

    /// The kernel that runs `spec` on this device (what [`MatmulKernel::Auto`] stands for).
    pub fn resolve(&self, spec: &Matmul) -> MatmulKernel {
        spec.kernel
            .resolve(spec.m, spec.n, self.matmul.auto_min_tiles)
    }

    /// `out = gelu(x)` element-wise (the tanh form Megatron-LM uses); `out` may not share a
    /// buffer with `x`.
    pub fn gelu(&mut self, dev: &RankDevice, x: TensorRef<'_>, out: TensorRef<'_>) -> Result<()> {
        self.gelu_either(dev, x, None, out)
    }

    /// `dx = dy * gelu'(x)` element-wise: GELU's backward pass; `dx` may not share a buffer
    /// with `x` or `dy`.
    pub fn gelu_backward(
        &mut self,
        dev: &RankDevice,
        x: TensorRef<'_>,
        dy: TensorRef<'_>,
        dx: TensorRef<'_>,
    ) -> Result<()> {
        self.gelu_either(dev, x, Some(dy), dx)
    }

    fn gelu_either(
        &mut self,
        dev: &RankDevice,
        x: TensorRef<'_>,
        dy: Option<TensorRef<'_>>,
        out: TensorRef<'_>,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let at = At::rank(dev.rank());
        let what = if dy.is_some() {
            "gelu_backward"
        } else {
            "gelu"
        };
        let bad = |message: String| Error::InvalidArgument {
            at,
            message: format!("{what}: {message}"),
        };
        let mut all = vec![&x, &out];
        all.extend(dy.as_ref());
        let dtype = float_dtype(dev, at, what, &all, false)?;
        for t in &all {
            t.validate(at, what)?;
            if t.count != x.count {
                return Err(bad(format!(
                    "operands of {} and {} elements",
                    x.count, t.count
                )));
            }
        }
        if x.buffer == out.buffer || dy.is_some_and(|d| d.buffer == out.buffer) {
            return Err(bad("the output must be in a buffer of its own".into()));
        }
        if x.bytes() > self.elementwise.max_span()
            || x.count as u64 > self.elementwise.max_invocations()
        {
            return Err(bad(format!(
                "{} elements exceed one storage binding",
                x.count
            )));
        }
        if x.count == 0 {
            return Ok(());
        }
        let mut enc = dev.device().create_command_encoder(&Default::default());
        self.elementwise.encode_gelu(
            dev,
            &mut enc,
            dtype,
            (
                (x.buffer, x.offset),
                dy.map(|d| (d.buffer, d.offset)),
                (out.buffer, out.offset),
            ),
            x.count,
        );
        dev.queue().submit([enc.finish()]);
        Ok(())
    }

    /// Copies a `rows x cols` block: row `r` of it is `cols` elements at element
    /// `r * src_ld` of `src`, and goes to element `r * dst_ld` of `dst`. This is how a column
    /// shard is cut out of a full matrix, or put back into one. `dst` may not share a buffer
    /// with `src`.
    #[allow(clippy::too_many_arguments)]
    pub fn copy_columns(
        &mut self,
        dev: &RankDevice,
        src: TensorRef<'_>,
        src_ld: usize,
        dst: TensorRef<'_>,
        dst_ld: usize,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let at = At::rank(dev.rank());
        let bad = |message: String| Error::InvalidArgument {
            at,
            message: format!("copy_columns: {message}"),
        };
        let dtype = float_dtype(dev, at, "copy_columns", &[&src, &dst], false)?;
        src.validate(at, "copy_columns src")?;
        dst.validate(at, "copy_columns dst")?;
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        for (t, what, ld) in [(&src, "src", src_ld), (&dst, "dst", dst_ld)] {
            // Checked: rows, stride and columns are the caller's.
            let span = (rows - 1).checked_mul(ld).and_then(|s| s.checked_add(cols));
            let Some(span) = span.filter(|&s| ld >= cols && s <= t.count) else {
                let need = span.map_or_else(|| "overflowing".to_string(), |s| s.to_string());
                return Err(bad(format!(
                    "{rows} rows of {cols} with row stride {ld} need {need} elements; {what} has {}",
                    t.count
                )));
            };
            // `span <= t.count`, and the view's byte size was validated: no overflow.
            if (span * dtype.size()) as u64 > self.elementwise.max_span() {
                return Err(bad(format!("{what} spans more than one storage binding")));
            }
        }
        if src.buffer == dst.buffer {
            return Err(bad("dst must be in a buffer of its own".into()));
        }
        let mut enc = dev.device().create_command_encoder(&Default::default());
        self.elementwise.encode_copy_columns(
            dev,
            &mut enc,
            dtype,
            (src.buffer, src.offset, src_ld),
            (dst.buffer, dst.offset, dst_ld),
            rows,
            cols,
        );
        dev.queue().submit([enc.finish()]);
        Ok(())
    }

    /// Blocks until everything submitted to `dev` has finished (at most `timeout`), and reports
    /// any device error. For timing; reads and collectives wait on their own.
    pub fn finish(&self, dev: &RankDevice, timeout: Duration) -> Result<()> {
        // No scope here: the kernels' own scopes ended when they were recorded and submitted, so
        // the wait and the check below see their errors.
        let at = At::rank(dev.rank());
        let idx = dev.queue().submit([]);
        dev.wait_submission(&idx, crate::deadline::deadline_after(timeout))
            .map_err(|e| crate::device::wait_error(at, e))?;
        dev.check(at)
    }
}

/// The common element type of `views`, which must be f32, f16 on a device with native f16, or
/// (where `bf16` says the kernel reads and writes it, two to a word) bf16.
fn float_dtype(
    dev: &RankDevice,
    at: At,
    what: &str,
    views: &[&TensorRef<'_>],
    bf16: bool,
) -> Result<DType> {
    let dtype = views[0].dtype;
    if let Some(other) = views.iter().find(|t| t.dtype != dtype) {
        return Err(Error::InvalidArgument {
            at,
            message: format!("{what}: operands of {dtype} and {}", other.dtype),
        });
    }
    let ok = matches!(dtype, DType::F32 | DType::F16) || (bf16 && dtype == DType::BF16);
    if !ok {
        let types = if bf16 {
            "float, half and bfloat16 are"
        } else {
            "float and half are"
        };
        return Err(Error::InvalidArgument {
            at,
            message: format!("{what}: {dtype} is not supported ({types})"),
        });
    }
    dev.check_native(at, dtype)?;
    Ok(dtype)
}
