//! The element-wise reduce kernels (`shaders/reduce.wgsl`, and `shaders/reduce_packed.wgsl` for
//! f16 and bf16 held two to a u32 word): one pipeline per element type and operator, built on
//! first use, dispatched in pieces that respect the storage-binding limit.

use std::collections::HashMap;
use std::num::NonZeroU64;

use wgpu::{
    BindGroupLayout, Buffer, BufferUsages, CommandEncoder, ComputePipeline, PipelineLayout,
    SubmissionIndex,
};

use crate::device::RankDevice;
use crate::types::{Combine, DType};

const SOURCE: &str = include_str!("../../shaders/reduce.wgsl");
const PACKED_SOURCE: &str = include_str!("../../shaders/reduce_packed.wgsl");
const WORKGROUP: u32 = 256;
/// Elements per invocation: the `PER_THREAD` override of reduce.wgsl and reduce_packed.wgsl,
/// always set from here (the dispatch size depends on it), so this constant is the one source.
const PER_THREAD: u32 = 4;
/// Bytes between two parameter blocks in the uniform buffer (the largest offset alignment).
const PARAM_STRIDE: u64 = 256;
/// Dispatches one submission may hold.
const PARAM_SLOTS: u64 = 256;

/// What a dispatch computes on each element of `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum KernelOp {
    /// `dst = combine(dst, src)`.
    Combine(Combine),
    /// `dst = dst / divisor` (avg's last step).
    Scale(u32),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    dst_offset: u32,
    src_offset: u32,
    count: u32,
    groups_x: u32,
    divisor: u32,
    _pad: [u32; 3],
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Entry {
    Combine(Combine),
    Scale,
}

/// Pipelines and per-dispatch parameters of the reduce kernels on one device.
pub(crate) struct ReduceKernels {
    combine_layout: BindGroupLayout,
    scale_layout: BindGroupLayout,
    combine_pipeline_layout: PipelineLayout,
    scale_pipeline_layout: PipelineLayout,
    pipelines: HashMap<(DType, Entry), ComputePipeline>,
    params: Buffer,
    pending: Vec<u8>,
    offset_align: u64,
    max_binding: u64,
    max_groups: u32,
}

/// The `FORMAT` of reduce_packed.wgsl for the 16-bit types, which it holds two to a u32 word;
/// `None` for the 32-bit ones (reduce.wgsl). f16 is packed on devices with `SHADER_F16` too: on
/// lavapipe the packed kernel measured about 25% faster than native f16 (tests/half.rs history).
fn packed_format(dtype: DType) -> Option<u32> {
    match dtype {
        DType::F16 => Some(0),
        DType::BF16 => Some(1),
        _ => None,
    }
}

impl ReduceKernels {
    /// Prepares layouts and the parameter buffer; pipelines are compiled when first used.
    /// `max_binding` caps the storage binding size below the device's own limit (tests use it
    /// to exercise chunking on small buffers).
    pub(crate) fn new(dev: &RankDevice, max_binding: Option<u64>) -> Self {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let limits = dev.limits();
        let device = dev.device();
        let storage = |binding, read_only| wgpu::BindGroupLayoutEntry {
            binding,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let uniform = wgpu::BindGroupLayoutEntry {
            binding: 1,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        };
        let combine_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wccl combine"),
            entries: &[storage(0, false), uniform, storage(2, true)],
        });
        let scale_layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("wccl scale"),
            entries: &[storage(0, false), uniform],
        });
        let pipeline_layout = |bgl: &BindGroupLayout| {
            device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: None,
                bind_group_layouts: &[Some(bgl)],
                immediate_size: 0,
            })
        };
        let combine_pipeline_layout = pipeline_layout(&combine_layout);
        let scale_pipeline_layout = pipeline_layout(&scale_layout);
        let params = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("wccl reduce params"),
            size: PARAM_STRIDE * PARAM_SLOTS,
            usage: BufferUsages::UNIFORM | BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let device_max = limits.max_storage_buffer_binding_size.min(u32::MAX as u64);
        ReduceKernels {
            combine_layout,
            scale_layout,
            combine_pipeline_layout,
            scale_pipeline_layout,
            pipelines: HashMap::new(),
            params,
            pending: Vec::new(),
            offset_align: limits.min_storage_buffer_offset_alignment.max(4) as u64,
            max_binding: max_binding.map_or(device_max, |m| m.min(device_max)),
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
        }
    }

    /// The most elements of `dtype` one dispatch may cover, whatever the offset.
    pub(crate) fn max_elements(&self, dtype: DType) -> usize {
        let usable = self.max_binding.saturating_sub(self.offset_align + 4);
        ((usable / dtype.size() as u64) as usize).max(1)
    }

    /// The most elements one submission may cover (its dispatches share the parameter buffer).
    pub(crate) fn max_elements_per_submit(&self, dtype: DType) -> usize {
        self.max_elements(dtype)
            .saturating_mul(PARAM_SLOTS as usize / 2)
    }

    fn pipeline(&mut self, dev: &RankDevice, dtype: DType, entry: Entry) -> &ComputePipeline {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let key = (dtype, entry);
        if !self.pipelines.contains_key(&key) {
            let format = packed_format(dtype);
            let source = match format {
                Some(_) => PACKED_SOURCE.to_string(),
                None => SOURCE.replace("ELEM", dtype.wgsl()),
            };
            let desc = wgpu::ShaderModuleDescriptor {
                label: Some("wccl reduce.wgsl"),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            };
            // SAFETY: every access in reduce.wgsl is `offset + i` with `i < count`, and
            // `encode` binds windows that cover `[offset, offset + count)` of each buffer (it
            // computes the binding sizes from the same offset and count it writes into the
            // parameters), so the bounds checks wgpu would add can never fire. reduce_packed.wgsl
            // reads and writes only the words holding a half of `[offset, offset + count)`, and
            // the windows, rounded out to whole words, hold those words. Dropping them
            // lets the compiler vectorise the loop on software adapters.
            let module = unsafe {
                dev.device()
                    .create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked())
            };
            let (layout, entry_point, op) = match entry {
                Entry::Combine(c) => (
                    &self.combine_pipeline_layout,
                    "combine_main",
                    c.shader_code(),
                ),
                Entry::Scale => (&self.scale_pipeline_layout, "scale_main", 0),
            };
            let mut constants = vec![
                ("OP", op as f64),
                ("WORKGROUP", WORKGROUP as f64),
                ("PER_THREAD", PER_THREAD as f64),
            ];
            if let Some(format) = format {
                constants.push(("FORMAT", format as f64));
            }
            let pipeline = dev
                .device()
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some("wccl reduce"),
                    layout: Some(layout),
                    module: &module,
                    entry_point: Some(entry_point),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                });
            self.pipelines.insert(key, pipeline);
        }
        &self.pipelines[&key]
    }

    /// Records `op` over `count` elements of `dtype` at byte `dst_offset` of `dst` (and, for a
    /// combine, at byte `src.1` of `src.0`) into `enc`, in as many dispatches as the binding limit
    /// needs. `dst` and `src` must be different buffers. Submit with [`submit`](Self::submit).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode(
        &mut self,
        dev: &RankDevice,
        enc: &mut CommandEncoder,
        op: KernelOp,
        dtype: DType,
        dst: (&Buffer, u64),
        src: Option<(&Buffer, u64)>,
        count: usize,
    ) {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let es = dtype.size() as u64;
        let per = self.max_elements(dtype);
        let mut done = 0usize;
        while done < count {
            let n = per.min(count - done);
            let d_off = dst.1 + done as u64 * es;
            let (d_bind, d_rel) = self.binding_window(d_off);
            let d_size = (d_rel + n as u64 * es).next_multiple_of(4);
            // Packed halves: one invocation per word the range touches, a partial one included.
            let items = match packed_format(dtype) {
                Some(_) => ((d_rel / es) % 2 + n as u64).div_ceil(2) as u32,
                None => n as u32,
            };
            let groups = items.div_ceil(WORKGROUP * PER_THREAD);
            let groups_x = groups.min(self.max_groups);
            let groups_y = groups.div_ceil(groups_x);
            let mut params = Params {
                dst_offset: (d_rel / es) as u32,
                src_offset: 0,
                count: n as u32,
                groups_x,
                divisor: 1,
                _pad: [0; 3],
            };
            let slot = (self.pending.len() as u64) / PARAM_STRIDE;
            let param_binding = wgpu::BufferBinding {
                buffer: &self.params,
                offset: (slot % PARAM_SLOTS) * PARAM_STRIDE,
                size: NonZeroU64::new(std::mem::size_of::<Params>() as u64),
            };
            let dst_binding = wgpu::BufferBinding {
                buffer: dst.0,
                offset: d_bind,
                size: NonZeroU64::new(d_size),
            };
            let (entry, bind_group) = match (op, src) {
                (KernelOp::Combine(c), Some(src)) => {
                    let s_off = src.1 + done as u64 * es;
                    let (s_bind, s_rel) = self.binding_window(s_off);
                    let s_size = (s_rel + n as u64 * es).next_multiple_of(4);
                    params.src_offset = (s_rel / es) as u32;
                    let bg = dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &self.combine_layout,
                        entries: &[
                            wgpu::BindGroupEntry {
                                binding: 0,
                                resource: wgpu::BindingResource::Buffer(dst_binding),
                            },
                            wgpu::BindGroupEntry {
                                binding: 1,
                                resource: wgpu::BindingResource::Buffer(param_binding),
                            },
                            wgpu::BindGroupEntry {
                                binding: 2,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer: src.0,
                                    offset: s_bind,
                                    size: NonZeroU64::new(s_size),
                                }),
                            },
                        ],
                    });
                    (Entry::Combine(c), bg)
                }
                (KernelOp::Scale(_), _) | (KernelOp::Combine(_), None) => {
                    params.divisor = if let KernelOp::Scale(d) = op { d } else { 1 };
                    let bg = dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
                        label: None,
                        layout: &self.scale_layout,
                        entries: &[
                            wgpu::BindGroupEntry {
                                binding: 0,
                                resource: wgpu::BindingResource::Buffer(dst_binding),
                            },
                            wgpu::BindGroupEntry {
                                binding: 1,
                                resource: wgpu::BindingResource::Buffer(param_binding),
                            },
                        ],
                    });
                    (Entry::Scale, bg)
                }
            };
            let mut block = bytemuck::bytes_of(&params).to_vec();
            block.resize(PARAM_STRIDE as usize, 0);
            self.pending.extend_from_slice(&block);
            let pipeline = self.pipeline(dev, dtype, entry);
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("wccl reduce"),
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups_x, groups_y, 1);
            drop(pass);
            done += n;
        }
    }

    /// Writes the parameters of the dispatches recorded since the last submit, then submits.
    pub(crate) fn submit(&mut self, dev: &RankDevice, enc: CommandEncoder) -> SubmissionIndex {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        if !self.pending.is_empty() {
            dev.queue().write_buffer(&self.params, 0, &self.pending);
            self.pending.clear();
        }
        dev.queue().submit([enc.finish()])
    }

    /// The aligned binding start at or below `offset`, and `offset`'s distance from it.
    fn binding_window(&self, offset: u64) -> (u64, u64) {
        let start = offset - offset % self.offset_align;
        (start, offset - start)
    }
}
