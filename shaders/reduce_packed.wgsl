// Element-wise kernels of the reducing collectives for 16-bit floats held two to a u32 word, so
// that f16 and bf16 need no device feature (WGSL has no bf16, and f16 needs SHADER_F16).
//
// FORMAT picks the format: 0 is f16 (through the core unpack2x16float / pack2x16float), 1 is bf16
// (the upper half of an f32: a shift and a bitcast in, round-to-nearest-even out). Both combine in
// f32 and round once per step. OP is the combine operator, as in reduce.wgsl.
//
// Offsets and counts are in elements (halves), so a tensor may start or end in the middle of a
// word. Invocation k owns dst word k of the range, reads it whole and writes it whole, replacing
// only the halves inside [dst_offset, dst_offset + count): the neighbouring half of a partial first
// or last word is written back unchanged, and no two invocations of a dispatch share a word.

override OP: u32 = 0u; // 0 sum, 1 prod, 2 min, 3 max, 4 copy
override FORMAT: u32 = 0u; // 0 f16, 1 bf16
override WORKGROUP: u32 = 256u;
// Set by the host from kernels/reduce.rs's PER_THREAD (the single source); the default matches.
override PER_THREAD: u32 = 4u;

struct Params {
    dst_offset: u32, // halves from the start of the dst binding
    src_offset: u32, // halves from the start of the src binding
    count: u32,      // halves to process
    groups_x: u32,   // workgroups in x of the dispatch grid
    divisor: u32,    // for scale_main
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> dst: array<u32>;
@group(0) @binding(1) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> src: array<u32>;

fn unpack(w: u32) -> vec2<f32> {
    if (FORMAT == 0u) {
        return unpack2x16float(w);
    }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// f32 to bf16 bits, rounding to nearest, ties to even; a NaN stays a (quiet) NaN rather than
// carrying into the exponent.
fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn pack(v: vec2<f32>) -> u32 {
    if (FORMAT == 0u) {
        return pack2x16float(v);
    }
    return to_bf16(v.x) | (to_bf16(v.y) << 16u);
}

fn combine(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    switch OP {
        case 0u: { return a + b; }
        case 1u: { return a * b; }
        case 2u: { return min(a, b); }
        default: { return max(a, b); }
    }
}

// Half `h` (an index in halves from the start of the src binding), in the low 16 bits.
fn src_half(h: u32) -> u32 {
    return (src[h >> 1u] >> ((h & 1u) * 16u)) & 0xffffu;
}

// The bits of `word` (dst word `w`) that lie inside the range: 0xffff per half inside it.
fn range_mask(w: u32) -> u32 {
    let lo = params.dst_offset;
    let hi = params.dst_offset + params.count;
    var mask = 0u;
    if (2u * w >= lo && 2u * w < hi) {
        mask |= 0xffffu;
    }
    if (2u * w + 1u >= lo && 2u * w + 1u < hi) {
        mask |= 0xffff0000u;
    }
    return mask;
}

fn first_word(wg: vec3<u32>, local: u32) -> u32 {
    return (wg.y * params.groups_x + wg.x) * WORKGROUP * PER_THREAD + local;
}

// dst[i] = combine(dst[i], src[i]) for the halves i of the range.
@compute @workgroup_size(WORKGROUP)
fn combine_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let base = params.dst_offset >> 1u;
    let words = ((params.dst_offset & 1u) + params.count + 1u) >> 1u;
    let first = first_word(wg, local);
    // When both ranges start at the same parity, dst word w pairs with one src word.
    let same_parity = ((params.dst_offset ^ params.src_offset) & 1u) == 0u;
    // src half = dst half - dst_offset + src_offset; as a word shift when the parities agree.
    let shift = (params.src_offset >> 1u) - base;
    for (var k = 0u; k < PER_THREAD; k++) {
        let i = first + k * WORKGROUP;
        if (i >= words) {
            return;
        }
        let w = base + i;
        let mask = range_mask(w);
        var b: u32;
        if (same_parity) {
            b = src[w + shift];
        } else {
            // The halves of the word straddle two src words.
            let h = 2u * w + params.src_offset - params.dst_offset;
            var lo_half = 0u;
            var hi_half = 0u;
            if ((mask & 0xffffu) != 0u) {
                lo_half = src_half(h);
            }
            if ((mask & 0xffff0000u) != 0u) {
                hi_half = src_half(h + 1u);
            }
            b = lo_half | (hi_half << 16u);
        }
        if (OP == 4u && mask == 0xffffffffu) {
            dst[w] = b; // a whole-word copy need not read what it overwrites
            continue;
        }
        let a = dst[w];
        var r = b;
        if (OP != 4u) {
            r = pack(combine(unpack(a), unpack(b)));
        }
        dst[w] = (a & ~mask) | (r & mask);
    }
}

// dst[i] = dst[i] / divisor for the halves i of the range: the second half of avg.
@compute @workgroup_size(WORKGROUP)
fn scale_main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let base = params.dst_offset >> 1u;
    let words = ((params.dst_offset & 1u) + params.count + 1u) >> 1u;
    let first = first_word(wg, local);
    for (var k = 0u; k < PER_THREAD; k++) {
        let i = first + k * WORKGROUP;
        if (i >= words) {
            return;
        }
        let w = base + i;
        let mask = range_mask(w);
        let a = dst[w];
        let r = pack(unpack(a) / f32(params.divisor));
        dst[w] = (a & ~mask) | (r & mask);
    }
}
