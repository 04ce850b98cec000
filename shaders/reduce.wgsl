// Element-wise kernels of the reducing collectives.
//
// The host replaces ELEM with f32, i32 or u32 (f16 and bf16 are in reduce_packed.wgsl); the
// OP override constant picks the combine operator, so each (type, operator) pair is one pipeline.
// PER_THREAD elements per invocation; a 2-D grid of workgroups lifts the 65,535-per-dimension limit.

override OP: u32 = 0u; // 0 sum, 1 prod, 2 min, 3 max, 4 copy
override WORKGROUP: u32 = 256u;
// Elements per invocation: a workgroup covers WORKGROUP * PER_THREAD consecutive elements,
// invocation t taking t, t + WORKGROUP, ... (coalesced on GPUs, vector lanes on CPUs), which
// spreads the per-workgroup cost over more work. The host always sets it (kernels/reduce.rs's
// PER_THREAD, the single source, which also sizes the dispatch); the default only matches it.
override PER_THREAD: u32 = 4u;

struct Params {
    dst_offset: u32, // elements from the start of the dst binding
    src_offset: u32, // elements from the start of the src binding
    count: u32,      // elements to process
    groups_x: u32,   // workgroups in x of the dispatch grid
    divisor: u32,    // for scale_main
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> dst: array<ELEM>;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> src: array<ELEM>;

fn combine(a: ELEM, b: ELEM) -> ELEM {
    switch OP {
        case 0u: { return a + b; }
        case 1u: { return a * b; }
        case 2u: { return min(a, b); }
        case 3u: { return max(a, b); }
        default: { return b; }
    }
}

fn first_index(wg: vec3<u32>, local: u32) -> u32 {
    return (wg.y * params.groups_x + wg.x) * WORKGROUP * PER_THREAD + local;
}

// dst[i] = combine(dst[i], src[i])
@compute @workgroup_size(WORKGROUP)
fn combine_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let first = first_index(wg, local);
    for (var k = 0u; k < PER_THREAD; k++) {
        let i = first + k * WORKGROUP;
        if (i >= params.count) {
            return;
        }
        let d = params.dst_offset + i;
        let b = src[params.src_offset + i];
        if (OP == 4u) {
            dst[d] = b; // a copy need not read what it overwrites
        } else {
            dst[d] = combine(dst[d], b);
        }
    }
}

// dst[i] = dst[i] / divisor: the second half of avg (integer division truncates toward zero).
@compute @workgroup_size(WORKGROUP)
fn scale_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let first = first_index(wg, local);
    for (var k = 0u; k < PER_THREAD; k++) {
        let i = first + k * WORKGROUP;
        if (i >= params.count) {
            return;
        }
        let d = params.dst_offset + i;
        dst[d] = dst[d] / ELEM(params.divisor);
    }
}
