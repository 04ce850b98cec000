// Element-wise kernels of the tensor-parallel layers: GELU forward and backward, and a strided
// copy of a block of columns between two row-major matrices (to split and join shards).
//
// The host replaces ELEM with f32 or f16 (and puts `enable f16;` first for f16); the arithmetic is
// done in f32. Offsets are in elements from the start of each binding. A 2-D grid of workgroups
// lifts the 65,535-per-dimension limit.

const WORKGROUP: u32 = 256u;

struct Params {
    count: u32,   // elements (gelu) or columns per row (copy)
    rows: u32,    // rows (copy)
    groups_x: u32,
    x_off: u32,   // input / source offset
    y_off: u32,   // second input (gelu_backward's dy)
    out_off: u32, // output / destination offset
    x_ld: u32,    // source row stride (copy)
    out_ld: u32,  // destination row stride (copy)
}

@group(0) @binding(0) var<storage, read> x: array<ELEM>;
@group(0) @binding(1) var<storage, read_write> out: array<ELEM>;
@group(0) @binding(2) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> dy: array<ELEM>;

fn index(wg: vec3<u32>, local: u32) -> u32 {
    return (wg.y * p.groups_x + wg.x) * WORKGROUP + local;
}

// The tanh approximation Megatron-LM uses: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
// The argument of tanh is clamped, where tanh is 1 to f32 precision, so that no backend's
// exp-based tanh overflows to NaN.
const S: f32 = 0.7978845608028654;
const C: f32 = 0.044715;

fn gelu(v: f32) -> f32 {
    let t = tanh(clamp(S * (v + C * v * v * v), -15.0, 15.0));
    return 0.5 * v * (1.0 + t);
}

fn gelu_grad(v: f32) -> f32 {
    let t = tanh(clamp(S * (v + C * v * v * v), -15.0, 15.0));
    return 0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * S * (1.0 + 3.0 * C * v * v);
}

// out[i] = gelu(x[i])
@compute @workgroup_size(WORKGROUP)
fn gelu_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = index(wg, li);
    if (i < p.count) {
        out[p.out_off + i] = ELEM(gelu(f32(x[p.x_off + i])));
    }
}

// out[i] = dy[i] * gelu'(x[i])
@compute @workgroup_size(WORKGROUP)
fn gelu_backward_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = index(wg, li);
    if (i < p.count) {
        out[p.out_off + i] = ELEM(f32(dy[p.y_off + i]) * gelu_grad(f32(x[p.x_off + i])));
    }
}

// out[r * out_ld + j] = x[r * x_ld + j] for r < rows, j < count (offsets already applied).
@compute @workgroup_size(WORKGROUP)
fn copy_columns_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = index(wg, li);
    if (i < p.count * p.rows) {
        let r = i / p.count;
        let j = i % p.count;
        out[p.out_off + r * p.out_ld + j] = x[p.x_off + r * p.x_ld + j];
    }
}
