// C = op(A) op(B): row-major matrices, C is M x N, op(A) is M x K, op(B) is K x N.
//
// The host puts a prelude first that declares the bindings a, b, c and read_a, read_b (the element
// at an index, as f32) and write_c (rounds an f32 into C): f32, f16 (with `enable f16;`), or bf16
// held two to a u32 word (see MATMUL_BF16 in src/kernels/matmul.rs). Products are accumulated in
// f32 either way. TRANS_A means A is stored K x M (so op(A) = A^T), TRANS_B that B
// is stored N x K. Offsets are in elements from the start of each binding.
//
// Two kernels:
// - plain_main: one output per invocation, straight from global memory (the reference and the
//   baseline the tiled kernel is measured against);
// - tiled_main: a 64 x 64 (or 128 x 128) tile of C per workgroup of 16 x 16 invocations, each
//   computing a 4 x 4 (or 8 x 8) block; K is walked in steps of 16, with the slices of A and B
//   staged in workgroup memory as vec4s, so that each step of a 4 x 4 block is 2 vec4 loads and
//   4 vec4 FMAs per invocation (4 loads and 16 FMAs for 8 x 8).
// Edges (any M, N, K) are handled by loading zeros outside the matrices and skipping the stores.

override TRANS_A: bool = false;
override TRANS_B: bool = false;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    a_ld: u32, // row stride of A as stored (K, or M when transposed; row blocks keep it)
    _pad: u32,
}

@group(0) @binding(3) var<uniform> p: Params;

// Index of op(A)[row, col] in `a` (no bounds check).
fn a_index(row: u32, col: u32) -> u32 {
    if (TRANS_A) {
        return p.a_off + col * p.a_ld + row;
    }
    return p.a_off + row * p.a_ld + col;
}

// Index of op(B)[row, col] in `b` (no bounds check).
fn b_index(row: u32, col: u32) -> u32 {
    if (TRANS_B) {
        return p.b_off + col * p.k + row;
    }
    return p.b_off + row * p.n + col;
}

@compute @workgroup_size(16, 16)
fn plain_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let col = gid.x;
    let row = gid.y;
    if (row >= p.m || col >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < p.k; i++) {
        acc = fma(read_a(a_index(row, i)), read_b(b_index(i, col)), acc);
    }
    write_c(p.c_off + row * p.n + col, acc);
}

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;
// Invocations per side of the workgroup; each covers 4 rows and 4 columns of the tile.
const SIDE: u32 = 16u;

// a_tile[kk * SIDE + q] holds op(A)[row0 + 4q .. row0 + 4q + 3, k0 + kk];
// b_tile[kk * SIDE + q] holds op(B)[k0 + kk, col0 + 4q .. col0 + 4q + 3].
var<workgroup> a_tile: array<vec4<f32>, 256>;
var<workgroup> b_tile: array<vec4<f32>, 256>;

fn load_a(row: u32, col: u32) -> f32 {
    if (row < p.m && col < p.k) {
        return read_a(a_index(row, col));
    }
    return 0.0;
}

fn load_b(row: u32, col: u32) -> f32 {
    if (row < p.k && col < p.n) {
        return read_b(b_index(row, col));
    }
    return 0.0;
}

@compute @workgroup_size(16, 16)
fn tiled_main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TILE_M;
    let col0 = wg.x * TILE_N;
    // Which slot of each tile this invocation fills: neighbouring invocations take neighbouring
    // addresses of the stored matrix, whichever way it is laid out.
    var a_kk = li % SIDE;
    var a_q = li / SIDE;
    if (TRANS_A) {
        a_kk = li / SIDE;
        a_q = li % SIDE;
    }
    var b_kk = li / SIDE;
    var b_q = li % SIDE;
    if (TRANS_B) {
        b_kk = li % SIDE;
        b_q = li / SIDE;
    }
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        let ar = row0 + 4u * a_q;
        let ak = k0 + a_kk;
        a_tile[a_kk * SIDE + a_q] = vec4<f32>(
            load_a(ar, ak), load_a(ar + 1u, ak), load_a(ar + 2u, ak), load_a(ar + 3u, ak));
        let bk = k0 + b_kk;
        let bc = col0 + 4u * b_q;
        b_tile[b_kk * SIDE + b_q] = vec4<f32>(
            load_b(bk, bc), load_b(bk, bc + 1u), load_b(bk, bc + 2u), load_b(bk, bc + 3u));
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let av = a_tile[kk * SIDE + lid.y];
            let bv = b_tile[kk * SIDE + lid.x];
            acc0 = fma(vec4<f32>(av.x), bv, acc0);
            acc1 = fma(vec4<f32>(av.y), bv, acc1);
            acc2 = fma(vec4<f32>(av.z), bv, acc2);
            acc3 = fma(vec4<f32>(av.w), bv, acc3);
        }
        workgroupBarrier();
    }
    var rows = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    let col = col0 + 4u * lid.x;
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + 4u * lid.y + i;
        if (row >= p.m) {
            return;
        }
        let base = p.c_off + row * p.n;
        let v = rows[i];
        for (var j = 0u; j < 4u; j++) {
            if (col + j < p.n) {
                write_c(base + col + j, v[j]);
            }
        }
    }
}

// The large tiled kernel: 128 x 128 tiles, 8 x 8 outputs per invocation in 16 vec4
// accumulators, written out by name: software adapters keep an indexed array of them in memory
// (measured: twice as slow for the 4 x 4 kernel), GPUs may spill it.
const L_TILE_M: u32 = 128u;
const L_TILE_N: u32 = 128u;
const A_VECS: u32 = TILE_K * L_TILE_M / 4u;
const B_VECS: u32 = TILE_K * L_TILE_N / 4u;

// As a_tile and b_tile, for the large tiles.
var<workgroup> a_tile_l: array<vec4<f32>, A_VECS>;
var<workgroup> b_tile_l: array<vec4<f32>, B_VECS>;

// c[row, col .. col + 3] = v, where inside C.
fn store4(row: u32, col: u32, v: vec4<f32>) {
    if (row >= p.m) {
        return;
    }
    let base = p.c_off + row * p.n;
    for (var e = 0u; e < 4u; e++) {
        if (col + e < p.n) {
            write_c(base + col + e, v[e]);
        }
    }
}

// Invocation (tx, ty) computes rows 4 (i * 16 + ty) + r and columns 4 (j * 16 + tx) + e of the
// tile, for i, j < 2 and r, e < 4 (accumulator c{4i + r}{j}): neighbouring invocations read
// neighbouring vec4s of the tiles (no bank conflicts) and write neighbouring columns of C.
@compute @workgroup_size(16, 16)
fn tiled_large_main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * L_TILE_M;
    let col0 = wg.x * L_TILE_N;
    var c00 = vec4<f32>(0.0);
    var c01 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c20 = vec4<f32>(0.0);
    var c21 = vec4<f32>(0.0);
    var c30 = vec4<f32>(0.0);
    var c31 = vec4<f32>(0.0);
    var c40 = vec4<f32>(0.0);
    var c41 = vec4<f32>(0.0);
    var c50 = vec4<f32>(0.0);
    var c51 = vec4<f32>(0.0);
    var c60 = vec4<f32>(0.0);
    var c61 = vec4<f32>(0.0);
    var c70 = vec4<f32>(0.0);
    var c71 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // Fill the tiles; neighbouring invocations take neighbouring addresses of the stored
        // matrix, whichever way it is laid out.
        for (var l = 0u; l < A_VECS / 256u; l++) {
            let slot = li + 256u * l;
            var kk = slot % TILE_K;
            var q = slot / TILE_K;
            if (TRANS_A) {
                kk = slot / (L_TILE_M / 4u);
                q = slot % (L_TILE_M / 4u);
            }
            let ar = row0 + 4u * q;
            let ac = k0 + kk;
            a_tile_l[kk * (L_TILE_M / 4u) + q] = vec4<f32>(
                load_a(ar, ac), load_a(ar + 1u, ac), load_a(ar + 2u, ac), load_a(ar + 3u, ac));
        }
        for (var l = 0u; l < B_VECS / 256u; l++) {
            let slot = li + 256u * l;
            var kk = slot / (L_TILE_N / 4u);
            var q = slot % (L_TILE_N / 4u);
            if (TRANS_B) {
                kk = slot % TILE_K;
                q = slot / TILE_K;
            }
            let br = k0 + kk;
            let bc = col0 + 4u * q;
            b_tile_l[kk * (L_TILE_N / 4u) + q] = vec4<f32>(
                load_b(br, bc), load_b(br, bc + 1u), load_b(br, bc + 2u), load_b(br, bc + 3u));
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let a0 = a_tile_l[kk * (L_TILE_M / 4u) + lid.y];
            let a1 = a_tile_l[kk * (L_TILE_M / 4u) + SIDE + lid.y];
            let b0 = b_tile_l[kk * (L_TILE_N / 4u) + lid.x];
            let b1 = b_tile_l[kk * (L_TILE_N / 4u) + SIDE + lid.x];
            let x0 = vec4<f32>(a0.x);
            let x1 = vec4<f32>(a0.y);
            let x2 = vec4<f32>(a0.z);
            let x3 = vec4<f32>(a0.w);
            let x4 = vec4<f32>(a1.x);
            let x5 = vec4<f32>(a1.y);
            let x6 = vec4<f32>(a1.z);
            let x7 = vec4<f32>(a1.w);
            c00 = fma(x0, b0, c00);
            c01 = fma(x0, b1, c01);
            c10 = fma(x1, b0, c10);
            c11 = fma(x1, b1, c11);
            c20 = fma(x2, b0, c20);
            c21 = fma(x2, b1, c21);
            c30 = fma(x3, b0, c30);
            c31 = fma(x3, b1, c31);
            c40 = fma(x4, b0, c40);
            c41 = fma(x4, b1, c41);
            c50 = fma(x5, b0, c50);
            c51 = fma(x5, b1, c51);
            c60 = fma(x6, b0, c60);
            c61 = fma(x6, b1, c61);
            c70 = fma(x7, b0, c70);
            c71 = fma(x7, b1, c71);
        }
        workgroupBarrier();
    }
    store4(row0 + 4u * (0u * SIDE + lid.y) + 0u, col0 + 4u * (0u * SIDE + lid.x), c00);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 0u, col0 + 4u * (1u * SIDE + lid.x), c01);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 1u, col0 + 4u * (0u * SIDE + lid.x), c10);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 1u, col0 + 4u * (1u * SIDE + lid.x), c11);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 2u, col0 + 4u * (0u * SIDE + lid.x), c20);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 2u, col0 + 4u * (1u * SIDE + lid.x), c21);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 3u, col0 + 4u * (0u * SIDE + lid.x), c30);
    store4(row0 + 4u * (0u * SIDE + lid.y) + 3u, col0 + 4u * (1u * SIDE + lid.x), c31);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 0u, col0 + 4u * (0u * SIDE + lid.x), c40);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 0u, col0 + 4u * (1u * SIDE + lid.x), c41);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 1u, col0 + 4u * (0u * SIDE + lid.x), c50);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 1u, col0 + 4u * (1u * SIDE + lid.x), c51);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 2u, col0 + 4u * (0u * SIDE + lid.x), c60);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 2u, col0 + 4u * (1u * SIDE + lid.x), c61);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 3u, col0 + 4u * (0u * SIDE + lid.x), c70);
    store4(row0 + 4u * (1u * SIDE + lid.y) + 3u, col0 + 4u * (1u * SIDE + lid.x), c71);
}
