//! The matmul kernels (`shaders/matmul.wgsl`): one pipeline per (element type, kernel,
//! transposes), built on first use; products too large for one binding are cut into row blocks.

use std::collections::HashMap;
use std::num::NonZeroU64;

use wgpu::util::DeviceExt;
use wgpu::{Buffer, CommandEncoder, ComputePipeline};

use crate::device::RankDevice;
use crate::types::DType;

const SOURCE: &str = include_str!("../../shaders/matmul.wgsl");

/// matmul.wgsl's bindings and accessors for f32 and f16 (ELEM replaced by the type).
const PRELUDE_NATIVE: &str = "
@group(0) @binding(0) var<storage, read> a: array<ELEM>;
@group(0) @binding(1) var<storage, read> b: array<ELEM>;
@group(0) @binding(2) var<storage, read_write> c: array<ELEM>;
fn read_a(i: u32) -> f32 { return f32(a[i]); }
fn read_b(i: u32) -> f32 { return f32(b[i]); }
fn write_c(i: u32, v: f32) { c[i] = ELEM(v); }
";

/// matmul.wgsl's bindings and accessors for bf16, two to a u32 word: element i is the upper half
/// of an f32 in bits 16 * (i % 2) of word i / 2. Two invocations may write the two halves of one
/// word of C: each clears and sets only its own 16 bits with atomics, which commute with the
/// neighbour's on the other bits. Rounding to bf16 is to nearest, ties to even (a NaN stays NaN).
const PRELUDE_BF16: &str = "
@group(0) @binding(0) var<storage, read> a: array<u32>;
@group(0) @binding(1) var<storage, read> b: array<u32>;
@group(0) @binding(2) var<storage, read_write> c: array<atomic<u32>>;
fn bf16_half(w: u32, i: u32) -> f32 {
    return bitcast<f32>(((w >> ((i & 1u) * 16u)) & 0xffffu) << 16u);
}
fn read_a(i: u32) -> f32 { return bf16_half(a[i >> 1u], i); }
fn read_b(i: u32) -> f32 { return bf16_half(b[i >> 1u], i); }
fn to_bf16(x: f32) -> u32 {
    let bits = bitcast<u32>(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bits >> 16u) | 0x40u;
    }
    return (bits + 0x7fffu + ((bits >> 16u) & 1u)) >> 16u;
}
fn write_c(i: u32, v: f32) {
    let shift = (i & 1u) * 16u;
    atomicAnd(&c[i >> 1u], ~(0xffffu << shift));
    atomicOr(&c[i >> 1u], to_bf16(v) << shift);
}
";

/// Which matmul kernel runs a product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// One output per invocation, read straight from global memory: the reference and baseline.
    Plain,
    /// 64 x 64 tiles of C per workgroup, staged through workgroup memory, 4 x 4 outputs per
    /// invocation with vec4 arithmetic.
    Tiled,
    /// 128 x 128 tiles, 8 x 8 outputs per invocation: twice the arithmetic per workgroup-memory
    /// load, for large products (16 KiB of workgroup memory).
    TiledLarge,
    /// The default: `TiledLarge` where the product has enough 128 x 128 tiles to keep the
    /// device busy, `Tiled` otherwise (see [`MatmulKernel::resolve`]).
    #[default]
    Auto,
}

impl MatmulKernel {
    /// The kernel `Auto` stands for on an `m x n` product: `TiledLarge` when the product has
    /// at least `min_tiles` whole 128 x 128 tiles, else `Tiled`. `min_tiles` is 1 on CPU
    /// adapters (a handful of cores, where the larger block always paid: 1.7x at 512^3 on
    /// lavapipe) and 256 on GPUs (two large workgroups for each of an H100's 132 SMs, below
    /// which the 64 x 64 kernel's four times as many workgroups fill the GPU better). Other
    /// kernels stand for themselves.
    pub fn resolve(self, m: usize, n: usize, min_tiles: usize) -> MatmulKernel {
        match self {
            MatmulKernel::Auto if (m / 128) * (n / 128) >= min_tiles.max(1) => {
                MatmulKernel::TiledLarge
            }
            MatmulKernel::Auto => MatmulKernel::Tiled,
            other => other,
        }
    }

    /// Rows and columns of C that one workgroup covers.
    const fn tile(self) -> u32 {
        match self {
            MatmulKernel::Plain => 16,
            MatmulKernel::Tiled | MatmulKernel::Auto => 64,
            MatmulKernel::TiledLarge => 128,
        }
    }

    const fn entry_point(self) -> &'static str {
        match self {
            MatmulKernel::Plain => "plain_main",
            MatmulKernel::Tiled | MatmulKernel::Auto => "tiled_main",
            MatmulKernel::TiledLarge => "tiled_large_main",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    a_ld: u32,
    _pad: u32,
}

/// One product `C = op(A) op(B)` to encode; offsets in bytes. The caller has checked the shapes
/// against the buffers and [`MatmulKernels::rows_per_dispatch`].
pub(crate) struct MatmulCall<'a> {
    pub a: (&'a Buffer, u64),
    pub b: (&'a Buffer, u64),
    pub c: (&'a Buffer, u64),
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    pub dtype: DType,
    pub kernel: MatmulKernel,
}

type Key = (DType, MatmulKernel, bool, bool);

/// Matmul pipelines of one device.
pub(crate) struct MatmulKernels {
    pipelines: HashMap<Key, ComputePipeline>,
    /// `Auto`'s threshold on this device (see [`MatmulKernel::resolve`]).
    pub(crate) auto_min_tiles: usize,
    offset_align: u64,
    max_binding: u64,
    max_groups: u32,
}

impl MatmulKernels {
    /// `max_binding` caps the storage binding size below the device's own limit (tests use it to
    /// exercise the row blocks on small matrices).
    pub(crate) fn new(dev: &RankDevice, max_binding: Option<u64>) -> Self {
        let limits = dev.limits();
        let device_max = limits.max_storage_buffer_binding_size.min(u32::MAX as u64);
        let cpu = dev.info().device_type == wgpu::DeviceType::Cpu;
        MatmulKernels {
            pipelines: HashMap::new(),
            auto_min_tiles: if cpu { 1 } else { 256 },
            offset_align: limits.min_storage_buffer_offset_alignment.max(4) as u64,
            max_binding: max_binding.map_or(device_max, |m| m.min(device_max)),
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
        }
    }

    /// How many rows of C one dispatch may cover, or why the product cannot run at all. Row blocks
    /// need contiguous rows of A, so a transposed A must fit one binding whole, and so must B.
    pub(crate) fn rows_per_dispatch(&self, call: &MatmulCall<'_>) -> Result<usize, String> {
        let es = call.dtype.size() as u64;
        let usable = self.max_binding.saturating_sub(self.offset_align + 4);
        let (m, n, k) = (call.m as u64, call.n as u64, call.k as u64);
        let tile = call.kernel.tile() as u64;
        if n.div_ceil(tile) > self.max_groups as u64 {
            return Err(format!(
                "n = {n} needs more than {} workgroups across",
                self.max_groups
            ));
        }
        if k * n * es > usable {
            return Err(format!(
                "B ({k} x {n} {}) is larger than one storage binding ({} bytes)",
                call.dtype, self.max_binding
            ));
        }
        if call.trans_a && m * k * es > usable {
            return Err(format!(
                "a transposed A ({k} x {m} {}) must fit one storage binding ({} bytes)",
                call.dtype, self.max_binding
            ));
        }
        let row_bytes = if call.trans_a { n * es } else { k.max(n) * es };
        let mut rows = (usable / row_bytes.max(1)).min(m.max(1));
        rows = rows.min(self.max_groups as u64 * tile);
        if rows < m {
            // Whole tiles per block, so every block but the last is full.
            rows -= rows % tile;
        }
        if rows == 0 {
            return Err(format!(
                "one row of the product ({} bytes) does not fit a storage binding ({} bytes)",
                row_bytes, self.max_binding
            ));
        }
        Ok(rows as usize)
    }

    fn pipeline(&mut self, dev: &RankDevice, key: Key) -> &ComputePipeline {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        self.pipelines.entry(key).or_insert_with(|| {
            let (dtype, kernel, trans_a, trans_b) = key;
            let source = match dtype {
                DType::BF16 => format!("{PRELUDE_BF16}{SOURCE}"),
                DType::F16 => {
                    format!("enable f16;\n{PRELUDE_NATIVE}{SOURCE}").replace("ELEM", "f16")
                }
                _ => format!("{PRELUDE_NATIVE}{SOURCE}").replace("ELEM", dtype.wgsl()),
            };
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some("wccl matmul.wgsl"),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            // SAFETY: every global access in matmul.wgsl is guarded by `row < m`, `col < n`,
            // `i < k` against the parameters, and `encode` binds windows that hold
            // `offset + m*k`, `offset + k*n` and `offset + m*n` elements for exactly those
            // parameters (it computes both from the same numbers); a transposed A's row block
            // reads rows below `row + rows <= m` of a binding holding all m*k. Workgroup and
            // private array indices run over loops bounded by the same constants that size the
            // arrays. So the bounds checks wgpu would add cannot fire. For bf16 the windows, rounded
            // out to whole words, hold the word of every element index they hold.
            let module = unsafe {
                dev.device()
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            };
            let constants = [
                ("TRANS_A", f64::from(u8::from(trans_a))),
                ("TRANS_B", f64::from(u8::from(trans_b))),
            ];
            dev.device()
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("wccl matmul"),
                    layout: None,
                    module: &module,
                    entry_point: Some(kernel.entry_point()),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
        })
    }

    /// Records the product into `enc`, one dispatch per row block.
    pub(crate) fn encode(
        &mut self,
        dev: &RankDevice,
        enc: &mut CommandEncoder,
        call: &MatmulCall<'_>,
        rows_per_dispatch: usize,
    ) {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let es = call.dtype.size() as u64;
        let key = (call.dtype, call.kernel, call.trans_a, call.trans_b);
        let tile = call.kernel.tile();
        let mut row = 0usize;
        while row < call.m {
            let rows = rows_per_dispatch.min(call.m - row);
            // A transposed A is bound whole; otherwise the block's rows of A. C: the block's rows.
            let (a_start, a_len) = if call.trans_a {
                (call.a.1, (call.m * call.k) as u64 * es)
            } else {
                (
                    call.a.1 + (row * call.k) as u64 * es,
                    (rows * call.k) as u64 * es,
                )
            };
            let c_start = call.c.1 + (row * call.n) as u64 * es;
            let (a_bind, a_rel) = self.window(a_start);
            let (b_bind, b_rel) = self.window(call.b.1);
            let (c_bind, c_rel) = self.window(c_start);
            let params = Params {
                m: rows as u32,
                n: call.n as u32,
                k: call.k as u32,
                a_off: (a_rel / es) as u32,
                b_off: (b_rel / es) as u32,
                c_off: (c_rel / es) as u32,
                a_ld: call.k as u32,
                _pad: 0,
            };
            // A transposed A is bound whole and its block starts `row` columns in, with the full
            // row stride m (the shader indexes col * a_ld + row).
            let params = if call.trans_a {
                Params {
                    a_off: params.a_off + row as u32,
                    a_ld: call.m as u32,
                    ..params
                }
            } else {
                params
            };
            let uniform = dev
                .device()
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("wccl matmul params"),
                    contents: bytemuck::bytes_of(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let b_len = (call.k * call.n) as u64 * es;
            let c_len = (rows * call.n) as u64 * es;
            let windows = [
                (call.a.0, a_bind, a_rel, a_len),
                (call.b.0, b_bind, b_rel, b_len),
                (call.c.0, c_bind, c_rel, c_len),
            ];
            let mut entries: Vec<_> = windows
                .iter()
                .zip(0u32..)
                .map(
                    |(&(buffer, start, rel, len), binding)| wgpu::BindGroupEntry {
                        binding,
                        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer,
                            offset: start,
                            size: NonZeroU64::new((rel + len).next_multiple_of(4).max(4)),
                        }),
                    },
                )
                .collect();
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: uniform.as_entire_binding(),
            });
            let pipeline = self.pipeline(dev, key).clone();
            let bind_group = dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("wccl matmul"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(
                (call.n as u32).div_ceil(tile),
                (rows as u32).div_ceil(tile),
                1,
            );
            drop(pass);
            row += rows;
        }
    }

    /// The aligned binding start at or below `offset`, and `offset`'s distance from it.
    fn window(&self, offset: u64) -> (u64, u64) {
        let start = offset - offset % self.offset_align;
        (start, offset - start)
    }
}
