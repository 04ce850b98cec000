//! The checkpoint of one server's shard: its byte format, and how it is written and read back.
//!
//! A checkpoint holds what a server needs to resume training where it stopped: for every key it
//! holds (as primary or backup) the key's id, name, version (the updates applied so far), its
//! parameters and the update rule's state (the momentum), plus the server's rank and the rule's
//! hyper-parameters. The last three are there so that a restore into a server configured
//! differently is refused with a message naming the difference, instead of silently training
//! from the wrong state.
//!
//! Layout, all integers little-endian, every f32 as its IEEE-754 bits:
//!
//! | field                                       | bytes          |
//! |---------------------------------------------|----------------|
//! | magic `WCCLCKPT`                            | 8              |
//! | format version ([`FORMAT_VERSION`])         | 4 (u32)        |
//! | server rank                                 | 4 (u32)        |
//! | the rule's hyper-parameters                 | 16 (4 x f32)   |
//! | key count                                   | 8 (u64)        |
//! | per key: id                                 | 4 (u32)        |
//! | per key: name length, then the UTF-8 name   | 8 (u64) + n    |
//! | per key: version                            | 8 (u64)        |
//! | per key: parameter count, then parameters   | 8 (u64) + 4 n  |
//! | per key: state count, then state            | 8 (u64) + 4 n  |
//! | crc32c (Castagnoli) of every byte before it | 4 (u32)        |
//!
//! Lengths are u64 so that encoding a snapshot cannot fail on any size. Decoding checks each
//! length against the bytes left before it slices or allocates anything, so a corrupt length is
//! reported as a truncated or corrupt file rather than allocating gigabytes or panicking. The
//! checksum is compared once the structure has been walked and before any content is
//! interpreted, so a flipped byte inside a name reads as corruption, not as a bad name.
//!
//! Writing is atomic: the bytes go to a fresh temporary file in the target's directory, which is
//! synced, renamed over the target, and the directory is synced. A process killed at any point
//! leaves either the previous checkpoint or the new one under the target's name, never a mix.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The first bytes of every checkpoint.
pub(crate) const MAGIC: [u8; 8] = *b"WCCLCKPT";

/// The layout version this build writes and the only one it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

/// One key of a server's shard, as saved.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct KeySnapshot {
    /// The key's id (its index among the builder's parameters).
    pub id: u32,
    /// The key's name, as given to the builder.
    pub name: String,
    /// The key's version: how many updates it has had.
    pub version: u64,
    /// The parameters.
    pub w: Vec<f32>,
    /// The update rule's state (momentum), one value per parameter.
    pub m: Vec<f32>,
}

/// Everything one server saves: its rank, its rule's hyper-parameters and the keys it holds.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Snapshot {
    /// The server's rank.
    pub rank: u32,
    /// The update rule's hyper-parameters ([`super::UpdateRule::hyper`]), kept so that a restore
    /// under another rule is detected.
    pub hyper: [f32; 4],
    /// The keys, in the server's order.
    pub keys: Vec<KeySnapshot>,
}

/// Where the bytes being decoded came from, for error messages: a file, or memory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Origin(pub Option<PathBuf>);

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(path) => write!(f, "checkpoint '{}'", path.display()),
            None => f.write_str("the checkpoint"),
        }
    }
}

/// Why a checkpoint could not be written, read, or restored into a server.
///
/// Errors found in the bytes name the file where it is known ([`CheckpointError::with_path`]).
/// None of them leaves anything overwritten: a failed write leaves the previous checkpoint in
/// place, and reading never writes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckpointError {
    /// A file operation failed.
    #[error("could not {action} '{}': {cause}", .path.display())]
    Io {
        /// What was being done, as a verb phrase ("read", "sync").
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        cause: io::Error,
    },

    /// The target path of a write names no file (it is empty, `/` or ends in `..`).
    #[error("cannot write a checkpoint to '{}': the path names no file", .path.display())]
    NotAFile {
        /// The path given.
        path: PathBuf,
    },

    /// The temporary file was complete and synced, but renaming it over the target failed; the
    /// temporary file was removed and the previous checkpoint is untouched.
    #[error("could not rename '{}' over '{}': {cause}", .from.display(), .to.display())]
    Rename {
        /// The temporary file.
        from: PathBuf,
        /// The target.
        to: PathBuf,
        /// The operating system's error.
        cause: io::Error,
    },

    /// The new checkpoint is in place but its directory could not be synced, so the rename may
    /// not survive a power loss.
    #[error(
        "checkpoint '{}' was renamed into place but its directory could not be synced, so it may \
         not survive a power loss: {cause}",
        .path.display()
    )]
    DirSync {
        /// The checkpoint.
        path: PathBuf,
        /// The operating system's error.
        cause: io::Error,
    },

    /// The bytes do not start with [`MAGIC`].
    #[error(
        "{origin} is not a wccl checkpoint: it starts with {found:02x?}, not the magic bytes \"WCCLCKPT\""
    )]
    NotACheckpoint {
        /// Where the bytes came from.
        origin: Origin,
        /// Its first bytes (at most 8).
        found: Vec<u8>,
    },

    /// The format version is not [`FORMAT_VERSION`].
    #[error("{origin} has format version {found}; this build reads version {supported} only")]
    UnsupportedVersion {
        /// Where the bytes came from.
        origin: Origin,
        /// The version in the file.
        found: u32,
        /// The version this build reads.
        supported: u32,
    },

    /// A field runs past the end of the bytes.
    #[error("{origin} is truncated: reading {what} needs {needed} bytes but only {left} are left")]
    Truncated {
        /// Where the bytes came from.
        origin: Origin,
        /// The field being read.
        what: String,
        /// The bytes it needs.
        needed: u64,
        /// The bytes left.
        left: u64,
    },

    /// A count claims more bytes than a u64 can number: the file is corrupt.
    #[error(
        "{origin} is corrupt: it claims {count} values for {what}, more bytes than any file holds"
    )]
    LengthOverflow {
        /// Where the bytes came from.
        origin: Origin,
        /// The field that holds the count.
        what: String,
        /// The count.
        count: u64,
    },

    /// Bytes follow the checksum: a length was corrupted, or the file was appended to.
    #[error("{origin} is corrupt: {extra} bytes follow its checksum")]
    TrailingBytes {
        /// Where the bytes came from.
        origin: Origin,
        /// How many.
        extra: u64,
    },

    /// The stored checksum does not match the contents.
    #[error(
        "{origin} is corrupt: its stored crc32c is {stored:#010x} but its contents hash to \
         {computed:#010x}"
    )]
    ChecksumMismatch {
        /// Where the bytes came from.
        origin: Origin,
        /// The checksum in the file.
        stored: u32,
        /// The checksum of the contents.
        computed: u32,
    },

    /// A key's name is not UTF-8 (in a file whose checksum matches: the writer was wrong).
    #[error("{origin} is invalid: the name of key #{index} (id {id}) is not UTF-8: {cause}")]
    BadName {
        /// Where the bytes came from.
        origin: Origin,
        /// The key's position in the checkpoint.
        index: usize,
        /// The key's id.
        id: u32,
        /// Where the UTF-8 breaks.
        cause: std::str::Utf8Error,
    },

    /// A key has a different number of parameters and optimiser-state values.
    #[error("{origin} is invalid: key '{name}' has {w} parameters but {m} optimiser-state values")]
    StateLength {
        /// Where the snapshot came from (or was to be written to).
        origin: Origin,
        /// The key.
        name: String,
        /// Its parameter count.
        w: usize,
        /// Its state count.
        m: usize,
    },

    /// The checkpoint belongs to another server rank.
    #[error("{origin} belongs to server rank {checkpoint}; this is server rank {server}")]
    RankMismatch {
        /// Where the snapshot came from.
        origin: Origin,
        /// The rank in the checkpoint.
        checkpoint: u32,
        /// The restoring server's rank.
        server: u32,
    },

    /// The checkpoint was written under another update rule.
    #[error(
        "{origin} was written with update-rule hyper-parameters {checkpoint:?}; the server runs \
         with {server:?}"
    )]
    RuleMismatch {
        /// Where the snapshot came from.
        origin: Origin,
        /// The hyper-parameters in the checkpoint.
        checkpoint: [f32; 4],
        /// The restoring server's.
        server: [f32; 4],
    },

    /// At some position the checkpoint holds another key than the server.
    #[error(
        "{origin} holds key '{checkpoint_name}' (id {checkpoint_id}) at position {index}, where \
         the server holds key '{server_name}' (id {server_id})"
    )]
    KeyMismatch {
        /// Where the snapshot came from.
        origin: Origin,
        /// The position.
        index: usize,
        /// The checkpoint's key id there.
        checkpoint_id: u32,
        /// The checkpoint's key name there.
        checkpoint_name: String,
        /// The server's key id there.
        server_id: u32,
        /// The server's key name there.
        server_name: String,
    },

    /// The server holds a key the checkpoint lacks.
    #[error("{origin} lacks key '{name}' (id {id}, position {index}) that the server holds")]
    MissingKey {
        /// Where the snapshot came from.
        origin: Origin,
        /// The key's position on the server.
        index: usize,
        /// Its id.
        id: u32,
        /// Its name.
        name: String,
    },

    /// The checkpoint holds a key the server does not.
    #[error("{origin} holds key '{name}' (id {id}, position {index}) that the server does not")]
    ExtraKey {
        /// Where the snapshot came from.
        origin: Origin,
        /// The key's position in the checkpoint.
        index: usize,
        /// Its id.
        id: u32,
        /// Its name.
        name: String,
    },

    /// A key has another element count in the checkpoint than on the server.
    #[error("key '{name}' has {checkpoint} elements in {origin}, the server holds {server}")]
    ShapeMismatch {
        /// Where the snapshot came from.
        origin: Origin,
        /// The key.
        name: String,
        /// Its element count in the checkpoint.
        checkpoint: usize,
        /// Its element count on the server.
        server: usize,
    },

    /// Only from the test hook `write_atomic_failing_after`: the write stopped as if the
    /// process had been killed, leaving the partial temporary file behind.
    #[error("simulated kill after writing {written} bytes of '{}'", .temp.display())]
    SimulatedKill {
        /// The temporary file left behind.
        temp: PathBuf,
        /// The bytes written to it.
        written: usize,
    },
}

impl CheckpointError {
    /// Names `path` as the checkpoint in an error found in its bytes or its snapshot (errors
    /// that already name a file are returned unchanged).
    pub(crate) fn with_path(mut self, path: &Path) -> Self {
        // (No let-chains: the crate's MSRV is 1.87.)
        if let Some(origin) = self.origin_mut() {
            if origin.0.is_none() {
                origin.0 = Some(path.to_path_buf());
            }
        }
        self
    }

    fn origin_mut(&mut self) -> Option<&mut Origin> {
        use CheckpointError as E;
        match self {
            E::NotACheckpoint { origin, .. }
            | E::UnsupportedVersion { origin, .. }
            | E::Truncated { origin, .. }
            | E::LengthOverflow { origin, .. }
            | E::TrailingBytes { origin, .. }
            | E::ChecksumMismatch { origin, .. }
            | E::BadName { origin, .. }
            | E::StateLength { origin, .. }
            | E::RankMismatch { origin, .. }
            | E::RuleMismatch { origin, .. }
            | E::KeyMismatch { origin, .. }
            | E::MissingKey { origin, .. }
            | E::ExtraKey { origin, .. }
            | E::ShapeMismatch { origin, .. } => Some(origin),
            E::Io { .. }
            | E::NotAFile { .. }
            | E::Rename { .. }
            | E::DirSync { .. }
            | E::SimulatedKill { .. } => None,
        }
    }
}

type Result<T> = std::result::Result<T, CheckpointError>;

impl Snapshot {
    /// Checks that this snapshot can be restored into server `rank`, which runs a rule with
    /// hyper-parameters `hyper` and holds the keys `expected` as (id, name, element count), in
    /// order. The error names the first difference.
    pub(crate) fn check_against(
        &self,
        rank: u32,
        hyper: [f32; 4],
        expected: &[(u32, &str, usize)],
    ) -> Result<()> {
        self.validate()?;
        if self.rank != rank {
            return Err(CheckpointError::RankMismatch {
                origin: Origin::default(),
                checkpoint: self.rank,
                server: rank,
            });
        }
        // Bitwise: the rule must be the same one, and NaN never equals itself.
        if self.hyper.map(f32::to_bits) != hyper.map(f32::to_bits) {
            return Err(CheckpointError::RuleMismatch {
                origin: Origin::default(),
                checkpoint: self.hyper,
                server: hyper,
            });
        }
        let positions = self.keys.len().max(expected.len());
        for index in 0..positions {
            match (self.keys.get(index), expected.get(index)) {
                (Some(key), Some(&(id, name, len))) => {
                    if key.id != id || key.name != name {
                        return Err(CheckpointError::KeyMismatch {
                            origin: Origin::default(),
                            index,
                            checkpoint_id: key.id,
                            checkpoint_name: key.name.clone(),
                            server_id: id,
                            server_name: name.to_owned(),
                        });
                    }
                    if key.w.len() != len {
                        return Err(CheckpointError::ShapeMismatch {
                            origin: Origin::default(),
                            name: key.name.clone(),
                            checkpoint: key.w.len(),
                            server: len,
                        });
                    }
                }
                (Some(key), None) => {
                    return Err(CheckpointError::ExtraKey {
                        origin: Origin::default(),
                        index,
                        id: key.id,
                        name: key.name.clone(),
                    });
                }
                (None, Some(&(id, name, _))) => {
                    return Err(CheckpointError::MissingKey {
                        origin: Origin::default(),
                        index,
                        id,
                        name: name.to_owned(),
                    });
                }
                (None, None) => break,
            }
        }
        Ok(())
    }

    /// Every key has as many state values as parameters: a snapshot that breaks this could be
    /// written but never read back, so it is refused before anything is written.
    fn validate(&self) -> Result<()> {
        match self.keys.iter().find(|k| k.w.len() != k.m.len()) {
            Some(key) => Err(CheckpointError::StateLength {
                origin: Origin::default(),
                name: key.name.clone(),
                w: key.w.len(),
                m: key.m.len(),
            }),
            None => Ok(()),
        }
    }

    /// The encoded size, for one allocation; saturating, as it is only a capacity hint.
    fn encoded_len(&self) -> usize {
        let header = MAGIC.len() + 4 + 4 + 16 + 8;
        self.keys.iter().fold(header.saturating_add(4), |acc, k| {
            let floats = k.w.len().saturating_add(k.m.len()).saturating_mul(4);
            acc.saturating_add(4 + 8 + 8 + 8 + 8)
                .saturating_add(k.name.len())
                .saturating_add(floats)
        })
    }
}

/// The checkpoint's bytes: see the module docs for the layout.
pub(crate) fn encode(snap: &Snapshot) -> Vec<u8> {
    let mut out = Vec::with_capacity(snap.encoded_len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&snap.rank.to_le_bytes());
    for h in snap.hyper {
        out.extend_from_slice(&h.to_le_bytes());
    }
    // usize -> u64 is lossless on every platform Rust supports.
    out.extend_from_slice(&(snap.keys.len() as u64).to_le_bytes());
    for key in &snap.keys {
        out.extend_from_slice(&key.id.to_le_bytes());
        out.extend_from_slice(&(key.name.len() as u64).to_le_bytes());
        out.extend_from_slice(key.name.as_bytes());
        out.extend_from_slice(&key.version.to_le_bytes());
        for values in [&key.w, &key.m] {
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values.iter() {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads a checkpoint from its bytes, checking everything before trusting it: the magic, the
/// format version, every length against the bytes left, the checksum, the names' UTF-8 and that
/// each key has as many state values as parameters. Errors name no file; [`read`] adds it.
pub(crate) fn decode(bytes: &[u8]) -> Result<Snapshot> {
    let (rank, hyper, views) = parse(bytes)?;
    let mut keys = Vec::with_capacity(views.len());
    for (index, view) in views.into_iter().enumerate() {
        let name = std::str::from_utf8(view.name).map_err(|cause| CheckpointError::BadName {
            origin: Origin::default(),
            index,
            id: view.id,
            cause,
        })?;
        let key = KeySnapshot {
            id: view.id,
            name: name.to_owned(),
            version: view.version,
            w: floats(view.w),
            m: floats(view.m),
        };
        keys.push(key);
    }
    let snap = Snapshot { rank, hyper, keys };
    snap.validate()?;
    Ok(snap)
}

/// One key as it lies in the bytes, before anything is copied out.
struct KeyView<'a> {
    id: u32,
    name: &'a [u8],
    version: u64,
    w: &'a [u8],
    m: &'a [u8],
}

/// Walks the structure and checks the checksum, copying nothing: the views borrow the bytes.
fn parse(bytes: &[u8]) -> Result<(u32, [f32; 4], Vec<KeyView<'_>>)> {
    // A prefix of the magic is a truncated checkpoint; anything else is not a checkpoint.
    let head = &bytes[..bytes.len().min(MAGIC.len())];
    if !MAGIC.starts_with(head) {
        return Err(CheckpointError::NotACheckpoint {
            origin: Origin::default(),
            found: head.to_vec(),
        });
    }
    let mut r = Reader { bytes, pos: 0 };
    r.take(MAGIC.len(), || "the magic bytes".into())?;
    let version = r.u32(|| "the format version".into())?;
    if version != FORMAT_VERSION {
        return Err(CheckpointError::UnsupportedVersion {
            origin: Origin::default(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let rank = r.u32(|| "the server rank".into())?;
    let mut hyper = [0.0f32; 4];
    for (i, h) in hyper.iter_mut().enumerate() {
        *h = f32::from_bits(r.u32(|| format!("hyper-parameter {i}"))?);
    }
    let count = r.u64(|| "the key count".into())?;
    // No capacity from `count`: it is not trusted yet. Each key takes at least 36 bytes, so the
    // loop ends at the first key that runs past the end.
    let mut keys = Vec::new();
    let mut index: u64 = 0;
    while index < count {
        let id = r.u32(|| format!("the id of key #{index}"))?;
        let name_len = r.u64(|| format!("the name length of key #{index} (id {id})"))?;
        let name_len = usize::try_from(name_len).map_err(|_| CheckpointError::LengthOverflow {
            origin: Origin::default(),
            what: format!("the name length of key #{index} (id {id})"),
            count: name_len,
        })?;
        let name = r.take(name_len, || format!("the name of key #{index} (id {id})"))?;
        let version = r.u64(|| format!("the version of key #{index} (id {id})"))?;
        let w = r.floats(|| format!("the parameters of key #{index} (id {id})"))?;
        let m = r.floats(|| format!("the optimiser state of key #{index} (id {id})"))?;
        keys.push(KeyView {
            id,
            name,
            version,
            w,
            m,
        });
        index = index.saturating_add(1);
    }
    // `pos` never passes the end: `take` only advances over bytes it returned.
    let body = &bytes[..r.pos];
    let stored = r.u32(|| "the checksum".into())?;
    if r.left() > 0 {
        return Err(CheckpointError::TrailingBytes {
            origin: Origin::default(),
            extra: r.left() as u64,
        });
    }
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(CheckpointError::ChecksumMismatch {
            origin: Origin::default(),
            stored,
            computed,
        });
    }
    Ok((rank, hyper, keys))
}

/// Little-endian f32s out of bytes whose length is a multiple of 4 (as [`Reader::floats`]
/// returns them).
fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// A cursor that never reads past the end: every read checks the bytes left first.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes; `what` names the field for the error, built only on failure.
    fn take(&mut self, n: usize, what: impl FnOnce() -> String) -> Result<&'a [u8]> {
        let slice = self
            .pos
            .checked_add(n)
            .and_then(|end| Some((end, self.bytes.get(self.pos..end)?)));
        match slice {
            Some((end, slice)) => {
                self.pos = end;
                Ok(slice)
            }
            None => Err(CheckpointError::Truncated {
                origin: Origin::default(),
                what: what(),
                needed: n as u64,
                left: self.left() as u64,
            }),
        }
    }

    fn u32(&mut self, what: impl FnOnce() -> String) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: impl FnOnce() -> String) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A u64 count, then that many f32s' bytes. The count is checked against the bytes left
    /// before it is used for anything.
    fn floats(&mut self, what: impl Fn() -> String) -> Result<&'a [u8]> {
        let count = self.u64(|| format!("the count of {}", what()))?;
        let needed = count
            .checked_mul(4)
            .ok_or_else(|| CheckpointError::LengthOverflow {
                origin: Origin::default(),
                what: what(),
                count,
            })?;
        let left = self.left() as u64;
        let needed = match usize::try_from(needed) {
            Ok(n) if needed <= left => n,
            _ => {
                return Err(CheckpointError::Truncated {
                    origin: Origin::default(),
                    what: what(),
                    needed,
                    left,
                });
            }
        };
        self.take(needed, what)
    }
}

/// The file a server's shard is checkpointed to in `dir`.
pub(crate) fn shard_path(dir: &Path, rank: usize) -> PathBuf {
    dir.join(format!("shard-{rank}.wccl-ckpt"))
}

/// Reads and decodes the checkpoint at `path`. Reading never writes.
pub(crate) fn read(path: &Path) -> Result<Snapshot> {
    let bytes = fs::read(path).map_err(|cause| CheckpointError::Io {
        action: "read",
        path: path.to_path_buf(),
        cause,
    })?;
    decode(&bytes).map_err(|e| e.with_path(path))
}

/// Writes `snap` to `path` atomically: to a fresh temporary file in the same directory, synced,
/// renamed over `path`, then the directory synced. On an error before the rename the temporary
/// file is removed and whatever was at `path` is untouched.
pub(crate) fn write_atomic(path: &Path, snap: &Snapshot) -> Result<()> {
    write_with(path, snap, None)
}

/// Test hook: writes the first `bytes` bytes of the checkpoint to the temporary file, syncs it,
/// and stops as a killed process would, before the rename and without removing the temporary
/// file. Returns [`CheckpointError::SimulatedKill`] naming it.
#[cfg(test)]
pub(crate) fn write_atomic_failing_after(path: &Path, snap: &Snapshot, bytes: usize) -> Result<()> {
    write_with(path, snap, Some(bytes))
}

fn write_with(path: &Path, snap: &Snapshot, kill_after: Option<usize>) -> Result<()> {
    snap.validate().map_err(|e| e.with_path(path))?;
    let Some(name) = path.file_name() else {
        return Err(CheckpointError::NotAFile {
            path: path.to_path_buf(),
        });
    };
    // `parent` of a bare file name is "": the current directory.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let bytes = encode(snap);
    let mut temp = TempFile::create(dir, name)?;
    if let Some(n) = kill_after {
        let n = n.min(bytes.len());
        temp.write(&bytes[..n])?;
        // A killed process removes nothing: the partial file stays for the test to inspect.
        let temp = temp.keep();
        return Err(CheckpointError::SimulatedKill { temp, written: n });
    }
    temp.write(&bytes)?;
    temp.rename_over(path)?;
    sync_dir(dir, path)
}

/// A temporary file that is removed when dropped, unless kept or renamed: every error path
/// between its creation and the rename releases it.
struct TempFile {
    path: PathBuf,
    file: Option<File>,
    armed: bool,
}

/// Makes temporary names unique within the process; the pid and clock make them unique across
/// processes, and `create_new` refuses to reuse a leftover from a killed one.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How many names to try before giving up (each collision means a leftover file or a racing
/// writer; more than a few means something else is wrong).
const TEMP_ATTEMPTS: u32 = 16;

impl TempFile {
    fn create(dir: &Path, target: &std::ffi::OsStr) -> Result<TempFile> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut attempt = 0;
        loop {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut name = std::ffi::OsString::from(".");
            name.push(target);
            name.push(format!(".{}.{nanos}.{n}.tmp", std::process::id()));
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file: Some(file),
                        armed: true,
                    });
                }
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists && attempt + 1 < TEMP_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(cause) => {
                    return Err(CheckpointError::Io {
                        action: "create the temporary file",
                        path,
                        cause,
                    });
                }
            }
        }
    }

    /// Writes and syncs `bytes`, so that what is renamed later is on disk.
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let io_err = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |cause| CheckpointError::Io {
                action,
                path,
                cause,
            }
        };
        let Some(file) = self.file.as_mut() else {
            return Err(io_err("write", &self.path)(io::Error::other(
                "the temporary file was already closed",
            )));
        };
        file.write_all(bytes).map_err(io_err("write", &self.path))?;
        file.sync_all().map_err(io_err("sync", &self.path))
    }

    /// Closes the file and renames it over `target`. On failure the drop removes it.
    fn rename_over(mut self, target: &Path) -> Result<()> {
        // Closed first: some platforms refuse to rename an open file.
        drop(self.file.take());
        fs::rename(&self.path, target).map_err(|cause| CheckpointError::Rename {
            from: self.path.clone(),
            to: target.to_path_buf(),
            cause,
        })?;
        self.armed = false;
        Ok(())
    }

    /// Leaves the file in place and returns its path.
    fn keep(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(self.file.take());
        if !self.armed {
            return;
        }
        if let Err(e) = fs::remove_file(&self.path) {
            // Already on an error path: the caller gets that error; this one is only logged.
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a temporary checkpoint file");
        }
    }
}

/// Syncs the directory so the rename itself is durable.
#[cfg(unix)]
fn sync_dir(dir: &Path, checkpoint: &Path) -> Result<()> {
    let sync = File::open(dir).and_then(|d| d.sync_all());
    match sync {
        Ok(()) => Ok(()),
        // Some file systems cannot sync a directory; there is nothing more to do there.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            Ok(())
        }
        Err(cause) => Err(CheckpointError::DirSync {
            path: checkpoint.to_path_buf(),
            cause,
        }),
    }
}

/// Directories cannot be opened for syncing here; the rename is as durable as the platform makes
/// it.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path, _checkpoint: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A value distinct per (key, element, field): a period of 97 (not a power of two) within a
    /// key, keys 1000 apart, state offset by 0.5 from parameters.
    fn value(key: usize, i: usize, state: bool) -> f32 {
        let base = (key * 1000 + (i * 37) % 97) as f64 * 0.25 - 300.0;
        (if state { base + 0.5 } else { -base }) as f32
    }

    /// Several keys of odd sizes (one empty), a non-ASCII name, versions past 2^32.
    fn sample(sizes: &[usize]) -> Snapshot {
        let names = ["w", "bias-ß", "embedding.weight", "e", "x"];
        Snapshot {
            rank: 5,
            hyper: [0.1, 0.9, -0.0, 3.5],
            keys: sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| KeySnapshot {
                    id: k as u32 * 3 + 1,
                    name: names[k % names.len()].to_owned(),
                    version: (1u64 << 33) + k as u64 * 7,
                    w: (0..n).map(|i| value(k, i, false)).collect(),
                    m: (0..n).map(|i| value(k, i, true)).collect(),
                })
                .collect(),
        }
    }

    /// Equality of every field, f32s compared by their bits (so -0.0 and NaN count).
    fn assert_same(a: &Snapshot, b: &Snapshot) {
        assert_eq!(a.rank, b.rank);
        assert_eq!(a.hyper.map(f32::to_bits), b.hyper.map(f32::to_bits));
        assert_eq!(a.keys.len(), b.keys.len());
        for (x, y) in a.keys.iter().zip(&b.keys) {
            assert_eq!((x.id, &x.name, x.version), (y.id, &y.name, y.version));
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&x.w), bits(&y.w), "parameters of '{}'", x.name);
            assert_eq!(bits(&x.m), bits(&y.m), "state of '{}'", x.name);
        }
    }

    fn shape(snap: &Snapshot) -> Vec<(u32, &str, usize)> {
        snap.keys
            .iter()
            .map(|k| (k.id, k.name.as_str(), k.w.len()))
            .collect()
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let snap = sample(&[33, 1, 0, 7, 250]);
        let back = decode(&encode(&snap)).expect("decode");
        assert_same(&snap, &back);
        assert!(back.check_against(5, snap.hyper, &shape(&snap)).is_ok());
    }

    /// The bytes follow the documented table, built here by hand, independently of `encode`.
    #[test]
    fn layout_matches_the_documented_table() {
        let snap = Snapshot {
            rank: 2,
            hyper: [0.5, 0.25, 0.0, 0.0],
            keys: vec![KeySnapshot {
                id: 9,
                name: "ab".into(),
                version: 3,
                w: vec![1.0, -2.0],
                m: vec![0.75, 4.0],
            }],
        };
        let mut want: Vec<u8> = b"WCCLCKPT".to_vec();
        want.extend([1, 0, 0, 0]); // format version
        want.extend([2, 0, 0, 0]); // rank
        want.extend([0, 0, 0, 0x3f, 0, 0, 0x80, 0x3e, 0, 0, 0, 0, 0, 0, 0, 0]); // 0.5 0.25 0 0
        want.extend([1, 0, 0, 0, 0, 0, 0, 0]); // key count
        want.extend([9, 0, 0, 0]); // id
        want.extend([2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend(b"ab");
        want.extend([3, 0, 0, 0, 0, 0, 0, 0]); // version
        want.extend([2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]); // 1.0 -2.0
        want.extend([2, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([0, 0, 0x40, 0x3f, 0, 0, 0x80, 0x40]); // 0.75 4.0
        let crc = crc32c::crc32c(&want);
        want.extend(crc.to_le_bytes());
        assert_eq!(encode(&snap), want);
    }

    #[test]
    fn every_single_byte_corruption_is_rejected() {
        let snap = sample(&[3, 1, 2]);
        let good = encode(&snap);
        let mut checksum_errors = 0;
        for i in 0..good.len() {
            for mask in [0x01u8, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= mask;
                let err = match decode(&bad) {
                    Ok(got) => panic!("byte {i} ^ {mask:#x} decoded: {got:?}"),
                    Err(e) => e,
                };
                match (i, &err) {
                    (0..8, CheckpointError::NotACheckpoint { .. }) => {}
                    (8..12, CheckpointError::UnsupportedVersion { found, .. }) => {
                        assert_ne!(*found, FORMAT_VERSION)
                    }
                    (0..12, _) => panic!("byte {i} ^ {mask:#x}: {err}"),
                    (_, CheckpointError::ChecksumMismatch { .. }) => checksum_errors += 1,
                    // A corrupted count moves everything after it: truncated or trailing.
                    (_, _) => {}
                }
            }
        }
        // Most bytes are values, names and ids: for them the checksum is what catches it.
        assert!(
            checksum_errors > good.len(),
            "{checksum_errors} checksum errors"
        );
    }

    #[test]
    fn every_truncation_is_rejected_and_so_is_an_extension() {
        let good = encode(&sample(&[5, 0, 2]));
        for len in 0..good.len() {
            match decode(&good[..len]) {
                Err(CheckpointError::Truncated { needed, left, .. }) => {
                    assert!(needed > left, "len {len}: needs {needed}, {left} left")
                }
                other => panic!("length {len} of {}: {other:?}", good.len()),
            }
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            decode(&longer),
            Err(CheckpointError::TrailingBytes { extra: 1, .. })
        ));
    }

    #[test]
    fn errors_on_disk_name_the_file_and_leave_it_untouched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard0.ckpt");
        let good = encode(&sample(&[4, 3]));
        let cases: [(&str, Vec<u8>); 3] = [
            ("truncated", good[..good.len() - 3].to_vec()),
            ("corrupt", {
                let mut b = good.clone();
                b[60] ^= 0x10;
                b
            }),
            ("not a checkpoint", b"hello, world".to_vec()),
        ];
        for (label, bytes) in cases {
            fs::write(&path, &bytes).expect("write");
            let err = read(&path).expect_err(label);
            let msg = err.to_string();
            assert!(msg.contains(&*path.to_string_lossy()), "{label}: {msg}");
            assert_eq!(fs::read(&path).expect("reread"), bytes, "{label}");
        }
        let missing = dir.path().join("none.ckpt");
        let msg = read(&missing).expect_err("missing").to_string();
        assert!(
            msg.starts_with("could not read") && msg.contains("none.ckpt"),
            "{msg}"
        );
    }

    #[test]
    fn check_against_names_the_first_difference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard1.ckpt");
        let snap = sample(&[33, 5]);
        write_atomic(&path, &snap).expect("write");
        let before = fs::read(&path).expect("read bytes");
        let back = read(&path).expect("read");
        let hyper = snap.hyper;
        let err = |r: Result<()>| r.expect_err("must differ").with_path(&path).to_string();

        let msg = err(back.check_against(5, hyper, &[(1, "w", 34), (4, "bias-ß", 5)]));
        assert!(
            msg.starts_with("key 'w' has 33 elements in checkpoint '")
                && msg.ends_with("the server holds 34"),
            "{msg}"
        );
        let msg = err(back.check_against(5, hyper, &[(1, "w", 33), (4, "bias-ß", 4)]));
        assert!(msg.contains("key 'bias-ß' has 5 elements"), "{msg}");
        let msg = err(back.check_against(5, hyper, &[(1, "w", 33), (4, "bias", 5)]));
        assert!(
            msg.contains("'bias-ß' (id 4) at position 1") && msg.contains("'bias'"),
            "{msg}"
        );
        let msg = err(back.check_against(5, hyper, &[(4, "bias-ß", 5), (1, "w", 33)]));
        assert!(msg.contains("holds key 'w' (id 1) at position 0"), "{msg}");
        let msg = err(back.check_against(5, hyper, &[(1, "w", 33)]));
        assert!(
            msg.contains("holds key 'bias-ß' (id 4, position 1) that the server does not"),
            "{msg}"
        );
        let msg = err(back.check_against(5, hyper, &[(1, "w", 33), (4, "bias-ß", 5), (7, "z", 2)]));
        assert!(msg.contains("lacks key 'z' (id 7, position 2)"), "{msg}");
        let msg = err(back.check_against(4, hyper, &shape(&snap)));
        assert!(
            msg.contains("server rank 5; this is server rank 4"),
            "{msg}"
        );
        let msg = err(back.check_against(5, [0.1, 0.0, 0.0, 0.0], &shape(&snap)));
        assert!(
            msg.contains("hyper-parameters [0.1, 0.9, -0.0, 3.5]"),
            "{msg}"
        );
        assert!(back.check_against(5, hyper, &shape(&snap)).is_ok());
        // A failed check is a read-only affair.
        assert_eq!(fs::read(&path).expect("reread"), before);
    }

    #[test]
    fn a_killed_write_leaves_the_previous_checkpoint_intact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard2.ckpt");
        let old = sample(&[9, 2]);
        write_atomic(&path, &old).expect("first write");
        let old_bytes = fs::read(&path).expect("read");
        let new = sample(&[9, 2, 11]);
        let new_len = encode(&new).len();
        for cut in [0, 1, 20, new_len / 2, new_len - 1, new_len] {
            match write_atomic_failing_after(&path, &new, cut) {
                Err(CheckpointError::SimulatedKill { temp, written }) => {
                    assert_eq!(written, cut);
                    assert_eq!(fs::metadata(&temp).expect("temp left").len(), cut as u64);
                    assert_eq!(temp.parent(), Some(dir.path()), "same directory");
                    if cut < new_len {
                        assert!(read(&temp).is_err(), "a partial file never reads");
                    }
                }
                other => panic!("cut {cut}: {other:?}"),
            }
            assert_eq!(fs::read(&path).expect("read"), old_bytes, "cut {cut}");
            assert_same(&read(&path).expect("old readable"), &old);
        }
        // The leftovers do not get in the way of the next write.
        write_atomic(&path, &new).expect("later write");
        assert_same(&read(&path).expect("new readable"), &new);
    }

    #[test]
    fn a_failed_rename_removes_the_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A non-empty directory where the checkpoint should go: the rename must fail.
        let path = dir.path().join("shard3.ckpt");
        fs::create_dir(&path).expect("mkdir");
        fs::write(path.join("keep"), b"x").expect("write");
        let err = write_atomic(&path, &sample(&[3])).expect_err("rename over a directory");
        assert!(matches!(err, CheckpointError::Rename { .. }), "{err}");
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("shard3.ckpt")]);
        assert_eq!(fs::read(path.join("keep")).expect("kept"), b"x");
    }

    #[test]
    fn an_unreadable_snapshot_is_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("shard4.ckpt");
        let mut snap = sample(&[4, 6]);
        snap.keys[1].m.pop();
        let err = write_atomic(&path, &snap).expect_err("unequal lengths");
        assert!(
            err.to_string()
                .contains("key 'bias-ß' has 6 parameters but 5 optimiser-state"),
            "{err}"
        );
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 0);
        // The same snapshot encoded anyway (checksum right) is refused by decode too.
        assert!(matches!(
            decode(&encode(&snap)),
            Err(CheckpointError::StateLength { w: 6, m: 5, .. })
        ));
        // And a name that is not UTF-8 under a right checksum.
        let mut bytes = encode(&sample(&[1]));
        let name_at = 8 + 4 + 4 + 16 + 8 + 4 + 8;
        bytes[name_at] = 0xff;
        let n = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..n]);
        bytes[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(CheckpointError::BadName {
                index: 0,
                id: 1,
                ..
            })
        ));
    }

    /// Bytes with a valid header, one key named "w" and the given parameter count, followed by
    /// `tail` bytes.
    fn header_with_count(count: u64, tail: usize) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(FORMAT_VERSION.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend([0u8; 16]);
        b.extend(1u64.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(b"w");
        b.extend(1u64.to_le_bytes());
        b.extend(count.to_le_bytes());
        b.extend(std::iter::repeat_n(0x41, tail));
        b
    }

    /// A count of 2^60 f32s would be a 4 EiB allocation, which aborts the test process: this
    /// test passing means nothing was allocated from it.
    #[test]
    fn a_huge_length_is_rejected_without_allocating() {
        match decode(&header_with_count(1 << 60, 12)) {
            Err(CheckpointError::Truncated {
                needed, left, what, ..
            }) => {
                assert_eq!((needed, left), (1 << 62, 12));
                assert!(what.contains("parameters of key #0 (id 7)"), "{what}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(&header_with_count(1 << 63, 12)),
            Err(CheckpointError::LengthOverflow { count, .. }) if count == 1 << 63
        ));
        // A key count of 2^60 in an otherwise valid file: the second key runs out of bytes.
        let mut b = encode(&sample(&[1]));
        b[32..40].copy_from_slice(&(1u64 << 60).to_le_bytes());
        match decode(&b) {
            Err(CheckpointError::Truncated { what, .. }) => {
                assert!(what.contains("key #1"), "{what}")
            }
            other => panic!("{other:?}"),
        }
        // A name length of 2^64 - 1.
        let mut b = header_with_count(0, 8);
        b[44..52].copy_from_slice(&u64::MAX.to_le_bytes());
        match decode(&b) {
            Err(CheckpointError::Truncated { what, needed, .. }) => {
                assert_eq!(needed, u64::MAX);
                assert!(what.contains("the name of key #0"), "{what}")
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&bytes);
        }

        /// Past the magic and version, so the parser itself is exercised.
        #[test]
        fn random_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend(FORMAT_VERSION.to_le_bytes());
            bytes.extend(body);
            prop_assert!(decode(&bytes).is_err());
        }

        /// A valid checkpoint with one byte replaced decodes to the original or not at all.
        #[test]
        fn one_replaced_byte_never_changes_the_content(i in 0usize..1000, byte in any::<u8>()) {
            let snap = sample(&[3, 2]);
            let mut bytes = encode(&snap);
            let i = i % bytes.len();
            bytes[i] = byte;
            if let Ok(got) = decode(&bytes) {
                assert_same(&got, &snap);
            }
        }
    }
}
