//! Frames between parameter-server workers and servers, and between servers.
//!
//! Every frame is a fixed [`PsHeader`] and a payload. A server validates every field of a
//! frame (`server.rs`, `check_request`/`check_replica`) before the frame changes any state.
//! Tests reach these types through `wccl::ps::wire` to send frames a well-behaved worker never
//! would.

/// What a frame asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Worker -> server: a gradient of `key` for `step`; payload: `count` f32 values.
    Push = 1,
    /// Worker -> server: the parameters of `key` as of `step` (subject to the mode's bound).
    Pull = 2,
    /// Server -> worker: parameters; `version` and `clock` say how current they are.
    Params = 3,
    /// Worker -> server: no more requests from this worker.
    Done = 4,
    /// Server -> worker: the request was refused; `status` is a [`Refusal`] code, `hint` a
    /// server to ask instead ([`NO_RANK`] if none); payload: the reason, UTF-8.
    Refused = 5,
    /// Server -> server: `key` at `version` in chain `epoch`; payload: the parameters, the
    /// optimiser state, the chain (head first) as `hint` little-endian u32 ranks, each
    /// worker's clock and dedupe window (two u64), and `step` take-over fences (two u64).
    /// Each member applies it, forwards it to its successor and acknowledges it to the head.
    Replicate = 6,
    /// Member -> head: `key` at `version` (epoch `epoch`) applied.
    ReplicaAck = 7,
    /// Server -> server: are you there?
    Ping = 8,
    /// Server -> server: yes.
    Pong = 9,
    /// Server -> worker: the push numbered `req` is accepted; `status` is a [`PushStatus`].
    PushAck = 10,
    /// Worker -> server: write your shard's checkpoint now.
    Checkpoint = 11,
    /// Server -> worker: the checkpoint numbered `req` is written.
    CheckpointDone = 12,
    /// Server -> server: every worker is done and every key this server heads is held by its
    /// whole chain; it will send nothing more but answers.
    Bye = 13,
    /// Member -> the members after it: may I take over `key` (at `epoch`, `version`)?
    Claim = 14,
    /// Answer to a claim: `status` 1 agrees, 0 refuses; `epoch`, `version`: the answerer's.
    ClaimAck = 15,
}

impl Kind {
    /// The kind a header's code names, if any.
    pub fn from_code(code: u32) -> Option<Kind> {
        Some(match code {
            1 => Kind::Push,
            2 => Kind::Pull,
            3 => Kind::Params,
            4 => Kind::Done,
            5 => Kind::Refused,
            6 => Kind::Replicate,
            7 => Kind::ReplicaAck,
            8 => Kind::Ping,
            9 => Kind::Pong,
            10 => Kind::PushAck,
            11 => Kind::Checkpoint,
            12 => Kind::CheckpointDone,
            13 => Kind::Bye,
            14 => Kind::Claim,
            15 => Kind::ClaimAck,
            _ => return None,
        })
    }
}

/// Why a server refused a request (`status` of a `Refused` frame).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Refusal {
    /// A field of the frame is wrong (kind, rank, dtype, shape, step): the caller's bug.
    BadRequest = 1,
    /// The request's number is not above the last one from that worker: a replay.
    Replayed = 2,
    /// This server does not hold the key.
    NotHere = 3,
    /// Another server answers for the key now (`hint`): ask it.
    AskOther = 4,
    /// This replica is cut off from the head and cannot prove its copy is current (Strong).
    CannotProve = 5,
    /// The server could not do what was asked (a checkpoint that failed to write).
    Failed = 6,
    /// Under `Strong`: this server's copy (`version` in the refusal) is older than what the
    /// worker was already answered with (`version` in the request): updates are lost, and this
    /// server will not answer from that copy.
    Behind = 7,
}

impl Refusal {
    /// The refusal a code names (unknown codes read as `BadRequest`).
    pub fn from_code(code: u32) -> Refusal {
        match code {
            2 => Refusal::Replayed,
            3 => Refusal::NotHere,
            4 => Refusal::AskOther,
            5 => Refusal::CannotProve,
            6 => Refusal::Failed,
            7 => Refusal::Behind,
            _ => Refusal::BadRequest,
        }
    }
}

/// What became of an accepted push (`status` of a `PushAck`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum PushStatus {
    /// Applied, and held by every live replica under `Strong`.
    Applied = 0,
    /// It came after its step's update applied (a backup worker's late gradient): dropped.
    Late = 1,
    /// The server already had this (worker, step): dropped.
    Duplicate = 2,
}

/// The only element type the parameter server carries today: f32 (`DType::F32`'s code).
pub const F32: u32 = crate::types::DType::F32.code();

/// `hint` and `rank` values that name no rank.
pub const NO_RANK: u32 = u32::MAX;

/// `stale_ms` of parameters that are known to be current.
pub const NOT_STALE: u32 = u32::MAX;

/// Flag in a `Replicate`'s `status`: the head (re)admits this member to the chain.
pub const JOIN: u32 = 1;

/// The fixed header of every parameter-server frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct PsHeader {
    /// Push/Pull: the worker's step; echoed in answers. Replicate: the number of take-over
    /// fences (epoch, version pairs) at the end of the payload.
    pub step: u64,
    /// Params/Replicate/ReplicaAck: updates applied to the key. Push/Pull: the highest
    /// version the worker has been answered with for the key (a server that holds less under
    /// `Strong` refuses with `Refusal::Behind`). Refused: the server's version.
    pub version: u64,
    /// Params: the slowest worker's clock for the key (every step below it is applied).
    pub clock: u64,
    /// A worker's number for a request, strictly increasing per worker, echoed in the
    /// server's answer (`Params`, `PushAck`, `Refused`, `CheckpointDone`): an answer is only
    /// ever taken for the request it names, and a replayed number is refused.
    pub req: u64,
    /// Replicate/ReplicaAck/Claim: the chain's membership epoch. Params/PushAck: the epoch of
    /// the key's line of versions (its last take-over). Push/Pull: the line the worker's
    /// `version` came from.
    pub epoch: u64,
    /// Replicate: FNV-1a digest of the parameters in the payload.
    pub digest: u64,
    /// A [`Kind`] code.
    pub kind: u32,
    /// The key's id.
    pub key: u32,
    /// Elements of the key the payload carries (Push, Params, Replicate).
    pub count: u32,
    /// Params from a replica cut off from its head: milliseconds since it last heard from it
    /// ([`NOT_STALE`] otherwise).
    pub stale_ms: u32,
    /// The sender's rank, as it claims; a server checks it against the link's.
    pub rank: u32,
    /// The element type's code ([`F32`]).
    pub dtype: u32,
    /// Refused: a [`Refusal`]; PushAck: a [`PushStatus`]; Replicate: flags ([`JOIN`]).
    pub status: u32,
    /// Refused: a server to ask instead; Replicate: ranks in the chain after the payload.
    pub hint: u32,
}

impl PsHeader {
    /// A header of `kind` for `key` at `step` carrying `count` elements, from `rank`.
    pub fn new(kind: Kind, rank: usize, key: usize, step: u64, count: usize) -> Self {
        PsHeader {
            step,
            version: 0,
            clock: 0,
            req: 0,
            epoch: 0,
            digest: 0,
            kind: kind as u32,
            key: u32::try_from(key).unwrap_or(u32::MAX),
            count: u32::try_from(count).unwrap_or(u32::MAX),
            stale_ms: NOT_STALE,
            rank: u32::try_from(rank).unwrap_or(NO_RANK),
            dtype: F32,
            status: 0,
            hint: NO_RANK,
        }
    }

    /// The header's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        bytemuck::bytes_of(self).to_vec()
    }

    /// The header in `bytes`, if they are exactly one header long.
    pub fn decode(bytes: &[u8]) -> Option<PsHeader> {
        bytemuck::try_pod_read_unaligned(bytes).ok()
    }

    /// The frame's kind, if its code is known.
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_code(self.kind)
    }
}

/// FNV-1a over the bytes of `values` (a digest to compare replicas by).
pub(crate) fn digest(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
