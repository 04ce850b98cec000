//! The parameter server's update kernel (`shaders/update.wgsl`) with a pluggable rule.

use std::num::NonZeroU64;

use wgpu::{Buffer, BufferUsages, ComputePipeline};

use crate::device::RankDevice;

const SOURCE: &str = include_str!("../../shaders/update.wgsl");
const WORKGROUP: u32 = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    groups_x: u32,
    scale: f32,
    _pad: u32,
    hyper: [f32; 4],
}

/// One compiled update rule on one device.
pub(crate) struct UpdateKernel {
    pipeline: ComputePipeline,
    params: Buffer,
    max_groups: u32,
    max_binding: u64,
}

impl UpdateKernel {
    /// Compiles the update kernel with `rule_wgsl`, which must define
    /// `fn update(w: f32, m: f32, g: f32, hyper: vec4<f32>) -> vec2<f32>`.
    pub(crate) fn new(dev: &RankDevice, rule_wgsl: &str) -> Self {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let module = dev
            .device()
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("wccl update.wgsl"),
                source: wgpu::ShaderSource::Wgsl(
                    SOURCE.replace("/*UPDATE_RULE*/", rule_wgsl).into(),
                ),
            });
        let pipeline = dev
            .device()
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some("wccl update"),
                layout: None,
                module: &module,
                entry_point: Some("update_main"),
                compilation_options: Default::default(),
                cache: None,
            });
        let params = dev.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wccl update params"),
            size: std::mem::size_of::<Params>() as u64,
            usage: BufferUsages::UNIFORM | BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let limits = dev.limits();
        UpdateKernel {
            pipeline,
            params,
            max_groups: limits.max_compute_workgroups_per_dimension.max(1),
            max_binding: limits.max_storage_buffer_binding_size,
        }
    }

    /// The largest tensor (elements) one update may cover.
    pub(crate) fn max_elements(&self) -> usize {
        (self.max_binding / 4) as usize
    }

    /// Applies the rule to `count` elements of `w`, `m` (momentum or other state) and `acc` (the
    /// summed gradients, zeroed on the way), scaling the gradient by `scale`. Submits; returns
    /// the submission.
    pub(crate) fn apply(
        &self,
        dev: &RankDevice,
        (w, m, acc): (&Buffer, &Buffer, &Buffer),
        count: usize,
        scale: f32,
        hyper: [f32; 4],
    ) -> wgpu::SubmissionIndex {
        // Errors of this device work reach the rank's error store when the scope ends.
        let _scope = dev.error_scope();
        let groups = (count as u32).div_ceil(WORKGROUP).max(1);
        let groups_x = groups.min(self.max_groups);
        let p = Params {
            count: count as u32,
            groups_x,
            scale,
            _pad: 0,
            hyper,
        };
        dev.queue()
            .write_buffer(&self.params, 0, bytemuck::bytes_of(&p));
        let size = NonZeroU64::new((count as u64 * 4).max(4));
        fn entry(
            binding: u32,
            buffer: &Buffer,
            size: Option<NonZeroU64>,
        ) -> wgpu::BindGroupEntry<'_> {
            wgpu::BindGroupEntry {
                binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset: 0,
                    size,
                }),
            }
        }
        let bind_group = dev.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &self.pipeline.get_bind_group_layout(0),
            entries: &[
                entry(0, w, size),
                entry(1, m, size),
                entry(2, acc, size),
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: self.params.as_entire_binding(),
                },
            ],
        });
        let mut enc = dev.device().create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups_x, groups.div_ceil(groups_x), 1);
        }
        dev.queue().submit([enc.finish()])
    }
}
