//! What the launcher says: rank, world size, local rank, the master's address and the job, read
//! from the variables of wccl, torchrun, Open MPI, MPICH/Hydra and Slurm.
//!
//! Sources are read in this order, and every one that is present counts:
//!
//! | source | rank | size | local rank | local size |
//! | --- | --- | --- | --- | --- |
//! | wccl | `WCCL_RANK` | `WCCL_WORLD_SIZE` | `WCCL_LOCAL_RANK` | `WCCL_LOCAL_WORLD_SIZE` |
//! | torchrun | `RANK` | `WORLD_SIZE` | `LOCAL_RANK` | `LOCAL_WORLD_SIZE` |
//! | Open MPI | `OMPI_COMM_WORLD_RANK` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK` | `OMPI_COMM_WORLD_LOCAL_SIZE` |
//! | MPICH/Hydra | `PMI_RANK` | `PMI_SIZE` | `MPI_LOCALRANKID` | `MPI_LOCALNRANKS` |
//! | Slurm | `SLURM_PROCID` | `SLURM_NTASKS` | `SLURM_LOCALID` | — (`SLURM_NODEID` is the node) |
//!
//! When two sources disagree on the rank or the size, the error names both (a launcher inside
//! another: `mpirun` in an `sbatch` script leaves Slurm's batch-step variables behind). Set
//! `WCCL_LAUNCHER` to `wccl`, `torchrun`, `openmpi`, `mpich` or `slurm` to read only that one.
//! Without a local rank, a rank is taken to be alone on its host with the others (local rank =
//! rank), which is right on one host.
//!
//! The master (rank 0's rendezvous store) is `WCCL_MASTER_ADDR`:`WCCL_MASTER_PORT`; else
//! torchrun's `MASTER_ADDR`, with the port **`MASTER_PORT + 1`**, because torchrun's own store
//! already listens on `MASTER_PORT`; else, with `WCCL_RENDEZVOUS_FILE`, a file rendezvous; else
//! loopback on a port derived from the job id (one host needs no address).
//!
//! The job id (ranks of another job are refused) is `WCCL_JOB_ID`, else torchrun's
//! `TORCHELASTIC_RUN_ID`, Slurm's `SLURM_JOB_ID`.`SLURM_STEP_ID`, Open MPI's `PMIX_NAMESPACE`
//! or `OMPI_MCA_ess_base_jobid`, MPICH's `PMI_KVSNAME`, else `wccl`. The token is
//! `WCCL_JOB_TOKEN`, or the contents of the file `WCCL_JOB_TOKEN_FILE`.

use std::collections::HashMap;
use std::path::PathBuf;

/// One launcher's variables.
struct Source {
    name: &'static str,
    rank: &'static str,
    size: &'static str,
    local_rank: Option<&'static str>,
    local_size: Option<&'static str>,
}

const SOURCES: [Source; 5] = [
    Source {
        name: "wccl",
        rank: "WCCL_RANK",
        size: "WCCL_WORLD_SIZE",
        local_rank: Some("WCCL_LOCAL_RANK"),
        local_size: Some("WCCL_LOCAL_WORLD_SIZE"),
    },
    Source {
        name: "torchrun",
        rank: "RANK",
        size: "WORLD_SIZE",
        local_rank: Some("LOCAL_RANK"),
        local_size: Some("LOCAL_WORLD_SIZE"),
    },
    Source {
        name: "openmpi",
        rank: "OMPI_COMM_WORLD_RANK",
        size: "OMPI_COMM_WORLD_SIZE",
        local_rank: Some("OMPI_COMM_WORLD_LOCAL_RANK"),
        local_size: Some("OMPI_COMM_WORLD_LOCAL_SIZE"),
    },
    Source {
        name: "mpich",
        rank: "PMI_RANK",
        size: "PMI_SIZE",
        local_rank: Some("MPI_LOCALRANKID"),
        local_size: Some("MPI_LOCALNRANKS"),
    },
    Source {
        name: "slurm",
        rank: "SLURM_PROCID",
        size: "SLURM_NTASKS",
        local_rank: Some("SLURM_LOCALID"),
        local_size: None,
    },
];

/// Where rank 0's rendezvous store is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Master {
    /// A host (name or address) and port: rank 0 listens there, the others dial it.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
        /// The variables it came from, for messages.
        from: &'static str,
    },
    /// A file that rank 0 writes its store's address to and the others read (one host, or a
    /// shared file system), as Gloo's FileStore.
    File(PathBuf),
}

/// What the launcher says about this process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// The number of ranks.
    pub size: usize,
    /// Its rank among the ranks of its host: it picks the GPU.
    pub local_rank: usize,
    /// The number of ranks on its host, when the launcher says.
    pub local_size: Option<usize>,
    /// The launcher the rank came from (`wccl`, `torchrun`, `openmpi`, `mpich`, `slurm`).
    pub launcher: &'static str,
    /// Where the rendezvous store is.
    pub master: Master,
    /// The job id.
    pub job: String,
}

/// A source that is present: (source, rank, size, local rank, local size).
type Found<'a> = (&'a Source, usize, usize, Option<usize>, Option<usize>);

/// Reads a variable as a number, naming it when it is not one.
fn number(vars: &HashMap<String, String>, name: &str) -> Result<Option<usize>, String> {
    match vars.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
    }
}

/// Whether a launcher started this process: any source's rank variable is set (or
/// `WCCL_LAUNCHER`). Programs that also run alone use it to choose.
pub fn launched(vars: &HashMap<String, String>) -> bool {
    vars.contains_key("WCCL_LAUNCHER") || SOURCES.iter().any(|s| vars.contains_key(s.rank))
}

/// The port derived from a job id when nothing names one: in 20000..40000. That overlaps
/// Linux's ephemeral range (32768..): a port some connection holds is refused at bind, with an
/// error naming it and `WCCL_MASTER_PORT`.
pub fn derived_port(job: &str) -> u16 {
    let h = blake3::hash(job.as_bytes());
    let b = h.as_bytes();
    20000 + (u16::from_le_bytes([b[0], b[1]]) % 20000)
}

/// This process's environment as the variables the launch and the token are read from.
///
/// `std::env::vars` panics on the first variable that is not UTF-8, whoever set it (a path
/// in Latin-1 in some unrelated variable): here such a variable is left out, as if unset, and
/// is an error only where wccl reads it (a name starting with `WCCL_`: a token that is not
/// UTF-8 belongs in `WCCL_JOB_TOKEN_FILE`, read as bytes). A launcher's own variables (`RANK`,
/// `OMPI_COMM_WORLD_RANK`, ...) are numbers and names: one that is not UTF-8 is left out and the
/// launch then reads as incomplete, with the error that names what is missing.
pub fn environment() -> Result<HashMap<String, String>, String> {
    vars_from(std::env::vars_os())
}

/// [`environment`] from any list of variables (a test's).
fn vars_from(
    vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for (k, v) in vars {
        match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => {
                out.insert(k, v);
            }
            (Ok(k), Err(_)) if k.starts_with("WCCL_") => {
                return Err(format!(
                    "{k} is not UTF-8 (a binary token belongs in WCCL_JOB_TOKEN_FILE)"
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

impl Launch {
    /// Reads the launch from this process's environment ([`environment`]).
    pub fn from_env() -> Result<Launch, String> {
        Launch::from_vars(&environment()?)
    }

    /// Reads the launch from a set of variables (the environment, or a test's).
    pub fn from_vars(vars: &HashMap<String, String>) -> Result<Launch, String> {
        let only = vars.get("WCCL_LAUNCHER").map(|s| s.trim().to_lowercase());
        if let Some(o) = &only
            && !SOURCES.iter().any(|s| s.name == o)
        {
            return Err(format!(
                "WCCL_LAUNCHER={o:?} is not one of wccl, torchrun, openmpi, mpich, slurm"
            ));
        }
        let mut found: Vec<Found<'_>> = Vec::new();
        for s in SOURCES
            .iter()
            .filter(|s| only.as_deref().is_none_or(|o| o == s.name))
        {
            let rank = number(vars, s.rank)?;
            let size = number(vars, s.size)?;
            match (rank, size) {
                (Some(r), Some(n)) => {
                    let lr = s.local_rank.map(|v| number(vars, v)).transpose()?.flatten();
                    let ls = s.local_size.map(|v| number(vars, v)).transpose()?.flatten();
                    found.push((s, r, n, lr, ls));
                }
                (None, None) => {}
                (Some(_), None) => {
                    return Err(format!("{} is set but {} is not", s.rank, s.size));
                }
                (None, Some(_)) => {
                    return Err(format!("{} is set but {} is not", s.size, s.rank));
                }
            }
        }
        let Some(&(first, rank, size, local_rank, local_size)) = found.first() else {
            return Err("no launcher variables: set WCCL_RANK and WCCL_WORLD_SIZE, or start the program under torchrun, mpirun or srun".into());
        };
        for &(other, r, n, _, _) in &found[1..] {
            if (r, n) != (rank, size) {
                return Err(format!(
                    "launchers disagree: {}={rank} {}={size} ({}), but {}={r} {}={n} ({}); set WCCL_LAUNCHER to the one that started this process",
                    first.rank, first.size, first.name, other.rank, other.size, other.name
                ));
            }
        }
        if size == 0 || rank >= size {
            return Err(format!(
                "{}={rank} is out of range for {}={size}",
                first.rank, first.size
            ));
        }
        let local_rank = local_rank.unwrap_or(rank);
        if let Some(ls) = local_size
            && local_rank >= ls
        {
            return Err(format!(
                "local rank {local_rank} is out of range for a local size of {ls} ({})",
                first.name
            ));
        }
        let job = job_id(vars);
        let master = master(vars, &job)?;
        // Loopback is one host's: a job whose launcher says it spans several needs an address.
        let nodes = number(vars, "SLURM_NNODES")?.filter(|_| first.name == "slurm");
        let spans = local_size.is_some_and(|ls| ls < size) || nodes.is_some_and(|n| n > 1);
        // The file rendezvous publishes a loopback address: one host only.
        let one_host = match &master {
            Master::Tcp { from, .. } => from.starts_with("loopback"),
            Master::File(_) => true,
        };
        if spans && one_host {
            return Err(format!(
                "the job spans several hosts ({} says {}), but no master address is set: set WCCL_MASTER_ADDR to rank 0's host and WCCL_MASTER_PORT to a free port there (and WCCL_JOB_TOKEN)",
                first.name,
                match (local_size, nodes) {
                    (_, Some(n)) if n > 1 => format!("SLURM_NNODES={n}"),
                    (Some(ls), _) => format!("{ls} of {size} ranks on this host"),
                    _ => String::new(),
                }
            ));
        }
        Ok(Launch {
            rank,
            size,
            local_rank,
            local_size,
            launcher: first.name,
            master,
            job,
        })
    }
}

fn job_id(vars: &HashMap<String, String>) -> String {
    let get = |k: &str| vars.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let id = get("WCCL_JOB_ID")
        .or_else(|| get("TORCHELASTIC_RUN_ID"))
        .or_else(|| {
            get("SLURM_JOB_ID").map(|j| match get("SLURM_STEP_ID") {
                Some(s) => format!("{j}.{s}"),
                None => j,
            })
        })
        .or_else(|| get("PMIX_NAMESPACE"))
        .or_else(|| get("OMPI_MCA_ess_base_jobid"))
        .or_else(|| get("PMI_KVSNAME"))
        .unwrap_or_else(|| "wccl".into());
    // The handshake carries at most 255 bytes; a longer id is hashed to stay distinct.
    if id.len() > super::super::link::tcp::handshake::MAX_JOB {
        blake3::hash(id.as_bytes()).to_hex().to_string()
    } else {
        id
    }
}

fn master(vars: &HashMap<String, String>, job: &str) -> Result<Master, String> {
    let get = |k: &str| vars.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let port = |k: &str| -> Result<Option<u16>, String> {
        get(k)
            .map(|v| {
                v.trim()
                    .parse::<u16>()
                    .map_err(|_| format!("{k}={v:?} is not a port"))
            })
            .transpose()
    };
    if let Some(host) = get("WCCL_MASTER_ADDR") {
        let p = match port("WCCL_MASTER_PORT")? {
            Some(p) => p,
            None => return Err("WCCL_MASTER_ADDR is set but WCCL_MASTER_PORT is not".into()),
        };
        return Ok(Master::Tcp {
            host,
            port: p,
            from: "WCCL_MASTER_ADDR/WCCL_MASTER_PORT",
        });
    }
    if let Some(host) = get("MASTER_ADDR") {
        // torchrun's store listens on MASTER_PORT itself: wccl's store takes the next port,
        // unless WCCL_MASTER_PORT names one.
        let p = match (port("WCCL_MASTER_PORT")?, port("MASTER_PORT")?) {
            (Some(p), _) => p,
            (None, Some(p)) => p.checked_add(1).ok_or_else(|| {
                "MASTER_PORT=65535 leaves no port for wccl (it uses MASTER_PORT + 1): set WCCL_MASTER_PORT".to_string()
            })?,
            (None, None) => {
                return Err("MASTER_ADDR is set but neither MASTER_PORT nor WCCL_MASTER_PORT".into());
            }
        };
        return Ok(Master::Tcp {
            host,
            port: p,
            from: "MASTER_ADDR/MASTER_PORT+1",
        });
    }
    if let Some(f) = get("WCCL_RENDEZVOUS_FILE") {
        return Ok(Master::File(PathBuf::from(f)));
    }
    let p = match port("WCCL_MASTER_PORT")? {
        Some(p) => p,
        None => derived_port(job),
    };
    Ok(Master::Tcp {
        host: "127.0.0.1".into(),
        port: p,
        from: "loopback (no master address given: one host)",
    })
}

/// The most bytes a token file may hold: a token is a secret of some bytes, not a file's worth.
pub const MAX_TOKEN_FILE: u64 = 4096;

/// The token file's bytes: a regular file of at most [`MAX_TOKEN_FILE`] bytes. Not a device or
/// a pipe (`/dev/urandom` given for the file the token was drawn from would be read for ever,
/// and a FIFO nobody writes blocks for ever, at its open already).
fn read_token_file(path: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let fail = |e: std::io::Error| format!("WCCL_JOB_TOKEN_FILE={path:?}: {e}");
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    // Opening a FIFO for reading blocks until a writer comes: not without O_NONBLOCK (which a
    // regular file's reads ignore). The kind is checked on what was opened, not on the path
    // before (which could be swapped in between).
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let file = open.open(path).map_err(fail)?;
    if !file.metadata().map_err(fail)?.is_file() {
        return Err(format!(
            "WCCL_JOB_TOKEN_FILE={path:?} is not a regular file"
        ));
    }
    let mut bytes = Vec::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(fail)?;
    if bytes.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!(
            "WCCL_JOB_TOKEN_FILE={path:?} holds more than {MAX_TOKEN_FILE} bytes: a token, not a file's worth"
        ));
    }
    Ok(bytes)
}

/// The job token from `WCCL_JOB_TOKEN` or the file `WCCL_JOB_TOKEN_FILE` (its contents, less a
/// final newline), if either is set.
pub fn token_from_vars(
    vars: &HashMap<String, String>,
) -> Result<Option<crate::link::tcp::handshake::JobToken>, String> {
    use crate::link::tcp::handshake::JobToken;
    match (vars.get("WCCL_JOB_TOKEN"), vars.get("WCCL_JOB_TOKEN_FILE")) {
        (Some(_), Some(_)) => {
            Err("both WCCL_JOB_TOKEN and WCCL_JOB_TOKEN_FILE are set: set one".into())
        }
        (Some(t), None) if t.is_empty() => Err("WCCL_JOB_TOKEN is empty".into()),
        (Some(t), None) => Ok(Some(JobToken::new(t.as_bytes()))),
        (None, Some(path)) => {
            let mut bytes = read_token_file(path)?;
            while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                bytes.pop();
            }
            if bytes.is_empty() {
                return Err(format!("WCCL_JOB_TOKEN_FILE={path:?} is empty"));
            }
            Ok(Some(JobToken::new(bytes)))
        }
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn each_launcher_is_read() {
        // (variables, launcher, rank, size, local rank)
        type Case = (
            &'static [(&'static str, &'static str)],
            &'static str,
            usize,
            usize,
            usize,
        );
        let cases: [Case; 5] = [
            (
                &[("WCCL_RANK", "2"), ("WCCL_WORLD_SIZE", "5")],
                "wccl",
                2,
                5,
                2,
            ),
            (
                &[
                    ("RANK", "3"),
                    ("WORLD_SIZE", "8"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "node0"),
                    ("MASTER_PORT", "29500"),
                ],
                "torchrun",
                3,
                8,
                1,
            ),
            (
                &[
                    ("OMPI_COMM_WORLD_RANK", "5"),
                    ("OMPI_COMM_WORLD_SIZE", "6"),
                    ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
                    ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
                    ("WCCL_MASTER_ADDR", "node0"),
                    ("WCCL_MASTER_PORT", "4000"),
                ],
                "openmpi",
                5,
                6,
                2,
            ),
            (&[("PMI_RANK", "1"), ("PMI_SIZE", "3")], "mpich", 1, 3, 1),
            (
                &[
                    ("SLURM_PROCID", "6"),
                    ("SLURM_NTASKS", "7"),
                    ("SLURM_LOCALID", "0"),
                    ("SLURM_NODEID", "3"),
                    // A typo'd variable does not exist and is not read.
                    ("SLURM_LOCAL_ID", "4"),
                ],
                "slurm",
                6,
                7,
                0,
            ),
        ];
        for (kv, name, rank, size, local) in cases {
            let l = Launch::from_vars(&vars(kv)).expect(name);
            assert_eq!(
                (l.launcher, l.rank, l.size, l.local_rank),
                (name, rank, size, local)
            );
        }
    }

    #[test]
    fn disagreeing_launchers_are_named_both() {
        let e = Launch::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]))
        .expect_err("disagree");
        assert!(
            e.contains("OMPI_COMM_WORLD_RANK=1") && e.contains("SLURM_PROCID=0"),
            "{e}"
        );
        // WCCL_LAUNCHER picks one.
        let l = Launch::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
            ("WCCL_LAUNCHER", "openmpi"),
        ]))
        .expect("one launcher");
        assert_eq!((l.rank, l.size), (1, 4));
        // Agreeing sources are fine.
        let l = Launch::from_vars(&vars(&[
            ("PMI_RANK", "2"),
            ("PMI_SIZE", "3"),
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "3"),
        ]))
        .expect("agree");
        assert_eq!(l.launcher, "mpich");
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (kv, needle) in [
            (vec![("RANK", "x"), ("WORLD_SIZE", "2")], "RANK=\"x\""),
            (vec![("RANK", "2"), ("WORLD_SIZE", "2")], "out of range"),
            (vec![("RANK", "0")], "WORLD_SIZE is not"),
            (
                vec![("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "MASTER_PORT",
            ),
            (vec![], "no launcher variables"),
        ] {
            let e = Launch::from_vars(&vars(&kv)).expect_err(needle);
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn torchrun_port_is_the_next_one() {
        let l = Launch::from_vars(&vars(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node1"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_RUN_ID", "abc"),
        ]))
        .expect("torchrun");
        assert_eq!(
            l.master,
            Master::Tcp {
                host: "node1".into(),
                port: 29501,
                from: "MASTER_ADDR/MASTER_PORT+1"
            }
        );
        assert_eq!(l.job, "abc");
    }

    #[test]
    fn several_hosts_need_an_address() {
        let e = Launch::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ]))
        .expect_err("two hosts");
        assert!(e.contains("WCCL_MASTER_ADDR"), "{e}");
        let e = Launch::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NNODES", "2"),
        ]))
        .expect_err("two nodes");
        assert!(e.contains("SLURM_NNODES=2"), "{e}");
        // With an address, fine.
        Launch::from_vars(&vars(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NNODES", "2"),
            ("WCCL_MASTER_ADDR", "n1"),
            ("WCCL_MASTER_PORT", "4000"),
        ]))
        .expect("an address");
    }

    #[test]
    fn one_host_needs_no_address() {
        let a = Launch::from_vars(&vars(&[
            ("OMPI_COMM_WORLD_RANK", "0"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("PMIX_NAMESPACE", "prterun-x-1@1"),
        ]))
        .expect("ompi");
        let Master::Tcp { host, port, .. } = a.master else {
            panic!("not tcp")
        };
        assert_eq!(host, "127.0.0.1");
        assert_eq!(port, derived_port("prterun-x-1@1"));
        let f = Launch::from_vars(&vars(&[
            ("PMI_RANK", "0"),
            ("PMI_SIZE", "2"),
            ("WCCL_RENDEZVOUS_FILE", "/tmp/x"),
        ]))
        .expect("file");
        assert_eq!(f.master, Master::File("/tmp/x".into()));
    }

    #[cfg(unix)]
    #[test]
    fn a_variable_that_is_not_utf8_is_left_out_unless_wccl_reads_it() {
        use std::ffi::OsString;
        use std::os::unix::ffi::OsStringExt;
        let bad = || OsString::from_vec(vec![b'a', 0xff, b'b']);
        let ok = |s: &str| OsString::from(s);
        let got = vars_from([
            (ok("RANK"), ok("1")),
            (ok("LANG_PATH"), bad()),
            (bad(), ok("x")),
            (ok("WORLD_SIZE"), ok("2")),
        ])
        .expect("others' variables are left out");
        assert_eq!(got.len(), 2);
        assert_eq!(got.get("RANK").map(String::as_str), Some("1"));
        let e = vars_from([(ok("RANK"), ok("1")), (ok("WCCL_JOB_TOKEN"), bad())])
            .expect_err("wccl's own is an error");
        assert!(
            e.contains("WCCL_JOB_TOKEN") && e.contains("WCCL_JOB_TOKEN_FILE"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_token_file_is_a_small_regular_file() {
        let tmp = tempfile::tempdir().expect("a temporary folder");
        let dir = tmp.path();
        let file = |name: &str, bytes: &[u8]| {
            let p = dir.join(name);
            std::fs::write(&p, bytes).expect("a token file");
            p.display().to_string()
        };
        let token = |path: &str| token_from_vars(&vars(&[("WCCL_JOB_TOKEN_FILE", path)]));
        // Binary bytes, less the final newline.
        let good = file("good", &[0xff, 0, 7, b'\n']);
        assert!(matches!(token(&good), Ok(Some(_))));
        let most = file("most", &vec![1u8; MAX_TOKEN_FILE as usize]);
        assert!(matches!(token(&most), Ok(Some(_))));
        let big = file("big", &vec![1u8; MAX_TOKEN_FILE as usize + 1]);
        let e = token(&big).expect_err("a file's worth");
        assert!(e.contains("more than"), "{e}");
        // A folder, or a device that never ends: refused, not read.
        let e = token(&dir.display().to_string()).expect_err("a folder");
        assert!(e.contains("not a regular file"), "{e}");
        let e = token("/dev/zero").expect_err("a device");
        assert!(e.contains("not a regular file"), "{e}");
        // A FIFO nobody writes: refused, not waited on at its open.
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        let e = token(&fifo.display().to_string()).expect_err("a FIFO");
        assert!(e.contains("not a regular file"), "{e}");
    }
}
