//! The header every frame carries, so that ranks that disagree about the call find out before
//! they exchange data.

use crate::error::{At, Error};
use crate::types::{CollectiveKind, DType, ReduceOp};

/// What a `Mismatch` names when a peer's frame is not a call's frame at all (its header has
/// another length): a frame of another protocol, such as the proposal of a peer that left the
/// call for an agreement.
pub(crate) const NOT_A_CALL: &str = "frame header";

/// Field value meaning "not used by this collective".
pub(crate) const NONE: u32 = u32::MAX;

/// The `algo` of a broadcast or reduce on the binomial tree, or a dissemination barrier (the
/// chain's and the ring's is [`NONE`]): ranks that chose differently (they disagree about the
/// count, or about finishing among survivors) are told so when their frames meet.
pub(crate) const TREE: u32 = 0x100;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Header {
    pub seq: u64,
    pub count: u64,
    pub payload_bytes: u64,
    pub unit: u32,
    pub kind: u32,
    pub dtype: u32,
    pub op: u32,
    pub root: u32,
    pub ranks: u32,
    pub algo: u32,
    pub _pad: u32,
}

impl Header {
    pub(crate) fn encode(&self) -> Vec<u8> {
        bytemuck::bytes_of(self).to_vec()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Header> {
        bytemuck::try_pod_read_unaligned(bytes).ok()
    }

    /// Compares a received header with the one this rank expects, field by field, the most
    /// telling difference first.
    pub(crate) fn check(&self, theirs: &Header, at: At, peer: usize) -> Result<(), Error> {
        let mismatch = |field: &'static str, ours: String, theirs: String| {
            Err(Error::Mismatch {
                at,
                peer,
                field,
                ours,
                theirs,
            })
        };
        if self.ranks != theirs.ranks {
            return mismatch(
                "rank count",
                self.ranks.to_string(),
                theirs.ranks.to_string(),
            );
        }
        if self.seq != theirs.seq {
            return mismatch(
                "sequence number (a rank skipped or repeated a call)",
                self.seq.to_string(),
                theirs.seq.to_string(),
            );
        }
        if self.kind != theirs.kind {
            return mismatch("collective", kind_name(self.kind), kind_name(theirs.kind));
        }
        if self.dtype != theirs.dtype {
            return mismatch(
                "element type",
                dtype_name(self.dtype),
                dtype_name(theirs.dtype),
            );
        }
        if self.op != theirs.op {
            return mismatch("reduce op", op_name(self.op), op_name(theirs.op));
        }
        if self.count != theirs.count {
            return mismatch("count", self.count.to_string(), theirs.count.to_string());
        }
        if self.root != theirs.root {
            return mismatch("root", self.root.to_string(), theirs.root.to_string());
        }
        // After the fields the algorithm is chosen from: ranks whose counts differ are told
        // that, not the algorithm it led them to.
        if self.algo != theirs.algo {
            return mismatch("algorithm", algo_name(self.algo), algo_name(theirs.algo));
        }
        if self.unit != theirs.unit || self.payload_bytes != theirs.payload_bytes {
            return mismatch(
                "frame (unit, bytes)",
                format!("({}, {})", self.unit, self.payload_bytes),
                format!("({}, {})", theirs.unit, theirs.payload_bytes),
            );
        }
        Ok(())
    }
}

fn kind_name(code: u32) -> String {
    const KINDS: [CollectiveKind; 6] = [
        CollectiveKind::AllReduce,
        CollectiveKind::ReduceScatter,
        CollectiveKind::AllGather,
        CollectiveKind::Broadcast,
        CollectiveKind::Reduce,
        CollectiveKind::Barrier,
    ];
    KINDS
        .iter()
        .find(|k| k.code() == code)
        .map_or_else(|| format!("unknown ({code})"), |k| k.to_string())
}

fn dtype_name(code: u32) -> String {
    DType::ALL
        .iter()
        .find(|d| d.code() == code)
        .map_or_else(|| "none".to_string(), |d| d.to_string())
}

fn op_name(code: u32) -> String {
    ReduceOp::ALL
        .iter()
        .find(|o| o.code() == code)
        .map_or_else(|| "none".to_string(), |o| o.to_string())
}

fn algo_name(code: u32) -> String {
    if code == TREE {
        return "tree".into();
    }
    crate::algo::Algorithm::ALL
        .iter()
        .find(|a| a.code() == code)
        .map_or_else(|| "none".to_string(), |a| a.to_string())
}
