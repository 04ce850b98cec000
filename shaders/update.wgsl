// A parameter server's update: for each element, with the shard's summed gradient in `acc`,
//   g = acc * scale;  acc = 0;  (w, m) = update(w, m, g, hyper)
// The host puts the update rule's WGSL `update` function on the line below the marker (see
// `wccl::ps::UpdateRule`). f32 parameters.

/*UPDATE_RULE*/

override WORKGROUP: u32 = 256u;

struct Params {
    count: u32,
    groups_x: u32,
    scale: f32,
    _pad: u32,
    hyper: vec4<f32>,
}

@group(0) @binding(0) var<storage, read_write> w: array<f32>;
@group(0) @binding(1) var<storage, read_write> m: array<f32>;
@group(0) @binding(2) var<storage, read_write> acc: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

@compute @workgroup_size(WORKGROUP)
fn update_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let i = (wg.y * params.groups_x + wg.x) * WORKGROUP + local;
    if (i >= params.count) {
        return;
    }
    let g = acc[i] * params.scale;
    acc[i] = 0.0;
    let next = update(w[i], m[i], g, params.hyper);
    w[i] = next.x;
    m[i] = next.y;
}
