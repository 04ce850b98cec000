//! Element types and reduction operators, shared by every layer.

use std::fmt;

/// The element type of a tensor taking part in a collective.
///
/// Non-exhaustive: new element types are not breaking changes, so a `match` needs a `_` arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 32-bit signed integer (wrapping arithmetic, as in WGSL).
    I32,
    /// 32-bit unsigned integer (wrapping arithmetic, as in WGSL).
    U32,
    /// 16-bit IEEE float. Works on every adapter: the reduce kernels hold two to a u32 word and
    /// combine them in f32, so no `wgpu::Features::SHADER_F16` is needed (the tensor-parallel
    /// kernels, which compute in f16, do need it).
    F16,
    /// bfloat16, the upper half of an f32 (8 exponent bits, 7 mantissa bits). Works on every
    /// adapter: WGSL has no bf16, so the kernels hold two to a u32 word, combine them in f32 and
    /// round to nearest even.
    BF16,
}

impl DType {
    /// Every element type, in a fixed order.
    pub const ALL: [DType; 5] = [DType::F32, DType::I32, DType::U32, DType::F16, DType::BF16];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            _ => 4,
        }
    }

    /// The WGSL spelling of the type. WGSL has no bf16: bf16 tensors are bound as `u32` words
    /// holding two elements each, so its spelling is `u32`.
    pub const fn wgsl(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I32 => "i32",
            DType::U32 | DType::BF16 => "u32",
            DType::F16 => "f16",
        }
    }

    /// Whether the type is a floating-point type.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    pub(crate) const fn code(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // nccl-tests names: float, int32, uint32, half, bfloat16.
        f.write_str(match self {
            DType::F32 => "float",
            DType::I32 => "int32",
            DType::U32 => "uint32",
            DType::F16 => "half",
            DType::BF16 => "bfloat16",
        })
    }
}

/// A Rust type that can live in a device tensor.
///
/// Implemented for `f32`, `i32`, `u32`, [`half::f16`] and [`half::bf16`].
pub trait Element: bytemuck::Pod + Send + Sync + fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for u32 {
    const DTYPE: DType = DType::U32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for half::bf16 {
    const DTYPE: DType = DType::BF16;
}

/// How a reducing collective combines the ranks' elements.
///
/// `Avg` is a sum followed by a division by the rank count; on integers the division truncates
/// toward zero, as NCCL's does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise product.
    Prod,
    /// Element-wise minimum.
    Min,
    /// Element-wise maximum.
    Max,
    /// Element-wise mean: sum, then divide by the number of ranks.
    Avg,
}

impl ReduceOp {
    /// Every operator, in a fixed order.
    pub const ALL: [ReduceOp; 5] = [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ];

    /// The operator the device kernel applies between two ranks' elements (`Avg` sums first).
    pub(crate) const fn combine(self) -> Combine {
        match self {
            ReduceOp::Sum | ReduceOp::Avg => Combine::Sum,
            ReduceOp::Prod => Combine::Prod,
            ReduceOp::Min => Combine::Min,
            ReduceOp::Max => Combine::Max,
        }
    }

    pub(crate) const fn code(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for ReduceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Prod => "prod",
            ReduceOp::Min => "min",
            ReduceOp::Max => "max",
            ReduceOp::Avg => "avg",
        })
    }
}

/// What a device kernel does with an incoming element `b` and the element `a` already in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Combine {
    Sum,
    Prod,
    Min,
    Max,
    /// `a = b`: a plain element-wise copy.
    Copy,
}

impl Combine {
    /// The value of the `OP` override constant in `shaders/reduce.wgsl`.
    pub(crate) const fn shader_code(self) -> u32 {
        match self {
            Combine::Sum => 0,
            Combine::Prod => 1,
            Combine::Min => 2,
            Combine::Max => 3,
            Combine::Copy => 4,
        }
    }
}

/// The collectives a communicator runs; used in errors and in the wire header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CollectiveKind {
    /// Every rank ends with the reduction of all ranks' buffers.
    AllReduce,
    /// Rank r ends with chunk r of the reduction.
    ReduceScatter,
    /// Every rank ends with every rank's buffer, concatenated in rank order.
    AllGather,
    /// Every rank ends with the root's buffer.
    Broadcast,
    /// The root ends with the reduction of all ranks' buffers.
    Reduce,
    /// Returns once every rank has entered it.
    Barrier,
}

impl CollectiveKind {
    pub(crate) const fn code(self) -> u32 {
        self as u32
    }
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CollectiveKind::AllReduce => "all_reduce",
            CollectiveKind::ReduceScatter => "reduce_scatter",
            CollectiveKind::AllGather => "all_gather",
            CollectiveKind::Broadcast => "broadcast",
            CollectiveKind::Reduce => "reduce",
            CollectiveKind::Barrier => "barrier",
        })
    }
}
