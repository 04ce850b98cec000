//! Fuzzing the TCP transport's decoders with seeded random and mutated byte streams: the frame
//! decoder (`wire::read_frame`), both sides of the handshake (`accept_side`, `connect_side`)
//! and the rendezvous store's messages (`read_msg`, `decode_table`).
//!
//! Streams start from valid encodings (frames from `write_frame`, a recorded handshake, store
//! messages) and are then mutated: bit flips, byte replacements, truncation at every kind of
//! boundary, huge lengths spliced into the length fields, concatenations, insertions, replays,
//! or pure random bytes. Every case runs under `catch_unwind` (0 panics), under a counting
//! allocator (bounded memory: a peer's announced length is never an allocation), and with the
//! exact outcome checked where it is known (a valid stream round-trips, a broken checksum is an
//! error, a replayed handshake is refused).
//!
//! The seeds are fixed, so a failure reproduces; the longer, coverage-guided runs are the
//! `cargo fuzz` targets under `fuzz/`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use wccl::link::Frame;
use wccl::link::tcp::handshake::{
    HandshakeError, Hello, MAX_MESSAGE, PROTOCOL_VERSION, Purpose, accept_side, connect_side,
};
use wccl::link::tcp::wire::{
    Incoming, Kind, Limits, MAX_HEADER, MAX_REASON, PIECE, PREFIX, WireError, encode_frame,
    read_frame,
};
use wccl::rendezvous::{decode_table, read_msg};

// ---------------------------------------------------------------------------------------------
// A counting allocator. The counters are per thread: the test harness runs the tests of this
// file on parallel threads, and a case (built, decoded and dropped on one thread) must see only
// its own allocations.

struct Counting;

thread_local! {
    /// Bytes this thread holds now (frees of another thread's blocks make it drift, which
    /// `measure` cancels by working relative to its start).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// The largest `LIVE` since `measure` last reset it.
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the allocator runs while thread-locals are torn down, too.
    let _ = LIVE.try_with(|live| {
        let now = live.get().saturating_add(delta);
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

fn signed(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the counting
// only reads sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is `System::alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(signed(layout.size()));
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, which is `System`'s.
        unsafe { System.dealloc(ptr, layout) };
        note(-signed(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `dealloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The new block counts before the old one is released: a realloc may copy.
            note(signed(new_size));
            note(-signed(layout.size()));
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result with the peak of the bytes it allocated on top of what this
/// thread held before.
fn measure<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get).saturating_sub(base);
    (r, usize::try_from(peak).unwrap_or(0))
}

/// The memory a case may use: twice its input (a buffer grown by doubling) and 1 MiB.
fn memory_bound(input_len: usize) -> usize {
    input_len.saturating_mul(2).saturating_add(1 << 20)
}

// ---------------------------------------------------------------------------------------------
// Running cases.

/// What the cases of one test came to.
#[derive(Default)]
struct Tally {
    cases: usize,
    panics: usize,
    /// Outcomes by name ("ok", or an error's kind).
    outcomes: BTreeMap<String, usize>,
    /// The largest peak allocation of a case, and the input length of that case.
    worst_memory: (usize, usize),
    /// Cases that broke an expectation (the first few, described).
    violations: Vec<String>,
    violation_count: usize,
}

impl Tally {
    /// Runs one case: `f` returns the outcome's name, or `Err` describing a broken expectation.
    fn run(&mut self, what: &str, input_len: usize, f: impl FnOnce() -> Result<String, String>) {
        self.cases += 1;
        let (r, peak) = measure(|| catch_unwind(AssertUnwindSafe(f)));
        match r {
            Err(_) => {
                self.panics += 1;
                self.violation(format!("case {} ({what}) panicked", self.cases));
            }
            Ok(Err(m)) => self.violation(format!("case {} ({what}): {m}", self.cases)),
            Ok(Ok(outcome)) => *self.outcomes.entry(outcome).or_default() += 1,
        }
        if peak > self.worst_memory.0 {
            self.worst_memory = (peak, input_len);
        }
        if peak > memory_bound(input_len) {
            self.violation(format!(
                "case {} ({what}) allocated {peak} bytes for an input of {input_len}",
                self.cases
            ));
        }
    }

    fn violation(&mut self, m: String) {
        self.violation_count += 1;
        if self.violations.len() < 10 {
            self.violations.push(m);
        }
    }

    fn finish(self, name: &str, min_cases: usize) {
        println!(
            "{name}: {} cases, {} panics, worst peak {} bytes (input {} bytes), outcomes {:?}",
            self.cases, self.panics, self.worst_memory.0, self.worst_memory.1, self.outcomes
        );
        assert!(self.cases >= min_cases, "{name}: only {} cases", self.cases);
        assert_eq!(self.panics, 0, "{name}: panics: {:#?}", self.violations);
        assert!(
            self.violations.is_empty(),
            "{name}: {} cases broke an expectation, the first: {:#?}",
            self.violation_count,
            self.violations
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Where a stream's length fields are (offset, width in bytes) and its boundaries lie.
#[derive(Default, Clone)]
struct Fields {
    lengths: Vec<(usize, usize)>,
    boundaries: Vec<usize>,
}

/// Bytes of an input that differ per (case, element) with a period that is no power of two.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((seed.wrapping_mul(31).wrapping_add(i as u64)) % 251) as u8)
        .collect()
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// A huge or edge value for a length field of `width` bytes (`limit`: the decoder's limit).
fn huge(rng: &mut StdRng, width: usize, limit: u64) -> u64 {
    let max = if width >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width)) - 1
    };
    let v = match rng.random_range(0..7) {
        0 => max,
        1 => max / 2 + 1,
        2 => limit,
        3 => limit.saturating_add(1),
        4 => limit.saturating_sub(1),
        5 => 0,
        _ => rng.random::<u64>(),
    };
    v & max
}

fn splice_len(v: &mut [u8], at: usize, width: usize, value: u64) {
    for i in 0..width {
        if let Some(b) = v.get_mut(at + i) {
            *b = (value >> (8 * i)) as u8;
        }
    }
}

/// One random mutation of `v`; returns its name.
fn mutate_once(
    rng: &mut StdRng,
    v: &mut Vec<u8>,
    layout: &Fields,
    donor: &[u8],
    limit: u64,
) -> &'static str {
    match rng.random_range(0..9) {
        0 if !v.is_empty() => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..v.len());
                v[i] ^= 1 << rng.random_range(0..8);
            }
            "bit flips"
        }
        1 if !v.is_empty() => {
            for _ in 0..rng.random_range(1..=4) {
                let i = rng.random_range(0..v.len());
                v[i] = match rng.random_range(0..3) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.random(),
                };
            }
            "byte replacement"
        }
        2 => {
            let cut = match layout.boundaries.len() {
                n if n > 0 && rng.random_bool(0.7) => {
                    let b = layout.boundaries[rng.random_range(0..n)];
                    // At, just before or just after a boundary.
                    match rng.random_range(0..3) {
                        0 => b,
                        1 => b.saturating_sub(1),
                        _ => b.saturating_add(1),
                    }
                }
                _ => rng.random_range(0..=v.len()),
            };
            v.truncate(cut);
            "truncation"
        }
        3 if !layout.lengths.is_empty() => {
            let (at, width) = layout.lengths[rng.random_range(0..layout.lengths.len())];
            let value = huge(rng, width, limit);
            splice_len(v, at, width, value);
            "huge length"
        }
        4 => {
            let more = v.clone();
            match rng.random_range(0..3) {
                0 => v.extend_from_slice(&more),
                1 => v.extend_from_slice(donor),
                _ => {
                    let mut d = donor.to_vec();
                    d.extend_from_slice(&more);
                    *v = d;
                }
            }
            "concatenation"
        }
        5 => {
            let at = rng.random_range(0..=v.len());
            let n = rng.random_range(1..=16);
            let extra = random_bytes(rng, n);
            v.splice(at..at, extra);
            "insertion"
        }
        6 if !v.is_empty() => {
            let at = rng.random_range(0..v.len());
            let n = rng.random_range(1..=16).min(v.len() - at);
            v.drain(at..at + n);
            "deletion"
        }
        7 if !donor.is_empty() && !v.is_empty() => {
            // A chunk of another valid stream over this one.
            let from = rng.random_range(0..donor.len());
            let n = rng.random_range(1..=64).min(donor.len() - from);
            let at = rng.random_range(0..v.len());
            for (i, &b) in donor[from..from + n].iter().enumerate() {
                if let Some(x) = v.get_mut(at + i) {
                    *x = b;
                }
            }
            "splice"
        }
        _ => {
            let n = rng.random_range(0..64);
            v.extend(random_bytes(rng, n));
            "trailing garbage"
        }
    }
}

/// One to three random mutations of `v`.
fn mutate(rng: &mut StdRng, v: &mut Vec<u8>, layout: &Fields, donor: &[u8], limit: u64) {
    for _ in 0..rng.random_range(1..=3) {
        mutate_once(rng, v, layout, donor, limit);
    }
}

// ---------------------------------------------------------------------------------------------
// Frames.

/// A frame to encode, and what it decodes to.
#[derive(Clone, Debug)]
struct Spec {
    kind: Kind,
    header: Vec<u8>,
    payload: Vec<u8>,
}

impl Spec {
    fn expected(&self) -> Incoming {
        match self.kind {
            Kind::Data => Incoming::Data(Frame {
                header: self.header.clone(),
                payload: self.payload.clone(),
            }),
            Kind::Abort => Incoming::Abort(String::from_utf8_lossy(&self.payload).into_owned()),
            Kind::Bye => Incoming::Bye,
            Kind::Ping => Incoming::Ping,
        }
    }
}

fn random_spec(rng: &mut StdRng, seed: u64) -> Spec {
    match rng.random_range(0..10) {
        0..=6 => {
            let header_len = match rng.random_range(0..20) {
                0 => MAX_HEADER as usize,
                1..=4 => 0,
                _ => rng.random_range(1..100),
            };
            let payload_len = match rng.random_range(0..100) {
                0 => rng.random_range(10_000..100_000),
                1..=10 => 0,
                _ => rng.random_range(1..1500),
            };
            Spec {
                kind: Kind::Data,
                header: pattern(seed, header_len),
                payload: pattern(seed.wrapping_add(7), payload_len),
            }
        }
        7 => Spec {
            kind: Kind::Abort,
            header: Vec::new(),
            payload: format!("rank {seed} gave up: reason {}", rng.random::<u32>()).into_bytes(),
        },
        8 => Spec {
            kind: Kind::Bye,
            header: Vec::new(),
            payload: Vec::new(),
        },
        _ => Spec {
            kind: Kind::Ping,
            header: Vec::new(),
            payload: Vec::new(),
        },
    }
}

/// Where one encoded frame lies in a stream.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    body: usize,
    end: usize,
}

/// One frame's bytes, as `write_frame` sends them.
fn frame_bytes(kind: Kind, header: &[u8], payload: &[u8], crc: bool) -> Vec<u8> {
    encode_frame(kind, header, payload, crc)
}

fn encode_frames(specs: &[Spec], crc: bool) -> (Vec<u8>, Vec<Span>, Fields) {
    let mut out = Vec::new();
    let mut spans = Vec::new();
    let mut layout = Fields::default();
    for s in specs {
        let start = out.len();
        out.extend(frame_bytes(s.kind, &s.header, &s.payload, crc));
        let body = start + PREFIX;
        spans.push(Span {
            start,
            body,
            end: out.len(),
        });
        layout.lengths.push((start + 4, 4));
        layout.lengths.push((start + 8, 8));
        layout.boundaries.extend([
            start,
            start + 1,
            start + 2,
            start + 4,
            start + 8,
            start + 16,
            start + 20,
            body,
            body + s.header.len(),
            out.len(),
        ]);
    }
    (out, spans, layout)
}

fn wire_outcome(e: &WireError) -> String {
    match e {
        WireError::Eof { truncated: true } => "eof inside a frame".into(),
        WireError::Eof { truncated: false } => "clean eof".into(),
        WireError::Io(_) => "io".into(),
        WireError::Malformed(_) => "malformed".into(),
        WireError::TooLong { .. } => "too long".into(),
        WireError::Checksum { .. } => "checksum".into(),
    }
}

/// Decodes frames until an error; `check` sees each frame with its index. Returns the count of
/// frames and the error that ended the stream.
fn decode_stream(
    input: &[u8],
    limits: &Limits,
    mut check: impl FnMut(usize, Incoming) -> Result<(), String>,
) -> Result<(usize, WireError), String> {
    let mut r = input;
    // Reused buffers, poisoned: what they held must not leak into a frame (a data frame takes
    // them; other kinds leave them for the next frame, as the link's reader does).
    let mut spare = Frame::default();
    // A stream of n bytes holds at most n / PREFIX frames.
    for i in 0..=input.len() / PREFIX {
        if spare.payload.capacity() == 0 {
            spare = Frame {
                header: vec![0x5a; 11],
                payload: vec![0xa5; 37],
            };
        }
        match read_frame(&mut r, limits, &mut spare) {
            Ok(f) => check(i, f)?,
            Err(e) => return Ok((i, e)),
        }
    }
    Err("more frames decoded than the stream can hold".into())
}

/// The start of a value's `Debug` text (a frame's bytes can run to pages).
fn short(v: &impl std::fmt::Debug) -> String {
    let s = format!("{v:?}");
    match s.char_indices().nth(160) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Checks frames against `specs` one by one (dropping each, so that memory stays the stream's).
fn against(specs: &[Spec]) -> impl FnMut(usize, Incoming) -> Result<(), String> + '_ {
    |i, f| match specs.get(i) {
        Some(s) if s.expected() == f => Ok(()),
        Some(s) => Err(format!(
            "frame {i} decoded as {}, sent as {}",
            short(&f),
            short(s)
        )),
        None => Err(format!("an extra frame {i}: {}", short(&f))),
    }
}

fn random_limits(rng: &mut StdRng, specs: &[Spec], checksums: bool) -> Limits {
    let largest = specs
        .iter()
        .filter(|s| s.kind == Kind::Data)
        .map(|s| s.payload.len() as u64)
        .max()
        .unwrap_or(0);
    Limits {
        max_payload: match rng.random_range(0..5) {
            0 => largest,
            1 => 1 << 20,
            2 => 1 << 30,
            3 => u64::MAX,
            _ => largest.saturating_add(rng.random_range(0..1000)),
        },
        checksums,
    }
}

#[test]
fn the_frame_decoder_survives_60000_mutated_streams() {
    let mut rng = StdRng::seed_from_u64(0x00f1_2a3e);
    let mut t = Tally::default();
    let mut donor: Vec<u8> = Vec::new();
    for case in 0..60_000u64 {
        let n = match rng.random_range(0..10) {
            0..=5 => 1,
            6..=7 => 2,
            _ => rng.random_range(3..=5),
        };
        let specs: Vec<Spec> = (0..n)
            .map(|i| random_spec(&mut rng, case * 8 + i))
            .collect();
        let checksums = rng.random_bool(0.6);
        // A frame may carry a CRC when none was negotiated: it is checked then too.
        let crc = checksums || rng.random_bool(0.5);
        let (valid, spans, layout) = encode_frames(&specs, crc);
        let limits = random_limits(&mut rng, &specs, checksums);
        match rng.random_range(0..100) {
            // A valid stream decodes exactly, then ends cleanly.
            0..=9 => t.run("round trip", valid.len(), || {
                match decode_stream(&valid, &limits, against(&specs))? {
                    (k, WireError::Eof { truncated: false }) if k == specs.len() => Ok("ok".into()),
                    (k, e) => Err(format!("a valid stream ended after {k} frames: {e:?}")),
                }
            }),
            // Cut at a boundary (or anywhere): the frames before the cut decode, and the end is
            // clean exactly when the cut falls between frames.
            10..=24 => {
                let cut = if rng.random_bool(0.8) {
                    let b = layout.boundaries[rng.random_range(0..layout.boundaries.len())];
                    match rng.random_range(0..3) {
                        0 => b,
                        1 => b.saturating_sub(1),
                        _ => (b + 1).min(valid.len()),
                    }
                } else {
                    rng.random_range(0..=valid.len())
                };
                let input = &valid[..cut];
                let whole = spans.iter().filter(|s| s.end <= cut).count();
                let clean = cut == 0 || spans.iter().any(|s| s.end == cut);
                t.run("truncation", input.len(), || {
                    let (k, e) = decode_stream(input, &limits, against(&specs))?;
                    if k == whole && e == (WireError::Eof { truncated: !clean }) {
                        Ok(wire_outcome(&e))
                    } else {
                        Err(format!(
                            "cut at {cut} of {}: {k} frames then {e:?}, expected {whole}",
                            valid.len()
                        ))
                    }
                })
            }
            // A corrupted byte after a frame's prefix (header, payload, or a checksum trailer:
            // all covered by the checksum) is a checksum error, never a frame. CRC32C catches
            // any 1 to 3 flipped bits and any burst of up to 32 bits.
            25..=44 if crc && spans.iter().any(|s| s.end > s.body) => {
                let bodies: Vec<usize> = (0..spans.len())
                    .filter(|&i| spans[i].end > spans[i].body)
                    .collect();
                let target = bodies[rng.random_range(0..bodies.len())];
                let s = spans[target];
                let covered: Vec<usize> = (s.body..s.end).collect();
                let mut input = valid.clone();
                let how = match rng.random_range(0..3) {
                    0 => {
                        let mut at: Vec<usize> = Vec::new();
                        for _ in 0..rng.random_range(1..=3) {
                            let bit = rng.random_range(0..covered.len() * 8);
                            if !at.contains(&bit) {
                                at.push(bit);
                            }
                        }
                        for bit in at {
                            input[covered[bit / 8]] ^= 1 << (bit % 8);
                        }
                        "bit flips"
                    }
                    1 => {
                        let i = covered[rng.random_range(0..covered.len())];
                        input[i] ^= rng.random_range(1..=255u8);
                        "byte replacement"
                    }
                    _ => {
                        // A burst of up to 4 contiguous bytes.
                        let i = rng.random_range(0..covered.len());
                        let mut j = i;
                        while j < covered.len() && j < i + 4 && covered[j] == covered[i] + (j - i) {
                            input[covered[j]] ^= rng.random_range(1..=255u8);
                            j += 1;
                        }
                        "burst"
                    }
                };
                t.run(how, input.len(), || {
                    match decode_stream(&input, &limits, against(&specs))? {
                        (k, WireError::Checksum { .. }) if k == target => Ok("checksum".into()),
                        (k, e) => Err(format!(
                            "{how} in frame {target}: {k} frames then {e:?}, not a checksum error"
                        )),
                    }
                })
            }
            // A huge length spliced into a valid prefix, with a little or nothing behind it:
            // an error, and memory that follows the bytes that came, not the length announced.
            45..=54 => {
                let s = spans[rng.random_range(0..spans.len())];
                let mut input = valid[s.start..s.body].to_vec();
                let (header_len, payload_len) = if rng.random_bool(0.3) {
                    (huge(&mut rng, 4, u64::from(MAX_HEADER)), 0)
                } else {
                    (0, huge(&mut rng, 8, limits.max_payload))
                };
                splice_len(&mut input, 4, 4, header_len);
                splice_len(&mut input, 8, 8, payload_len);
                let behind = rng.random_range(0..200);
                input.extend(pattern(case, behind));
                let announced = header_len.saturating_add(payload_len);
                t.run("huge length", input.len(), || {
                    match decode_stream(&input, &limits, |_, _| Ok(()))? {
                        (1, _) if announced <= behind as u64 => Ok("ok".into()),
                        (0, e) => Ok(wire_outcome(&e)),
                        (k, e) => Err(format!(
                            "{announced} bytes announced, {behind} behind: {k} frames, {e:?}"
                        )),
                    }
                })
            }
            // Pure random bytes, half of them behind a plausible start ("WF", a kind, flags).
            55..=61 => {
                let len = if rng.random_bool(0.05) {
                    rng.random_range(0..8192)
                } else {
                    rng.random_range(0..256)
                };
                let mut input = random_bytes(&mut rng, len);
                if rng.random_bool(0.5) && input.len() >= 4 {
                    input[0..2].copy_from_slice(b"WF");
                    input[2] = rng.random_range(1..=4);
                    input[3] = rng.random_range(0..=1);
                    // The reserved bytes (and a CRC field, where the prefix has one) zero.
                    if input.len() >= PREFIX {
                        input[16..PREFIX].fill(0);
                    }
                }
                t.run("random bytes", input.len(), || {
                    let (_, e) = decode_stream(&input, &limits, |_, _| Ok(()))?;
                    Ok(wire_outcome(&e))
                })
            }
            // Anything else: one to three mutations of any kind; no panic, bounded memory.
            _ => {
                let mut input = valid.clone();
                mutate(&mut rng, &mut input, &layout, &donor, limits.max_payload);
                t.run("mutation", input.len(), || {
                    let (k, e) = decode_stream(&input, &limits, |_, _| Ok(()))?;
                    Ok(if k > 0 {
                        format!("frames then {}", wire_outcome(&e))
                    } else {
                        wire_outcome(&e)
                    })
                })
            }
        }
        if rng.random_bool(0.1) {
            donor = valid;
        }
    }
    t.finish("frames", 60_000);
}

#[test]
fn a_prefix_announcing_more_than_arrives_allocates_only_what_arrives() {
    // Announced lengths at and past the negotiated maximum, with 10 bytes behind: the decoder
    // must wait for bytes, not reserve them (it grows its buffer one piece at a time).
    for (max_payload, announced) in [
        (u64::MAX, u64::MAX),
        (1 << 30, 1 << 30),
        (1 << 40, (1 << 40) - 1),
    ] {
        let limits = Limits {
            max_payload,
            checksums: false,
        };
        let mut input = frame_bytes(Kind::Data, &[], &[], false);
        splice_len(&mut input, 8, 8, announced);
        input.extend_from_slice(&[7; 10]);
        let (r, peak) = measure(|| {
            catch_unwind(AssertUnwindSafe(|| {
                read_frame(&mut &input[..], &limits, &mut Frame::default())
            }))
        });
        assert_eq!(
            r.ok(),
            Some(Err(WireError::Eof { truncated: true })),
            "{announced} bytes announced"
        );
        assert!(
            peak < PIECE + 64 * 1024,
            "{peak} bytes allocated for a frame announcing {announced} bytes"
        );
    }
    // A header of u32::MAX is refused outright.
    let mut input = frame_bytes(Kind::Data, &[], &[], false);
    splice_len(&mut input, 4, 4, u64::from(u32::MAX));
    let limits = Limits {
        max_payload: u64::MAX,
        checksums: false,
    };
    assert!(matches!(
        read_frame(&mut &input[..], &limits, &mut Frame::default()),
        Err(WireError::TooLong { len, .. }) if len == u64::from(u32::MAX)
    ));
    // An abort's reason is bounded by MAX_REASON whatever the negotiated payload.
    let mut input = frame_bytes(Kind::Abort, &[], &[], false);
    splice_len(&mut input, 8, 8, MAX_REASON + 1);
    assert!(matches!(
        read_frame(&mut &input[..], &limits, &mut Frame::default()),
        Err(WireError::TooLong { .. })
    ));
}

/// Found by this fuzzing (and fixed): when the CRC32C covered only header and payload, one
/// flipped bit of the kind turned an empty data frame into a clean goodbye (`Bye`), and a
/// prefix whose header length shrank by what its payload length grew moved bytes from header
/// to payload under the same checksum. The checksum now covers the prefix too.
#[test]
fn a_corrupted_prefix_fails_the_checksum() {
    let limits = Limits {
        max_payload: 1 << 20,
        checksums: true,
    };
    let mut input = frame_bytes(Kind::Data, &[], &[], true);
    input[2] ^= 2; // Data (1) becomes Bye (3)
    let r = read_frame(&mut &input[..], &limits, &mut Frame::default());
    assert!(r.is_err(), "a flipped kind decoded as {r:?}");
    let mut input = frame_bytes(Kind::Data, &[1, 2, 3], &[4, 5], true);
    splice_len(&mut input, 4, 4, 1);
    splice_len(&mut input, 8, 8, 4);
    let r = read_frame(&mut &input[..], &limits, &mut Frame::default());
    assert!(r.is_err(), "a moved header/payload split decoded as {r:?}");
}

// ---------------------------------------------------------------------------------------------
// The handshake.

/// An in-memory connection: reads come from a fixed input, writes go to a sink.
struct Duplex<'a> {
    input: &'a [u8],
    read: usize,
    out: Vec<u8>,
}

impl<'a> Duplex<'a> {
    fn new(input: &'a [u8]) -> Self {
        Duplex {
            input,
            read: 0,
            out: Vec::new(),
        }
    }
}

impl Read for Duplex<'_> {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        let rest = self.input.get(self.read..).unwrap_or(&[]);
        let n = rest.len().min(b.len());
        b[..n].copy_from_slice(&rest[..n]);
        self.read += n;
        Ok(n)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One end of an in-memory pipe between two threads, recording what it sent. Reads wait at
/// most `PIPE_DEADLINE` for the other end.
struct Pipe {
    tx: Sender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
    pending: Vec<u8>,
    at: usize,
    sent: Vec<u8>,
}

const PIPE_DEADLINE: Duration = Duration::from_secs(30);

fn pipe() -> (Pipe, Pipe) {
    let (tx_a, rx_a) = channel();
    let (tx_b, rx_b) = channel();
    let end = |tx, rx| Pipe {
        tx,
        rx,
        pending: Vec::new(),
        at: 0,
        sent: Vec::new(),
    };
    (end(tx_a, rx_b), end(tx_b, rx_a))
}

impl Read for Pipe {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        if self.at == self.pending.len() {
            match self.rx.recv_timeout(PIPE_DEADLINE) {
                Ok(v) => {
                    self.pending = v;
                    self.at = 0;
                }
                Err(RecvTimeoutError::Timeout) => return Err(io::ErrorKind::TimedOut.into()),
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
            }
        }
        let n = (self.pending.len() - self.at).min(b.len());
        b[..n].copy_from_slice(&self.pending[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.sent.extend_from_slice(b);
        self.tx
            .send(b.to_vec())
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const KEY: [u8; 32] = *b"wccl fuzz: a job token's MAC key";
const JOB: &str = "fuzz-job";

fn hello(rank: u32) -> Hello {
    Hello::new(Purpose::Mesh, JOB, rank, 4, 1 << 20, true).expect("a nonce from the OS")
}

/// A real handshake between rank 1 (connector) and rank 0 (acceptor), over an in-memory pipe:
/// returns both hellos and the bytes each side sent.
fn record() -> (Hello, Vec<u8>, Hello, Vec<u8>) {
    let (mut c_end, mut a_end) = pipe();
    let a = hello(0);
    let c = hello(1);
    let acceptor = {
        let a = a.clone();
        std::thread::spawn(move || {
            let r = accept_side(&mut a_end, &a, &KEY);
            (r, a_end.sent)
        })
    };
    let cr = connect_side(&mut c_end, &c, Some(0), &KEY);
    let c_sent = std::mem::take(&mut c_end.sent);
    // The acceptor sees the end of the stream, not a deadline, if anything went wrong.
    drop(c_end);
    let (ar, a_sent) = acceptor.join().expect("the recording acceptor");
    assert_eq!(cr.expect("the recorded connector").peer, a);
    assert_eq!(ar.expect("the recorded acceptor").peer, c);
    (c, c_sent, a, a_sent)
}

/// The layout of a stream of handshake messages (`type | length u16 | body`): the length
/// fields, a hello's inner length-like fields, and every boundary.
fn handshake_layout(bytes: &[u8]) -> Fields {
    let mut l = Fields::default();
    let mut at = 0;
    while at + 3 <= bytes.len() {
        let len = usize::from(u16::from_le_bytes([bytes[at + 1], bytes[at + 2]]));
        l.lengths.push((at + 1, 2));
        l.boundaries.extend([at, at + 1, at + 3, at + 3 + len]);
        if bytes[at] == 1 {
            // A hello: rank, size, the largest payload, the job id's length.
            l.lengths
                .extend([(at + 15, 4), (at + 19, 4), (at + 23, 8), (at + 63, 1)]);
            l.boundaries.extend([at + 11, at + 63, at + 64]);
        }
        at += 3 + len;
    }
    l
}

fn message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u16).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// A hello body with random (mostly plausible) fields, encoded as the handshake lays it out.
fn random_hello(rng: &mut StdRng) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(if rng.random_bool(0.9) {
        b"WCCLTCP\0"
    } else {
        b"WCCLTCQ\0"
    });
    let version = if rng.random_bool(0.8) {
        PROTOCOL_VERSION
    } else {
        rng.random()
    };
    b.extend_from_slice(&version.to_le_bytes());
    b.push(match rng.random_range(0..4) {
        0 => 1,
        1 | 2 => 2,
        _ => rng.random(),
    });
    b.push(if rng.random_bool(0.8) {
        rng.random_range(0..=1)
    } else {
        rng.random()
    });
    let rank: u32 = match rng.random_range(0..4) {
        0 => u32::MAX,
        1 => rng.random(),
        _ => rng.random_range(0..6),
    };
    let size: u32 = if rng.random_bool(0.7) {
        4
    } else {
        rng.random()
    };
    b.extend_from_slice(&rank.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&huge(rng, 8, 1 << 20).to_le_bytes());
    b.extend(random_bytes(rng, 32));
    let job: Vec<u8> = match rng.random_range(0..4) {
        0 => JOB.as_bytes().to_vec(),
        1 => vec![0xff; rng.random_range(1..=255)],
        2 => vec![b'j'; 255],
        _ => {
            let n = rng.random_range(0..=255);
            random_bytes(rng, n)
        }
    };
    let job_len = if rng.random_bool(0.8) {
        job.len() as u8
    } else {
        rng.random()
    };
    b.push(job_len);
    b.extend_from_slice(&job);
    b
}

fn handshake_outcome(r: &Result<wccl::link::tcp::handshake::Agreed, HandshakeError>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(HandshakeError::Refused(_)) => "refused".into(),
        Err(HandshakeError::Rejected(_)) => "rejected".into(),
        Err(HandshakeError::Broken(_)) => "broken".into(),
    }
}

/// A handshake that succeeded must have read exactly the valid transcript: any change to the
/// bytes it consumed is refused.
fn only_the_transcript(
    r: &Result<wccl::link::tcp::handshake::Agreed, HandshakeError>,
    d: &Duplex<'_>,
    transcript: &[u8],
) -> Result<String, String> {
    if r.is_ok() && d.input.get(..d.read) != Some(transcript) {
        return Err(format!(
            "a handshake agreed on {} bytes that are not the {}-byte transcript",
            d.read,
            transcript.len()
        ));
    }
    Ok(handshake_outcome(r))
}

#[test]
fn the_handshake_survives_40000_mutated_and_replayed_transcripts() {
    let (c, ct, a, at) = record();
    let mut rng = StdRng::seed_from_u64(0x0_4a5d_5a4e);
    let mut t = Tally::default();
    let ct_layout = handshake_layout(&ct);
    let at_layout = handshake_layout(&at);
    for _ in 0..40_000 {
        match rng.random_range(0..100) {
            // The recorded transcripts, replayed to the same hellos (same nonces): both sides
            // agree, and say exactly what they said the first time.
            0..=4 => {
                t.run("acceptor round trip", ct.len(), || {
                    let mut d = Duplex::new(&ct);
                    let r = accept_side(&mut d, &a, &KEY);
                    match &r {
                        Ok(ag) if ag.peer == c && d.out == at && d.read == ct.len() => {
                            Ok("ok".into())
                        }
                        _ => Err(format!("the recorded connector gave {r:?}")),
                    }
                });
                t.run("connector round trip", at.len(), || {
                    let mut d = Duplex::new(&at);
                    let r = connect_side(&mut d, &c, Some(0), &KEY);
                    match &r {
                        Ok(ag) if ag.peer == a && d.out == ct && d.read == at.len() => {
                            Ok("ok".into())
                        }
                        _ => Err(format!("the recorded acceptor gave {r:?}")),
                    }
                });
            }
            // A replay to a fresh acceptor (a new nonce) is refused for its proof, mutated or
            // not.
            5..=14 => {
                let fresh = hello(0);
                let mut input = ct.clone();
                let mutated = rng.random_bool(0.3);
                if mutated {
                    mutate(&mut rng, &mut input, &ct_layout, &at, MAX_MESSAGE as u64);
                }
                t.run("replay", input.len(), || {
                    let mut d = Duplex::new(&input);
                    let r = accept_side(&mut d, &fresh, &KEY);
                    match &r {
                        Ok(_) => Err("a replayed transcript was accepted".into()),
                        Err(HandshakeError::Rejected(m))
                            if !mutated && !m.contains("job token") =>
                        {
                            Err(format!("a replay refused for another reason: {m}"))
                        }
                        Err(HandshakeError::Rejected(_)) => Ok("rejected".into()),
                        Err(_) if mutated => Ok(handshake_outcome(&r)),
                        Err(e) => Err(format!("a replay failed otherwise: {e:?}")),
                    }
                })
            }
            // A mutated connector transcript to the acceptor.
            15..=49 => {
                let mut input = ct.clone();
                mutate(&mut rng, &mut input, &ct_layout, &at, MAX_MESSAGE as u64);
                t.run("mutated connector", input.len(), || {
                    let mut d = Duplex::new(&input);
                    let r = accept_side(&mut d, &a, &KEY);
                    only_the_transcript(&r, &d, &ct)
                })
            }
            // A mutated acceptor transcript to the connector.
            50..=74 => {
                let mut input = at.clone();
                mutate(&mut rng, &mut input, &at_layout, &ct, MAX_MESSAGE as u64);
                t.run("mutated acceptor", input.len(), || {
                    let mut d = Duplex::new(&input);
                    let r = connect_side(&mut d, &c, Some(0), &KEY);
                    only_the_transcript(&r, &d, &at)
                })
            }
            // Hellos with random fields, then a proof that cannot be right.
            75..=89 => {
                let mut input = message(1, &random_hello(&mut rng));
                let proof = match rng.random_range(0..3) {
                    // The recorded one: right for another pair of nonces.
                    0 => ct[ct.len() - 35..].to_vec(),
                    1 => message(2, &random_bytes(&mut rng, 32)),
                    _ => {
                        let n = rng.random_range(0..100);
                        message(rng.random_range(0..6), &random_bytes(&mut rng, n))
                    }
                };
                input.extend(proof);
                let to_acceptor = rng.random_bool(0.6);
                if !to_acceptor {
                    input.extend(message(3, &[]));
                }
                t.run("random hello", input.len(), || {
                    let mut d = Duplex::new(&input);
                    let r = if to_acceptor {
                        accept_side(&mut d, &a, &KEY)
                    } else {
                        connect_side(&mut d, &c, None, &KEY)
                    };
                    match r {
                        Ok(_) => Err("a random hello and proof were accepted".into()),
                        Err(_) => Ok(handshake_outcome(&r)),
                    }
                })
            }
            // Pure random bytes, some behind a plausible message head.
            _ => {
                let n = rng.random_range(0..2000);
                let mut input = random_bytes(&mut rng, n);
                if rng.random_bool(0.5) && input.len() >= 3 {
                    input[0] = rng.random_range(1..=4);
                    let len = rng.random_range(0..=MAX_MESSAGE + 2) as u16;
                    input[1..3].copy_from_slice(&len.to_le_bytes());
                }
                let to_acceptor = rng.random_bool(0.5);
                t.run("random bytes", input.len(), || {
                    let mut d = Duplex::new(&input);
                    let r = if to_acceptor {
                        accept_side(&mut d, &a, &KEY)
                    } else {
                        connect_side(&mut d, &c, Some(0), &KEY)
                    };
                    match r {
                        Ok(_) => Err("random bytes were accepted".into()),
                        Err(_) => Ok(handshake_outcome(&r)),
                    }
                })
            }
        }
    }
    t.finish("handshake", 40_000);
}

#[test]
fn a_handshake_message_announcing_64_kib_is_refused_without_allocating_it() {
    let a = hello(0);
    for len in [u16::MAX, (MAX_MESSAGE + 1) as u16] {
        let mut input = vec![1];
        input.extend_from_slice(&len.to_le_bytes());
        input.extend_from_slice(&[9; 10]);
        let (r, peak) = measure(|| accept_side(&mut Duplex::new(&input), &a, &KEY));
        assert!(
            matches!(&r, Err(HandshakeError::Broken(m)) if m.contains("at most")),
            "{r:?}"
        );
        assert!(peak < 16 * 1024, "{peak} bytes allocated");
    }
}

// ---------------------------------------------------------------------------------------------
// The rendezvous store.

fn random_table(rng: &mut StdRng) -> Vec<SocketAddr> {
    (0..rng.random_range(1..=6))
        .map(|_| {
            let port = rng.random();
            if rng.random_bool(0.7) {
                SocketAddr::from((rng.random::<[u8; 4]>(), port))
            } else {
                SocketAddr::from((rng.random::<[u16; 8]>(), port))
            }
        })
        .collect()
}

/// The table's encoding: per rank, a length byte and the address's text.
fn encode_table(table: &[SocketAddr]) -> Vec<u8> {
    let mut b = Vec::new();
    for a in table {
        let s = a.to_string();
        b.push(s.len() as u8);
        b.extend_from_slice(s.as_bytes());
    }
    b
}

fn store_message(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind];
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// Reads store messages until an error; a table body is decoded for `size` ranks.
fn read_store_stream(input: &[u8], size: usize) -> Result<Vec<(u8, Vec<u8>)>, String> {
    let mut r = input;
    let mut out = Vec::new();
    // A message takes at least 5 bytes.
    for _ in 0..=input.len() / 5 {
        match read_msg(&mut r) {
            Ok((kind, body)) => {
                if kind == 2 {
                    let _ = decode_table(&body, size);
                }
                out.push((kind, body));
            }
            Err(_) => return Ok(out),
        }
    }
    Err("more messages than the stream can hold".into())
}

#[test]
fn the_store_decoders_survive_10000_mutated_messages() {
    let mut rng = StdRng::seed_from_u64(0x0_5702e);
    let mut t = Tally::default();
    for case in 0..10_000u64 {
        let table = random_table(&mut rng);
        let body = encode_table(&table);
        let mut valid = Vec::new();
        let mut layout = Fields::default();
        let mut sent = Vec::new();
        for m in 0..rng.random_range(1..=3) {
            let (kind, b) = match (m + rng.random_range(0..3)) % 3 {
                0 => (1, rng.random::<u16>().to_le_bytes().to_vec()),
                1 => (2, body.clone()),
                _ => (3, format!("rank {case} did not register").into_bytes()),
            };
            let at = valid.len();
            layout.lengths.push((at + 1, 4));
            layout
                .boundaries
                .extend([at, at + 1, at + 5, at + 5 + b.len()]);
            valid.extend(store_message(kind, &b));
            sent.push((kind, b));
        }
        match rng.random_range(0..10) {
            // Valid messages round-trip, and so does the table.
            0 => t.run("round trip", valid.len(), || {
                let got = read_store_stream(&valid, table.len())?;
                if got != sent {
                    return Err(format!("{sent:?} came back as {got:?}"));
                }
                match decode_table(&body, table.len()) {
                    Ok(t) if t == table => Ok("ok".into()),
                    other => Err(format!("the table {table:?} decoded as {other:?}")),
                }
            }),
            // A huge length with a little behind it: an error, and no allocation for it.
            1 => {
                let mut input = valid[..5].to_vec();
                let len = huge(&mut rng, 4, 1 << 20);
                splice_len(&mut input, 1, 4, len);
                let behind = rng.random_range(0..100);
                input.extend(pattern(case, behind));
                t.run("huge length", input.len(), || {
                    match read_msg(&mut &input[..]) {
                        Ok((_, b)) if b.len() as u64 == len => Ok("ok".into()),
                        Ok((_, b)) => Err(format!("{len} announced, {} read", b.len())),
                        Err(_) => Ok("error".into()),
                    }
                })
            }
            // A mutated table straight to the table decoder.
            2..=4 => {
                let mut input = body.clone();
                let mut tl = Fields::default();
                let mut at = 0;
                for a in &table {
                    let n = a.to_string().len();
                    tl.lengths.push((at, 1));
                    tl.boundaries.extend([at, at + 1, at + 1 + n]);
                    at += 1 + n;
                }
                mutate(&mut rng, &mut input, &tl, &valid, 255);
                let size = if rng.random_bool(0.8) {
                    table.len()
                } else {
                    rng.random_range(0..10)
                };
                t.run("mutated table", input.len(), || {
                    Ok(match decode_table(&input, size) {
                        Ok(_) => "ok".into(),
                        Err(_) => "error".into(),
                    })
                })
            }
            // Anything else: mutated message streams.
            _ => {
                let mut input = valid.clone();
                mutate(&mut rng, &mut input, &layout, &body, 1 << 20);
                t.run("mutated messages", input.len(), || {
                    let got = read_store_stream(&input, table.len())?;
                    Ok(if got.is_empty() {
                        "error"
                    } else {
                        "messages then error"
                    }
                    .into())
                })
            }
        }
    }
    t.finish("store", 10_000);
}

#[test]
fn a_store_message_announcing_the_maximum_allocates_only_what_arrives() {
    for len in [1u32 << 20, u32::MAX] {
        let mut input = store_message(2, &[]);
        splice_len(&mut input, 1, 4, u64::from(len));
        input.extend_from_slice(b"1.2.3.4:5");
        let (r, peak) = measure(|| read_msg(&mut &input[..]));
        assert!(r.is_err(), "{len} bytes announced: {r:?}");
        assert!(
            peak < 64 * 1024,
            "{peak} bytes allocated for {len} announced"
        );
    }
}
