//! Frames between parameter-server workers and servers.

/// What a frame asks or answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    /// Worker -> server: a gradient of `key` for `step`; payload: f32 values.
    Push = 1,
    /// Worker -> server: the parameters of `key` as of `step` (subject to the mode's bound).
    Pull = 2,
    /// Server -> worker: parameters; `version` and `clock` say how current they are.
    Params = 3,
    /// Worker -> server: no more requests from this worker.
    Done = 4,
    /// Server -> worker: the request was refused; payload: the reason, UTF-8.
    Refused = 5,
    /// Primary -> backup: `key` at `version`; payload: the parameters, then the optimiser state.
    Replicate = 6,
    /// Backup -> primary: `key` at `version` applied.
    ReplicaAck = 7,
    /// Server -> server: are you there?
    Ping = 8,
    /// Server -> server: yes.
    Pong = 9,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PsHeader {
    pub step: u64,
    /// Updates applied to the key so far (Params).
    pub version: u64,
    /// The slowest worker's clock for the key: every step below it is applied (Params).
    pub clock: u64,
    pub kind: u32,
    pub key: u32,
    pub count: u32,
    /// Params from a replica cut off from its primary: milliseconds since it last heard from
    /// it (`NOT_STALE` otherwise).
    pub stale_ms: u32,
    /// A worker's number for a pull, echoed in the server's answer to it (`Params` or
    /// `Refused`), so that an answer to an earlier request is never taken for this one's; 0 on
    /// pushes and everything else.
    pub req: u64,
}

/// `stale_ms` of parameters that are known to be current.
pub(crate) const NOT_STALE: u32 = u32::MAX;

impl PsHeader {
    pub(crate) fn new(kind: Kind, key: usize, step: u64, count: usize) -> Self {
        PsHeader {
            step,
            version: 0,
            clock: 0,
            kind: kind as u32,
            key: key as u32,
            count: count as u32,
            stale_ms: NOT_STALE,
            req: 0,
        }
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        bytemuck::bytes_of(self).to_vec()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<PsHeader> {
        bytemuck::try_pod_read_unaligned(bytes).ok()
    }

    pub(crate) fn kind(&self) -> Option<Kind> {
        Some(match self.kind {
            1 => Kind::Push,
            2 => Kind::Pull,
            3 => Kind::Params,
            4 => Kind::Done,
            5 => Kind::Refused,
            6 => Kind::Replicate,
            7 => Kind::ReplicaAck,
            8 => Kind::Ping,
            9 => Kind::Pong,
            _ => return None,
        })
    }
}
