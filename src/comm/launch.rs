//! One communicator per process: join a job started by mpirun, torchrun or srun (or by hand),
//! over TCP.

use crate::device::{AdapterSelector, RankDevice, discover};
use crate::error::{Error, Result};
use crate::link::{Link, TcpOptions};
use crate::rendezvous::env::environment;
use crate::rendezvous::{Launch, Master, connect_link, token_from_vars};

use super::{CommConfig, Communicator};

/// How a process joins a job: the transport's options, the communicator's settings, and which
/// adapters its GPU is chosen from.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// The TCP transport (job token, checksums, frame limit, deadlines). [`Communicator::from_env`]
    /// fills the token and job id from the environment unless they are set here.
    pub tcp: TcpOptions,
    /// The communicator's settings (deadline of each call, slices, algorithm).
    pub config: CommConfig,
    /// The adapters to choose from; the local rank picks one (see [`Communicator::connect`]).
    pub adapters: AdapterSelector,
    /// This process's rank among the ranks of its host (default: its rank).
    pub local_rank: Option<usize>,
}

fn launch_error(message: String) -> Error {
    Error::Launch { message }
}

/// `"host:port"` (the host may be bracketed) as the rendezvous's address.
fn parse_master(master: &str, from: &'static str) -> Result<Master> {
    let (host, port) = master
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .ok_or_else(|| launch_error(format!("{master:?} is not host:port")))?;
    Ok(Master::Tcp {
        host: host.to_string(),
        port,
        from,
    })
}

impl Communicator {
    /// Joins the job this process was launched into: reads rank, world size, local rank and the
    /// master's address from the launcher's variables (`crate::rendezvous::env` lists them: wccl's
    /// own `WCCL_*`, torchrun, Open MPI, MPICH, Slurm), the job token from `WCCL_JOB_TOKEN` or
    /// `WCCL_JOB_TOKEN_FILE`, meets the other ranks, and opens the GPU its local rank picks.
    ///
    /// ```no_run
    /// // Under `mpirun -np 4 prog`, `torchrun --nproc-per-node 4 --no-python prog` or `srun -n 4 prog`:
    /// let mut comm = wccl::Communicator::from_env()?;
    /// let grad = comm.upload(&vec![comm.rank() as f32; 1 << 20])?;
    /// comm.all_reduce(&grad, wccl::ReduceOp::Sum)?;
    /// # Ok::<(), wccl::Error>(())
    /// ```
    pub fn from_env() -> Result<Communicator> {
        Self::from_env_with(ConnectOptions::default())
    }

    /// [`from_env`](Self::from_env) with options; a token or job id set in `options.tcp`
    /// wins over the environment's.
    pub fn from_env_with(options: ConnectOptions) -> Result<Communicator> {
        let vars = environment().map_err(launch_error)?;
        let launch = Launch::from_vars(&vars).map_err(launch_error)?;
        let mut options = options;
        if options.tcp.token.is_none() {
            options.tcp.token = token_from_vars(&vars).map_err(launch_error)?;
        }
        if options.tcp.job == TcpOptions::default().job {
            options.tcp.job = launch.job.clone();
        }
        if options.local_rank.is_none() {
            options.local_rank = Some(launch.local_rank);
        }
        Self::join_job(launch.rank, launch.size, &launch.master, options)
    }

    /// Joins a job explicitly: this process is `rank` of `size`, and rank 0 serves the
    /// rendezvous at `master` (`"host:port"`; rank 0 listens there). The job token is
    /// `options.tcp.token`, else `WCCL_JOB_TOKEN`/`WCCL_JOB_TOKEN_FILE`. The GPU is the adapter the
    /// local rank picks among `options.adapters` (ranks share adapters round robin when a host
    /// has fewer than its ranks, as [`crate::CommGroup`] does).
    pub fn connect(
        rank: usize,
        size: usize,
        master: &str,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        let master = parse_master(master, "Communicator::connect")?;
        // The token from the environment too, as the error for a missing one says.
        let mut options = options;
        if options.tcp.token.is_none() {
            options.tcp.token =
                token_from_vars(&environment().map_err(launch_error)?).map_err(launch_error)?;
        }
        Self::join_job(rank, size, &master, options)
    }

    fn join_job(
        rank: usize,
        size: usize,
        master: &Master,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        let link = connect_link(rank, size, master, &options.tcp)?;
        let local = options.local_rank.unwrap_or(rank);
        // After the mesh: a rank whose device fails tells its peers why (their first call
        // fails with its reason) instead of leaving them to wait for a registration.
        match open_local(rank, local, &options.adapters) {
            Ok(dev) => Ok(Communicator::new(dev, Box::new(link), options.config)),
            Err(e) => {
                link.abort(&format!("could not open its device: {e}"));
                Err(e)
            }
        }
    }

    /// Grows this communicator across processes (see [`grow`](Self::grow)): its members and
    /// the newcomers ([`join_grown`](Self::join_grown)) meet at a fresh rendezvous, `master`
    /// (`"host:port"`, served by rank 0 as for [`connect`](Self::connect)), as a group of
    /// `size`, each member keeping its number; the transport checks the job token
    /// (`tcp.token`, else the environment's) of every process that comes, and the members and
    /// newcomers then check each other before anyone changes. Every side must pass the same
    /// `tcp.job` (the default unless the launcher's is set on every side). The call blocks until every
    /// member and newcomer came, within `tcp.timeout`.
    ///
    /// # Errors
    /// As [`connect`](Self::connect) for the rendezvous, then as [`grow`](Self::grow); the
    /// communicator is unchanged on any error.
    pub fn grow_at(&mut self, size: usize, master: &str, tcp: &TcpOptions) -> Result<()> {
        // Refused before the rendezvous, so that the peers hear why (the grow would refuse).
        if let Some(e) = self.broken() {
            return Err(Error::InvalidArgument {
                at: crate::error::At::rank(self.rank()),
                message: format!("this communicator is broken ({e}); recover before growing"),
            });
        }
        let master = parse_master(master, "Communicator::grow_at")?;
        let mut tcp = tcp.clone();
        if tcp.token.is_none() {
            tcp.token =
                token_from_vars(&environment().map_err(launch_error)?).map_err(launch_error)?;
        }
        if size <= self.size() {
            return Err(Error::InvalidArgument {
                at: crate::error::At::rank(self.rank()),
                message: format!("a group of {size} does not grow one of {}", self.size()),
            });
        }
        let link = connect_link(self.rank(), size, &master, &tcp)?;
        self.grow(Box::new(link))
    }

    /// A new process joins a group growing at `master` (see [`grow_at`](Self::grow_at)) as
    /// rank `rank` of `size`, a number after every member's, presenting the job token
    /// (`options.tcp.token`, else the environment's), on the adapter its local rank picks.
    pub fn join_grown(
        rank: usize,
        size: usize,
        master: &str,
        options: ConnectOptions,
    ) -> Result<Communicator> {
        if rank == 0 || rank >= size {
            return Err(Error::InvalidArgument {
                at: crate::error::At::rank(rank),
                message: format!(
                    "a newcomer takes a rank after the members' (rank 0 is always one), below \
                     {size}; not {rank}"
                ),
            });
        }
        let master = parse_master(master, "Communicator::join_grown")?;
        let mut options = options;
        if options.tcp.token.is_none() {
            options.tcp.token =
                token_from_vars(&environment().map_err(launch_error)?).map_err(launch_error)?;
        }
        let link = connect_link(rank, size, &master, &options.tcp)?;
        let local = options.local_rank.unwrap_or(rank);
        match open_local(rank, local, &options.adapters) {
            Ok(dev) => Communicator::join(dev, Box::new(link), options.config),
            Err(e) => {
                link.abort(&format!("could not open its device: {e}"));
                Err(e)
            }
        }
    }

    /// A communicator over an existing TCP link (wrapped or not: `FaultyLink<TcpLink>`), on
    /// the adapter `local_rank` picks.
    pub fn over_link(
        link: Box<dyn Link>,
        local_rank: usize,
        adapters: &AdapterSelector,
        config: CommConfig,
    ) -> Result<Communicator> {
        let dev = open_local(link.rank(), local_rank, adapters)?;
        Ok(Communicator::new(dev, link, config))
    }
}

/// Opens the adapter the local rank picks: its own when the host has one per local rank, else
/// shared round robin.
fn open_local(rank: usize, local: usize, selector: &AdapterSelector) -> Result<RankDevice> {
    let adapters = discover(selector)?;
    let Some(a) = adapters.get(local % adapters.len().max(1)) else {
        return Err(Error::NoAdapter {
            wanted: format!("an adapter for local rank {local}"),
            found: "none".into(),
        });
    };
    if adapters.len() <= local {
        tracing::info!(
            rank,
            local,
            adapters = adapters.len(),
            "fewer adapters than local ranks: sharing"
        );
    }
    RankDevice::open(rank, a)
}
