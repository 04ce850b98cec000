//! Finishing a collective among the survivors of a failure
//! ([`OnFailure::FinishAmongSurvivors`]): the call keeps its input, ends with a commit round,
//! and on a failure the survivors agree on who failed and how far each got, shrink, and either
//! keep the result (every survivor had it whole) or run the call again among themselves.
//!
//! Why the commit round: a rank returns only once every rank has finished the call's data
//! (the ring barrier after it: after n-1 steps a rank has heard, through its predecessors, from
//! every rank). So when any rank returned, every survivor holds the whole result, and a rank
//! whose commit failed keeps its result; when none returned, no result has been used, and the
//! survivors may all compute it again without the dead rank. Either way every survivor ends
//! with the same result: the full reduction, or exactly the survivors'.
//!
//! Why progress in the agreement: each survivor reports `(sequence number, finished the data)`
//! with its proposal, and the decision carries every survivor's report, so every survivor
//! decides the same way from the same numbers:
//! - `m`, the lowest sequence number reported, is the call some survivor has not returned from.
//!   Survivors at `m` keep their result if every survivor at `m` finished the data; otherwise
//!   they run the call again.
//! - A survivor past `m` returned from call `m` (every rank had finished it), began its next
//!   call and failed there, since the others never joined it. It runs that call again, and the
//!   others make it as their first call on the shrunk communicator.
//!
//! What it does not cover:
//! - A rank that returned and does not make another call within the agreement's wait (its
//!   program ended, or it computes for longer than the timeout) is held failed by the
//!   others.
//! - The agreement is not uniform under a second failure at the wrong moment (see
//!   `agree.rs`).
//! - A rank whose own call is refused (bad arguments, a disagreeing call) returns that error.
//!   The others finish without it.

use std::time::{Duration, Instant};

use wgpu::BufferUsages;

use super::communicator::{CallOptions, Collective, Communicator, NOT_RECOVERABLE};
use super::executor::{Call, execute};
use super::protocol::Header;
use crate::algo::{Action, Buf, Plan, Region};
use crate::device::TensorRef;
use crate::error::{At, Error, Result};

/// What a call does when a rank fails during it (dies, is cut off, sends garbage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnFailure {
    /// Every rank's call fails with an error naming the failed rank, and the communicator stays
    /// broken until the ranks [`recover`](crate::Communicator::recover) (or the group is
    /// rebuilt). The default, as NCCL and Gloo.
    #[default]
    Error,
    /// The survivors agree on who failed, shrink the communicator (see
    /// [`Communicator::shrink`](crate::Communicator::shrink)), and finish the call among
    /// themselves; [`Communicator::run`](crate::Communicator::run) returns an [`Outcome`]
    /// naming the ranks the result holds. The result is the full result when every survivor
    /// had finished its part already, else exactly the survivors' result, never a mix:
    /// - all-reduce: the reduction of the survivors' inputs (`Avg` divides by their number);
    /// - reduce-scatter: each survivor's own chunk, reduced over the survivors;
    /// - all-gather: the survivors' pieces in place, and the failed ranks' blocks zeroed (the
    ///   [`Outcome`] says which are absent: zeros are not a marker);
    /// - broadcast: from the root, or, when the root died, from the first survivor holding its
    ///   whole data ([`Error::RootLost`] when none does);
    /// - reduce: to the root; [`Error::RootLost`] when the root died before every rank had
    ///   sent it its part.
    ///
    /// The call keeps a copy of its input when it may overwrite it (an in-place call), and
    /// ends with a commit round (a ring barrier): a rank returns only once every rank has
    /// finished its part. The price without faults: that copy and n-1 more hops per call
    /// (`benches/survive.rs` measures it).
    ///
    /// Set it in [`CommConfig::on_failure`](crate::CommConfig::on_failure), so that every call
    /// of every rank takes part: a rank that returned from a call joins the others' recovery
    /// from its next call, which must come within the communicator's timeout (a rank that
    /// returned and computes for longer is held failed). That rank's next call is then the
    /// first call of the shrunk communicator, which the others make afresh: it runs numbered
    /// as when it began (a reduce-scatter's or all-gather's blocks in the old numbering, the
    /// absent ones dropped or zeroed), the others' in the new numbering; sizes match, layouts
    /// follow each rank's own call. Ranks are renumbered by every recovery: keep your own ids
    /// (`Outcome::excluded` and [`Communicator::epoch`](crate::Communicator::epoch) say when).
    /// The collective shortcuts ([`all_reduce`](crate::Communicator::all_reduce), ...) return
    /// `()`; call [`run`](crate::Communicator::run) to see the [`Outcome`]. Abort handles
    /// taken before a recovery do not reach the shrunk communicator: take new ones.
    ///
    /// What does not recover: a call refused on any rank (bad arguments) or on which ranks
    /// disagree (every rank returns an error; the peers' is [`Error::PeerAborted`]), a
    /// revoke, an abort through this rank's handle (this rank returns
    /// [`Error::Aborted`]; the others go on without it), a device error on this rank (the
    /// others go on without it), and the agreement's own errors ([`Error::NoQuorum`],
    /// [`Error::Excluded`]), which break the communicator. A corrupt frame closes its pair of
    /// ranks for good, and both ends are held failed. The agreement is not uniform under a
    /// second failure at the wrong moment (`comm/agree.rs`): two groups may then decide
    /// differently, one keeping its result, the other failing at its deadline, never mixing.
    FinishAmongSurvivors,
}

/// What the result of a call holds: returned by [`Communicator::run`](crate::Communicator::run).
///
/// Ranks are numbered as they were when the call began; the communicator is renumbered after
/// a recovery (see [`Communicator::shrink`](crate::Communicator::shrink)).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Outcome {
    /// The ranks whose inputs the result holds (a broadcast's: its root).
    pub contributors: Vec<usize>,
    /// The ranks found failed during the call (on a rank that had returned from the call
    /// before a death, the next call finds it) and no longer members.
    pub excluded: Vec<usize>,
    /// The ranks skipped as stragglers in this call
    /// ([`CallOptions::skip_after`](crate::CallOptions::skip_after)): still members, their
    /// inputs are not in the result and their outputs were left as they were.
    pub skipped: Vec<usize>,
    /// From the first failure to the end of the call, when the call recovered.
    pub recovered_in: Option<Duration>,
}

impl Outcome {
    /// A call of `call` without a failure, on a communicator of `n`.
    pub(crate) fn everyone(call: &Collective<'_>, n: usize) -> Self {
        Outcome {
            contributors: contributors(call, &(0..n).collect::<Vec<_>>()),
            excluded: Vec::new(),
            skipped: Vec::new(),
            recovered_in: None,
        }
    }
}

/// The ranks whose inputs a call among `members` holds: a broadcast's root, else all of them.
fn contributors(call: &Collective<'_>, members: &[usize]) -> Vec<usize> {
    match call {
        Collective::Broadcast { root, .. } => vec![*root],
        _ => members.to_vec(),
    }
}

/// One try at a call, as the recovery needs it.
pub(super) struct Attempt {
    pub result: Result<()>,
    /// This rank finished the call's data (the commit round may still have failed).
    pub complete: bool,
    /// The call got as far as running (not refused before it started on this rank).
    pub started: bool,
}

/// A copy of a call's input, taken before a call that may overwrite it.
pub(super) struct Kept {
    buffer: wgpu::Buffer,
}

/// A device buffer of `bytes` (zeroed: wgpu clears new buffers) for the recovery's copies.
/// Made in an error scope of its own, whose error (out of memory, say) is this rank's error
/// here: on a caller's device (`from_wgpu`, `from_devices`) an error outside any scope goes to
/// the caller's handler, whose default panics.
fn temp_buffer(c: &Communicator, at: At, bytes: u64) -> Result<wgpu::Buffer> {
    let dev = &c.engine.dev;
    let (buffer, error) = dev.catching(|| {
        dev.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("wccl survivors"),
            size: bytes.next_multiple_of(4).max(4),
            usage: BufferUsages::STORAGE | BufferUsages::COPY_SRC | BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    });
    match error {
        None => Ok(buffer),
        Some(message) => Err(Error::Device {
            at,
            message: format!("a buffer of {bytes} bytes for the survivors' call: {message}"),
        }),
    }
}

/// The failures the survivors can finish after: a peer died, fell silent, told them it gave
/// up, or already went to the agreement. Not: this rank's own refusals, a disagreeing call (it would disagree again), a revoke
/// or an abort (the user stopped the communicator), device errors.
fn recoverable(e: &Error) -> bool {
    match e {
        Error::PeerAborted { reason, .. } => !reason.starts_with(NOT_RECOVERABLE),
        // Not a frame of a call: a peer that already left this one for the agreement (its
        // proposal reached this rank, still in the call, before its abort did).
        Error::Mismatch { field, .. } => *field == super::protocol::NOT_A_CALL,
        _ => matches!(
            e,
            Error::Timeout { .. }
                | Error::LinkClosed { .. }
                | Error::PeerExited { .. }
                | Error::Corrupt { .. }
        ),
    }
}

/// The peer an error shows dead (its link ended, or it sent garbage): the agreement need not
/// wait for it. A silent peer is not named: it may be slow, and the agreement finds out.
fn suspects(e: &Error) -> Vec<usize> {
    match e {
        Error::LinkClosed { peer, .. }
        | Error::PeerExited { peer, .. }
        | Error::Corrupt { peer, .. } => vec![*peer],
        _ => Vec::new(),
    }
}

/// A rank's progress as the agreement carries it: `(seq, finished the data)` in one word.
fn progress_word(seq: u64, complete: bool) -> u64 {
    (seq.min(u64::MAX >> 1) << 1) | u64::from(complete)
}

fn progress_of(word: u64) -> (u64, bool) {
    (word >> 1, word & 1 == 1)
}

/// The root of a rooted collective.
fn root_of(call: &Collective<'_>) -> Option<usize> {
    match call {
        Collective::Broadcast { root, .. } | Collective::Reduce { root, .. } => Some(*root),
        _ => None,
    }
}

/// The input a try starts from: the copy kept before the first try, or the call's own input
/// (which the call does not overwrite).
fn kept_or<'b>(input: TensorRef<'b>, kept: Option<&'b Kept>) -> TensorRef<'b> {
    kept.map_or(input, |k| {
        TensorRef::new(&k.buffer, 0, input.count, input.dtype)
    })
}

/// Bytes of `n` blocks of `c` elements of `es` bytes, if that fits.
fn blocks_bytes(n: usize, c: usize, es: u64) -> Option<u64> {
    (n as u64).checked_mul(c as u64)?.checked_mul(es)
}

fn too_large(at: At) -> Error {
    Error::InvalidArgument {
        at,
        message: "the survivors' buffer does not fit in 64 bits".into(),
    }
}

/// A plan of device copies from the call's input to its output: `(from, to, len)` in elements.
fn copies(pieces: &[(usize, usize, usize)]) -> Plan {
    let mut plan = Plan::default();
    for &(from, to, len) in pieces {
        if len > 0 {
            plan.push(Action::Copy {
                src: Region::new(Buf::Input, from, len),
                dst: Region::new(Buf::Output, to, len),
            });
        }
    }
    plan
}

impl Communicator {
    /// Device copies from `src` to `dst` (of one element type), waited for until `deadline`.
    fn device_copy(
        &mut self,
        at: At,
        src: TensorRef<'_>,
        dst: TensorRef<'_>,
        pieces: &[(usize, usize, usize)],
        deadline: Instant,
    ) -> Result<()> {
        let c = Call {
            at,
            header: bytemuck::Zeroable::zeroed(),
            dtype: src.dtype,
            tensors: Some((src, dst)),
            started: Instant::now(),
            deadline,
        };
        execute(&mut self.engine, self.link.as_ref(), &c, &copies(pieces))
    }

    /// Keeps the call's input (once, before the first try) when the call may overwrite it: an
    /// in-place call, or a plan that writes its input.
    pub(super) fn keep_input(
        &mut self,
        at: At,
        planned: &(Plan, Header, Option<(TensorRef<'_>, TensorRef<'_>)>),
        kept: &mut Option<Kept>,
        deadline: Instant,
    ) -> Result<()> {
        let (plan, _, tensors) = planned;
        let Some((input, output)) = tensors else {
            return Ok(());
        };
        let writes_input = plan
            .actions
            .iter()
            .any(|a| a.writes().is_some_and(|r| r.buf == Buf::Input));
        if kept.is_some() || !(input.overlaps(output) || writes_input) {
            return Ok(());
        }
        let buffer = temp_buffer(self, at, input.bytes())?;
        let copy = TensorRef::new(&buffer, 0, input.count, input.dtype);
        self.device_copy(at, *input, copy, &[(0, 0, input.count)], deadline)?;
        *kept = Some(Kept { buffer });
        Ok(())
    }

    /// The commit round after a call's data: a ring barrier in the call's own frames, so that
    /// this rank returns only once every rank has finished the data.
    pub(super) fn commit(&mut self, call: &Call<'_>) -> Result<()> {
        let c = Call {
            at: call.at,
            header: call.header,
            dtype: call.dtype,
            tensors: None,
            started: call.started,
            deadline: call.deadline,
        };
        let plan = crate::algo::ring_barrier(self.size, self.rank);
        execute(&mut self.engine, self.link.as_ref(), &c, &plan)
    }

    /// Runs `call`, and after a failure finishes it among the survivors (see the module docs).
    pub(super) fn run_surviving(
        &mut self,
        call: Collective<'_>,
        opts: CallOptions,
    ) -> Result<Outcome> {
        let opts = opts.on_failure(OnFailure::FinishAmongSurvivors);
        let n0 = self.size;
        // The call as this rank numbered it when it began (what its errors name).
        let at0 = At {
            rank: self.rank,
            op: Some(call.kind()),
            seq: self.seq.saturating_add(1),
        };
        // The current members, numbered as when the call began.
        let mut members: Vec<usize> = (0..n0).collect();
        let mut kept: Option<Kept> = None;
        let mut failed_at: Option<Instant> = None;
        // The rank the current try takes a broadcast's data from.
        let mut root = root_of(&call);
        let mut last = None;
        // Each round after the first follows an agreement; at most one per rank (a round that
        // excludes nobody is a peer's transient failure: its retry is bounded by the same).
        for round in 0..=n0 {
            let contributors = contributors(&call, &members);
            let attempt = if round == 0 {
                self.attempt(&call, opts, Some(&mut kept))
            } else {
                self.again(&call, &members, root, kept.as_ref(), opts)
            };
            let e = match attempt.result {
                Ok(()) => {
                    return Ok(Outcome {
                        contributors,
                        excluded: (0..n0).filter(|r| !members.contains(r)).collect(),
                        skipped: Vec::new(),
                        recovered_in: failed_at.map(|t| t.elapsed()),
                    });
                }
                Err(e) if !attempt.started && round > 0 => {
                    // A try that could not even start here (its copies failed): the others are
                    // in it already, and must not wait for this rank.
                    self.link.abort(&e.to_string());
                    self.broken = Some(e.clone());
                    return Err(e);
                }
                Err(e) if !attempt.started || !recoverable(&e) => return Err(e),
                Err(e) => e,
            };
            failed_at.get_or_insert_with(Instant::now);
            tracing::info!(error = %e, "finishing the call among the survivors");
            let mine = progress_word(self.seq, attempt.complete);
            let decided = match self.agree_with_progress(&suspects(&e), mine) {
                Ok(d) => d,
                Err(ae) => {
                    // Nothing to go on with: later calls report why.
                    self.agreed = false;
                    self.broken = Some(ae.clone());
                    return Err(ae);
                }
            };
            let failed: Vec<usize> = decided.failed.iter().copied().collect();
            let before = members.clone();
            self.shrink(&failed)?;
            members = before
                .iter()
                .enumerate()
                .filter(|(i, _)| !failed.contains(i))
                .map(|(_, &r)| r)
                .collect();
            let reports: Vec<(usize, u64, bool)> = decided
                .progress
                .iter()
                .filter_map(|(&i, &w)| {
                    before
                        .get(i)
                        .map(|&r| (r, progress_of(w).0, progress_of(w).1))
                })
                .collect();
            let (seq, complete) = progress_of(mine);
            let lowest = reports.iter().map(|x| x.1).min().unwrap_or(seq);
            let whole = reports.iter().filter(|x| x.1 == lowest).all(|x| x.2);
            if seq == lowest && complete && whole {
                // Every survivor holds the whole result: it stands.
                return Ok(Outcome {
                    contributors,
                    excluded: (0..n0).filter(|r| !members.contains(r)).collect(),
                    skipped: Vec::new(),
                    recovered_in: failed_at.map(|t| t.elapsed()),
                });
            }
            if let Some(r) = root
                && !members.contains(&r)
            {
                // A broadcast goes on from the first survivor that received it whole, when all
                // are in the same call (a rank one call ahead cannot know who did).
                let holder = match call {
                    Collective::Broadcast { .. } if seq == lowest => reports
                        .iter()
                        .filter(|x| x.1 == lowest && x.2 && members.contains(&x.0))
                        .map(|x| x.0)
                        .min(),
                    _ => None,
                };
                match holder {
                    Some(h) => root = Some(h),
                    None => {
                        return Err(Error::RootLost {
                            at: at0,
                            root: r,
                            message: match call {
                                Collective::Broadcast { .. } => {
                                    "no survivor received its whole broadcast".into()
                                }
                                _ => "the reduction has no rank to go to".into(),
                            },
                        });
                    }
                }
            }
            last = Some(e);
        }
        let e = last.unwrap_or(Error::InvalidArgument {
            at: at0,
            message: "internal: a recovery without a failure".into(),
        });
        // As many recoveries as ranks and still failing: this rank gives up, and says so.
        self.link.abort(&e.to_string());
        self.broken = Some(e.clone());
        Err(e)
    }

    /// `call` again among `members` (numbered as when the call began; this communicator is
    /// shrunk to them), from the kept input: every try starts from a copy, so a try that fails
    /// leaves the input for the next.
    fn again(
        &mut self,
        call: &Collective<'_>,
        members: &[usize],
        root: Option<usize>,
        kept: Option<&Kept>,
        opts: CallOptions,
    ) -> Attempt {
        let refused = |result| Attempt {
            result,
            complete: false,
            started: false,
        };
        let at = At {
            rank: self.rank,
            op: Some(call.kind()),
            seq: self.seq,
        };
        let deadline = crate::deadline::deadline_after(opts.timeout.unwrap_or(self.config.timeout));
        let n = members.len();
        let me = self.rank;
        let new_index = |r: usize| members.iter().position(|&m| m == r);
        match *call {
            Collective::AllReduce { input, output, op } => {
                let input = kept_or(input, kept);
                if let Err(e) =
                    self.device_copy(at, input, output, &[(0, 0, input.count)], deadline)
                {
                    return refused(Err(e));
                }
                self.attempt(
                    &Collective::AllReduce {
                        input: output,
                        output,
                        op,
                    },
                    opts,
                    None,
                )
            }
            Collective::ReduceScatter { input, output, op } => {
                let input = kept_or(input, kept);
                let c = output.count;
                let es = input.dtype.size() as u64;
                let Some(bytes) = blocks_bytes(n, c, es) else {
                    return refused(Err(too_large(at)));
                };
                let compact = match temp_buffer(self, at, bytes) {
                    Ok(b) => b,
                    Err(e) => return refused(Err(e)),
                };
                let compact = TensorRef::new(&compact, 0, n * c, input.dtype);
                let pieces: Vec<_> = members
                    .iter()
                    .enumerate()
                    .map(|(j, &r)| (r * c, j * c, c))
                    .collect();
                if let Err(e) = self.device_copy(at, input, compact, &pieces, deadline) {
                    return refused(Err(e));
                }
                self.attempt(
                    &Collective::ReduceScatter {
                        input: compact,
                        output,
                        op,
                    },
                    opts,
                    None,
                )
            }
            Collective::AllGather { input, output } => {
                let input = kept_or(input, kept);
                let c = input.count;
                let es = input.dtype.size() as u64;
                let Some(bytes) = blocks_bytes(n, c, es) else {
                    return refused(Err(too_large(at)));
                };
                let gathered = match temp_buffer(self, at, bytes) {
                    Ok(b) => b,
                    Err(e) => return refused(Err(e)),
                };
                let gathered = TensorRef::new(&gathered, 0, n * c, input.dtype);
                if let Err(e) = self.device_copy(at, input, gathered, &[(0, me * c, c)], deadline) {
                    return refused(Err(e));
                }
                let mine = gathered.slice(me * c, c);
                let attempt = self.attempt(
                    &Collective::AllGather {
                        input: mine,
                        output: gathered,
                    },
                    opts,
                    None,
                );
                // Placed once this rank has the whole gather, even if the commit round failed:
                // the recovery may keep it.
                if !attempt.complete {
                    return attempt;
                }
                // The survivors' blocks where the call put them; the failed ranks' zeroed.
                let n0 = output.count / c.max(1);
                let zero = match temp_buffer(self, at, (c as u64).saturating_mul(es)) {
                    Ok(b) => b,
                    Err(e) => {
                        return Attempt {
                            result: Err(e),
                            complete: false,
                            started: false,
                        };
                    }
                };
                let zero = TensorRef::new(&zero, 0, c, input.dtype);
                let absent: Vec<_> = (0..n0)
                    .filter(|r| !members.contains(r))
                    .map(|r| (0, r * c, c))
                    .collect();
                let present: Vec<_> = members
                    .iter()
                    .enumerate()
                    .map(|(j, &r)| (j * c, r * c, c))
                    .collect();
                let placed = self
                    .device_copy(at, gathered, output, &present, deadline)
                    .and_then(|()| self.device_copy(at, zero, output, &absent, deadline));
                match placed {
                    Ok(()) => attempt,
                    Err(e) => Attempt {
                        result: Err(e),
                        complete: false,
                        started: false,
                    },
                }
            }
            Collective::Broadcast { input, output, .. } => {
                let Some(root) = root.and_then(new_index) else {
                    return refused(Err(Error::InvalidArgument {
                        at,
                        message: "internal: no root".into(),
                    }));
                };
                // The original root starts again from its input; a survivor taking over sends
                // the output it received whole.
                if root == me && root_of(call).and_then(new_index) == Some(root) {
                    let input = kept_or(input, kept);
                    if let Err(e) =
                        self.device_copy(at, input, output, &[(0, 0, input.count)], deadline)
                    {
                        return refused(Err(e));
                    }
                }
                self.attempt(
                    &Collective::Broadcast {
                        input: output,
                        output,
                        root,
                    },
                    opts,
                    None,
                )
            }
            Collective::Reduce {
                input, output, op, ..
            } => {
                let Some(root) = root.and_then(new_index) else {
                    return refused(Err(Error::InvalidArgument {
                        at,
                        message: "internal: no root".into(),
                    }));
                };
                let input = kept_or(input, kept);
                let copy = match temp_buffer(self, at, input.bytes()) {
                    Ok(b) => b,
                    Err(e) => return refused(Err(e)),
                };
                let copy = TensorRef::new(&copy, 0, input.count, input.dtype);
                if let Err(e) = self.device_copy(at, input, copy, &[(0, 0, input.count)], deadline)
                {
                    return refused(Err(e));
                }
                let output = if root == me { output } else { copy };
                self.attempt(
                    &Collective::Reduce {
                        input: copy,
                        output,
                        op,
                        root,
                    },
                    opts,
                    None,
                )
            }
            Collective::Barrier => self.attempt(&Collective::Barrier, opts, None),
        }
    }
}
