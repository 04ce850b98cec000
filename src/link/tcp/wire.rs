//! The TCP link's frames on the wire, and their decoder.
//!
//! Every frame starts with a fixed 24-byte prefix, little-endian:
//!
//! | bytes | field | checked |
//! | --- | --- | --- |
//! | 0..2 | `b"WF"` | a stream out of step is an error, not garbage |
//! | 2 | kind: 1 data, 2 abort, 3 bye, 4 ping | known kinds only |
//! | 3 | flags: bit 0 = a CRC32C trailer follows the payload | no other bits |
//! | 4..8 | header length | at most [`MAX_HEADER`] |
//! | 8..16 | payload length | at most the negotiated maximum (abort: [`MAX_REASON`]; bye, ping: 0) |
//! | 16..24 | reserved | zero |
//!
//! Then the header, the payload, and, when flagged (required when checksums were negotiated),
//! a 4-byte CRC32C of prefix, header and payload (the prefix too: a flipped bit must not turn
//! a frame into another kind, or move bytes between header and payload). The checksum is a
//! trailer so that both ends compute it piece by piece ([`PIECE`] bytes) as the bytes pass,
//! while they are in cache, instead of in a second pass over a payload of megabytes.
//!
//! The prefix is checked in full before a byte of the body is allocated: a length over the
//! limit is an error, never an allocation. The body is then read into buffers that grow a
//! piece at a time as bytes arrive, so a peer that announces a large frame and sends nothing
//! costs at most one piece.

use std::io::{self, Read, Write};

use super::super::Frame;

/// Bytes of the fixed prefix of every frame.
pub const PREFIX: usize = 24;
/// The largest frame header (the communicator's headers are under 100 bytes).
pub const MAX_HEADER: u32 = 4096;
/// The largest abort reason, in bytes.
pub const MAX_REASON: u64 = 64 * 1024;

/// The piece of a payload checksummed and moved at once: it fits a core's L2 cache (1 MiB on
/// the EPYC measured), and measured faster than 256 KiB pieces (`BENCHMARKS.md`).
pub const PIECE: usize = 1024 * 1024;

const MAGIC: [u8; 2] = *b"WF";
const FLAG_CRC: u8 = 1;

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A link frame: header and payload for the layer above.
    Data = 1,
    /// The sender gave up; the payload is its reason (UTF-8).
    Abort = 2,
    /// The sender closes its end cleanly: nothing follows.
    Bye = 3,
    /// A keep-alive: nothing to deliver.
    Ping = 4,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Data,
            2 => Kind::Abort,
            3 => Kind::Bye,
            4 => Kind::Ping,
            _ => return None,
        })
    }
}

/// The limits a decoder enforces, negotiated in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest data payload, in bytes.
    pub max_payload: u64,
    /// Whether every frame must carry a CRC32C (both ends asked for checksums).
    pub checksums: bool,
}

/// Why bytes from a peer are not a frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The stream ended (cleanly between frames, or `truncated` inside one).
    #[error("the stream ended{}", if *.truncated { " inside a frame" } else { "" })]
    Eof {
        /// Whether the end cut a frame short.
        truncated: bool,
    },
    /// The socket failed.
    #[error("socket error: {0}")]
    Io(String),
    /// The prefix is malformed (bad magic, kind, flags, reserved bits).
    #[error("malformed frame prefix: {0}")]
    Malformed(String),
    /// A length is over its limit.
    #[error("{what} of {len} bytes is over the limit of {max}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// The length announced.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// The checksum does not match the bytes.
    #[error("CRC32C mismatch: the frame says {expected:#010x}, its bytes give {actual:#010x}")]
    Checksum {
        /// The checksum the frame carries.
        expected: u32,
        /// The checksum of the bytes received.
        actual: u32,
    },
}

/// A decoded prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// What the frame carries.
    pub kind: Kind,
    /// Header bytes that follow.
    pub header_len: u32,
    /// Payload bytes that follow the header.
    pub payload_len: u64,
    /// Whether a CRC32C trailer follows the payload.
    pub checksum: bool,
}

/// Encodes a prefix.
pub fn encode_prefix(p: &Prefix) -> [u8; PREFIX] {
    let mut b = [0u8; PREFIX];
    b[0..2].copy_from_slice(&MAGIC);
    b[2] = p.kind as u8;
    b[3] = if p.checksum { FLAG_CRC } else { 0 };
    b[4..8].copy_from_slice(&p.header_len.to_le_bytes());
    b[8..16].copy_from_slice(&p.payload_len.to_le_bytes());
    b
}

/// Decodes and checks a prefix against `limits`, before anything is allocated for the body.
pub fn decode_prefix(b: &[u8; PREFIX], limits: &Limits) -> Result<Prefix, WireError> {
    if b[0..2] != MAGIC {
        return Err(WireError::Malformed(format!(
            "magic {:02x}{:02x}, not 'WF' (the stream is out of step)",
            b[0], b[1]
        )));
    }
    let kind = Kind::from_u8(b[2])
        .ok_or_else(|| WireError::Malformed(format!("unknown frame kind {}", b[2])))?;
    let flags = b[3];
    if flags & !FLAG_CRC != 0 {
        return Err(WireError::Malformed(format!("unknown flags {flags:#04x}")));
    }
    if b[16..24] != [0; 8] {
        return Err(WireError::Malformed("reserved bytes are not zero".into()));
    }
    let word = |r: std::ops::Range<usize>| -> u64 {
        b[r].iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
    };
    let header_len = word(4..8);
    let payload_len = word(8..16);
    let checksum = flags & FLAG_CRC != 0;
    if limits.checksums && !checksum {
        return Err(WireError::Malformed(
            "the frame has no checksum, but checksums were negotiated".into(),
        ));
    }
    let (max_header, max_payload) = match kind {
        Kind::Data => (u64::from(MAX_HEADER), limits.max_payload),
        Kind::Abort => (0, MAX_REASON),
        Kind::Bye | Kind::Ping => (0, 0),
    };
    if header_len > max_header {
        return Err(WireError::TooLong {
            what: "a frame header",
            len: header_len,
            max: max_header,
        });
    }
    if payload_len > max_payload {
        return Err(WireError::TooLong {
            what: "a frame payload",
            len: payload_len,
            max: max_payload,
        });
    }
    Ok(Prefix {
        kind,
        // Checked against MAX_HEADER (a u32) above.
        header_len: header_len as u32,
        payload_len,
        checksum,
    })
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A link frame.
    Data(Frame),
    /// The peer gave up, with its reason.
    Abort(String),
    /// The peer closes cleanly.
    Bye,
    /// A keep-alive.
    Ping,
}

fn io_error(e: io::Error, truncated: bool) -> WireError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        WireError::Eof { truncated }
    } else {
        WireError::Io(e.to_string())
    }
}

/// Reads exactly `len` bytes into `buf` (cleared first), growing it only as bytes arrive.
fn read_body(r: &mut impl Read, len: u64, buf: &mut Vec<u8>) -> Result<(), WireError> {
    buf.clear();
    let got = r
        .take(len)
        .read_to_end(buf)
        .map_err(|e| io_error(e, true))?;
    if got as u64 != len {
        return Err(WireError::Eof { truncated: true });
    }
    Ok(())
}

/// Reads one frame: the prefix, checked, then its body, into `spare`'s buffers (reused: from
/// the link's pool). A data frame takes them (leaving `spare` empty); other kinds leave them
/// for the next frame.
///
/// A clean end of the stream between frames is `Eof { truncated: false }`.
pub fn read_frame(
    r: &mut impl Read,
    limits: &Limits,
    spare: &mut Frame,
) -> Result<Incoming, WireError> {
    let mut raw = [0u8; PREFIX];
    // The first byte tells a clean end from one inside a frame.
    loop {
        match r.read(&mut raw[..1]) {
            Ok(0) => return Err(WireError::Eof { truncated: false }),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error(e, false)),
        }
    }
    r.read_exact(&mut raw[1..]).map_err(|e| io_error(e, true))?;
    let p = decode_prefix(&raw, limits)?;
    let header = &mut spare.header;
    read_body(r, u64::from(p.header_len), header)?;
    let mut crc = crc32c::crc32c_append(crc32c::crc32c(&raw), header);
    let payload = &mut spare.payload;
    let mut left = p.payload_len;
    let mut filled = 0;
    while left > 0 {
        // Piece by piece: each read straight into the buffer (no copy through the reader's
        // own buffer once a piece is at least its size) and checksummed while in cache. The
        // buffer grows a piece at a time, so a peer that announces a large frame and sends
        // nothing costs one piece. A reused buffer is overwritten where it is long enough
        // already (growing it would first zero what the read then overwrites).
        let n = usize::try_from(left.min(PIECE as u64)).unwrap_or(PIECE);
        let end = filled + n;
        if payload.len() < end {
            payload.resize(end, 0);
        }
        r.read_exact(&mut payload[filled..end])
            .map_err(|e| io_error(e, true))?;
        if p.checksum {
            crc = crc32c::crc32c_append(crc, &payload[filled..end]);
        }
        filled = end;
        left -= n as u64;
    }
    payload.truncate(filled);
    if p.checksum {
        let mut t = [0u8; 4];
        r.read_exact(&mut t).map_err(|e| io_error(e, true))?;
        let expected = u32::from_le_bytes(t);
        if crc != expected {
            return Err(WireError::Checksum {
                expected,
                actual: crc,
            });
        }
    }
    Ok(match p.kind {
        Kind::Data => Incoming::Data(std::mem::take(spare)),
        Kind::Abort => Incoming::Abort(String::from_utf8_lossy(payload).into_owned()),
        Kind::Bye => Incoming::Bye,
        Kind::Ping => Incoming::Ping,
    })
}

/// Writes one frame (prefix, header, payload, and the CRC32C trailer when `checksums`). The
/// prefix and header go through `w`'s buffer; the payload goes to `w`'s inner writer piece by
/// piece, each checksummed just before it is written.
pub fn write_frame<W: Write>(
    w: &mut std::io::BufWriter<W>,
    kind: Kind,
    header: &[u8],
    payload: &[u8],
    checksums: bool,
) -> io::Result<()> {
    let too_long = |_| io::Error::new(io::ErrorKind::InvalidInput, "frame header too long");
    let p = Prefix {
        kind,
        header_len: u32::try_from(header.len()).map_err(too_long)?,
        payload_len: payload.len() as u64,
        checksum: checksums,
    };
    let prefix = encode_prefix(&p);
    w.write_all(&prefix)?;
    w.write_all(header)?;
    let mut crc = if checksums {
        crc32c::crc32c_append(crc32c::crc32c(&prefix), header)
    } else {
        0
    };
    if payload.len() < PIECE {
        if checksums {
            crc = crc32c::crc32c_append(crc, payload);
        }
        w.write_all(payload)?;
    } else {
        w.flush()?;
        for piece in payload.chunks(PIECE) {
            if checksums {
                crc = crc32c::crc32c_append(crc, piece);
            }
            w.get_mut().write_all(piece)?;
        }
    }
    if checksums {
        w.write_all(&crc.to_le_bytes())?;
    }
    Ok(())
}

/// [`write_frame`] into a byte vector (tests, fuzzing).
pub fn encode_frame(kind: Kind, header: &[u8], payload: &[u8], checksums: bool) -> Vec<u8> {
    let mut w = std::io::BufWriter::new(Vec::new());
    // Writing to a Vec cannot fail, and a header over 4 GiB is no test's.
    let _ = write_frame(&mut w, kind, header, payload, checksums);
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_payload: 1 << 24,
        checksums: true,
    };

    fn encoded(kind: Kind, header: &[u8], payload: &[u8]) -> Vec<u8> {
        encode_frame(kind, header, payload, true)
    }

    #[test]
    fn frames_round_trip() {
        let mut bytes = encoded(Kind::Data, &[1, 2, 3], &[9; 1000]);
        bytes.extend(encoded(Kind::Abort, &[], b"why"));
        bytes.extend(encoded(Kind::Ping, &[], &[]));
        bytes.extend(encoded(Kind::Bye, &[], &[]));
        let mut r = &bytes[..];
        assert_eq!(
            read_frame(&mut r, &LIMITS, &mut Frame::default()),
            Ok(Incoming::Data(Frame {
                header: vec![1, 2, 3],
                payload: vec![9; 1000]
            }))
        );
        assert_eq!(
            read_frame(&mut r, &LIMITS, &mut Frame::default()),
            Ok(Incoming::Abort("why".into()))
        );
        assert_eq!(
            read_frame(&mut r, &LIMITS, &mut Frame::default()),
            Ok(Incoming::Ping)
        );
        assert_eq!(
            read_frame(&mut r, &LIMITS, &mut Frame::default()),
            Ok(Incoming::Bye)
        );
        assert_eq!(
            read_frame(&mut r, &LIMITS, &mut Frame::default()),
            Err(WireError::Eof { truncated: false })
        );
    }

    #[test]
    fn a_huge_length_is_refused_before_any_allocation() {
        let mut b = encode_prefix(&Prefix {
            kind: Kind::Data,
            header_len: 0,
            payload_len: u64::MAX,
            checksum: true,
        });
        assert!(matches!(
            decode_prefix(&b, &LIMITS),
            Err(WireError::TooLong { len: u64::MAX, .. })
        ));
        b[2] = Kind::Bye as u8;
        assert!(matches!(
            decode_prefix(&b, &LIMITS),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        // A payload of several pieces, so that the checksum runs piece by piece on both ends.
        let payload: Vec<u8> = (0..PIECE * 2 + 77).map(|i| (i % 253) as u8).collect();
        let clean = encoded(Kind::Data, &[1, 2, 3], &payload);
        assert!(read_frame(&mut &clean[..], &LIMITS, &mut Frame::default()).is_ok());
        // Every byte after the prefix: header, each piece of the payload, the trailer.
        for at in [
            PREFIX,
            PREFIX + 3,
            PREFIX + 3 + PIECE + 5,
            clean.len() - 5,
            clean.len() - 1,
        ] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x10;
            assert!(
                matches!(
                    read_frame(&mut &bytes[..], &LIMITS, &mut Frame::default()),
                    Err(WireError::Checksum { .. })
                ),
                "a flip at byte {at} went unnoticed"
            );
        }
    }

    /// The reader reuses the buffers of earlier frames (the link's pool): a buffer longer than
    /// the next payload must come back holding exactly that payload, a shorter one must grow,
    /// and an abort read into a long buffer must carry only its own reason.
    #[test]
    fn reused_buffers_hold_exactly_each_frame() {
        let long: Vec<u8> = (0..PIECE + 1001).map(|i| (i % 251) as u8).collect();
        let short: Vec<u8> = (0..37).map(|i| (i * 7 % 13) as u8 + 100).collect();
        let mut stream = Vec::new();
        for (kind, payload) in [
            (Kind::Data, &long[..]),
            (Kind::Data, &short[..]),
            (Kind::Abort, b"why".as_slice()),
            (Kind::Data, &long[..]),
            (Kind::Data, &[][..]),
        ] {
            let header: &[u8] = if kind == Kind::Data { &[9] } else { &[] };
            stream.extend(encoded(kind, header, payload));
        }
        let mut r = &stream[..];
        // Every buffer handed back is poisoned and longer than anything read: stale bytes
        // would show.
        let poisoned = || Frame {
            header: vec![0xEE; 64],
            payload: vec![0xEE; 2 * PIECE],
        };
        let mut spare = poisoned();
        let mut next = |spare: &mut Frame| match read_frame(&mut r, &LIMITS, spare) {
            Ok(Incoming::Data(f)) => {
                *spare = poisoned();
                Ok(f)
            }
            Ok(Incoming::Abort(reason)) => Err(reason),
            other => panic!("unexpected {other:?}"),
        };
        // Compared as (header, length, equal?): a mismatch prints lengths, not megabytes.
        let mut check = |what: &str, want: Result<&[u8], &str>| {
            let got = next(&mut spare);
            let ok = match (&got, want) {
                (Ok(f), Ok(p)) => f.header == [9] && f.payload == p,
                (Err(a), Err(b)) => a == b,
                _ => false,
            };
            let shape = got.map(|f| (f.header, f.payload.len()));
            assert!(ok, "{what}: got {shape:?}");
        };
        check("long after a poisoned buffer", Ok(&long));
        check("short into a long buffer", Ok(&short));
        check("abort into a long buffer", Err("why"));
        check("long again", Ok(&long));
        check("empty", Ok(&[]));
    }

    #[test]
    fn truncation_inside_a_frame_is_not_a_clean_end() {
        let bytes = encoded(Kind::Data, &[1], &[2; 50]);
        for cut in 1..bytes.len() {
            assert_eq!(
                read_frame(&mut &bytes[..cut], &LIMITS, &mut Frame::default()),
                Err(WireError::Eof { truncated: true }),
                "cut at {cut}"
            );
        }
    }
}
