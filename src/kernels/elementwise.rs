//! The tensor-parallel element-wise kernels (`shaders/elementwise.wgsl`): GELU forward and
//! backward, and a strided copy of a block of columns.

use std::collections::HashMap;
use std::num::NonZeroU64;

use wgpu::util::DeviceExt;
use wgpu::{Buffer, CommandEncoder, ComputePipeline};

use crate::device::RankDevice;
use crate::types::DType;

const SOURCE: &str = include_str!("../../shaders/elementwise.wgsl");
const WORKGROUP: u32 = 256;

/// Which element-wise kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Elementwise {
    /// `out = gelu(x)`.
    Gelu,
    /// `out = dy * gelu'(x)`.
    GeluBackward,
    /// `out[r, j] = x[r, j]` over a block of rows and columns.
    CopyColumns,
}

impl Elementwise {
    const fn entry_point(self) -> &'static str {
        match self {
            Elementwise::Gelu => "gelu_main",
            Elementwise::GeluBackward => "gelu_backward_main",
            Elementwise::CopyColumns => "copy_columns_main",
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    rows: u32,
    groups_x: u32,
    x_off: u32,
    y_off: u32,
    out_off: u32,
    x_ld: u32,
    out_ld: u32,
}

/// A vector operand: buffer, byte offset of its first element.
pub(crate) type Vector<'a> = (&'a Buffer, u64);

/// A matrix operand: buffer, byte offset of its first element, row stride in elements.
pub(crate) type Operand<'a> = (&'a Buffer, u64, usize);

/// Element-wise pipelines of one device.
pub(crate) struct ElementwiseKernels {
    pipelines: HashMap<(DType, Elementwise), ComputePipeline>,
    offset_align: u64,
    max_binding: u64,
    max_groups: u32,
}

impl ElementwiseKernels {
    pub(crate) fn new(dev: &RankDevice) -> Self {
        let limits = dev.limits();
        ElementwiseKernels {
            pipelines: HashMap::new(),
            offset_align: limits.min_storage_buffer_offset_alignment.max(4) as u64,
            max_binding: limits.max_storage_buffer_binding_size.min(u32::MAX as u64),
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
        }
    }

    /// The most bytes one operand of a dispatch may span, whatever its offset.
    pub(crate) fn max_span(&self) -> u64 {
        self.max_binding.saturating_sub(self.offset_align + 4)
    }

    /// The most elements one dispatch may cover (the grid's limit).
    pub(crate) fn max_invocations(&self) -> u64 {
        self.max_groups as u64 * self.max_groups as u64 * WORKGROUP as u64
    }

    fn pipeline(&mut self, dev: &RankDevice, dtype: DType, which: Elementwise) -> ComputePipeline {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        self.pipelines
            .entry((dtype, which))
            .or_insert_with(|| {
                let mut source = SOURCE.replace("ELEM", dtype.wgsl());
                if dtype == DType::F16 {
                    source = format!("enable f16;\n{source}");
                }
                let module = dev
                    .device()
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some("wccl elementwise.wgsl"),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    });
                dev.device()
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some("wccl elementwise"),
                        layout: None,
                        module: &module,
                        entry_point: Some(which.entry_point()),
                        compilation_options: Default::default(),
                        cache: None,
                    })
            })
            .clone()
    }

    /// Records `out = gelu(x)` (`dy: None`) or `out = dy * gelu'(x)` over `count` elements.
    /// Operands are (buffer, byte offset); the caller has checked that each spans at most
    /// [`max_span`](Self::max_span) bytes and that `out` shares no buffer with an input.
    pub(crate) fn encode_gelu(
        &mut self,
        dev: &RankDevice,
        enc: &mut CommandEncoder,
        dtype: DType,
        (x, dy, out): (Vector<'_>, Option<Vector<'_>>, Vector<'_>),
        count: usize,
    ) {
        let which = if dy.is_some() {
            Elementwise::GeluBackward
        } else {
            Elementwise::Gelu
        };
        let bytes = (count * dtype.size()) as u64;
        let mut operands = vec![(0, x.0, x.1, bytes), (1, out.0, out.1, bytes)];
        if let Some(dy) = dy {
            operands.push((3, dy.0, dy.1, bytes));
        }
        self.dispatch(dev, enc, dtype, which, &operands, count as u32, 1, (0, 0));
    }

    /// Records the copy of a `rows` x `cols` block from `src` to `dst` (row strides in the
    /// operands). Same preconditions as [`encode_gelu`](Self::encode_gelu).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_copy_columns(
        &mut self,
        dev: &RankDevice,
        enc: &mut CommandEncoder,
        dtype: DType,
        src: Operand<'_>,
        dst: Operand<'_>,
        rows: usize,
        cols: usize,
    ) {
        if rows == 0 || cols == 0 {
            return;
        }
        let es = dtype.size() as u64;
        let span = |ld: usize| (((rows - 1) * ld + cols) as u64) * es;
        let operands = [
            (0, src.0, src.1, span(src.2)),
            (1, dst.0, dst.1, span(dst.2)),
        ];
        self.dispatch(
            dev,
            enc,
            dtype,
            Elementwise::CopyColumns,
            &operands,
            cols as u32,
            rows as u32,
            (src.2 as u32, dst.2 as u32),
        );
    }

    /// One dispatch over `count * rows` invocations; `operands` are (binding, buffer, byte offset,
    /// bytes spanned), in the order x, out, dy.
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &mut self,
        dev: &RankDevice,
        enc: &mut CommandEncoder,
        dtype: DType,
        which: Elementwise,
        operands: &[(u32, &Buffer, u64, u64)],
        count: u32,
        rows: u32,
        (x_ld, out_ld): (u32, u32),
    ) {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let total = count as u64 * rows as u64;
        if total == 0 {
            return;
        }
        let es = dtype.size() as u64;
        let groups = total.div_ceil(WORKGROUP as u64) as u32;
        let groups_x = groups.min(self.max_groups);
        let mut params = Params {
            count,
            rows,
            groups_x,
            x_off: 0,
            y_off: 0,
            out_off: 0,
            x_ld,
            out_ld,
        };
        let mut windows = Vec::with_capacity(operands.len());
        for &(binding, buffer, offset, bytes) in operands {
            let start = offset - offset % self.offset_align;
            let rel = offset - start;
            let elements = (rel / es) as u32;
            match binding {
                0 => params.x_off = elements,
                1 => params.out_off = elements,
                _ => params.y_off = elements,
            }
            windows.push((binding, buffer, start, (rel + bytes).next_multiple_of(4)));
        }
        let uniform = dev
            .device()
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("wccl elementwise params"),
                contents: bytemuck::bytes_of(&params),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let pipeline = self.pipeline(dev, dtype, which);
        let mut entries: Vec<_> = windows
            .iter()
            .map(|&(binding, buffer, offset, size)| wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset,
                    size: NonZeroU64::new(size),
                }),
            })
            .collect();
        entries.push(wgpu::BindGroupEntry {
            binding: 2,
            resource: uniform.as_entire_binding(),
        });
        let bind_group = dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("wccl elementwise"),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind_group, &[]);
        pass.dispatch_workgroups(groups_x, groups.div_ceil(groups_x), 1);
    }
}
