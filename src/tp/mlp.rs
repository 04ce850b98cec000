//! Megatron-LM's tensor-parallel MLP block: a column-parallel layer, GELU on each rank's shard,
//! a row-parallel layer. One all-reduce forward, one backward.

use super::kernels::Kernels;
use super::linear::{ColumnParallelLinear, RowParallelLinear};
use super::{local, refuse};
use crate::comm::Communicator;
use crate::device::{DeviceBuffer, TensorRef};
use crate::error::Result;

/// `Y = gelu(X W1) W2` split over the ranks: W1 (`d_in x d_ffn`) by columns, W2 (`d_ffn x
/// d_out`) by rows, so that each rank's hidden shard feeds its own rows of W2 and only the
/// output needs summing.
///
/// ```no_run
/// # fn main() -> wccl::Result<()> {
/// use wccl::tp::{Kernels, ParallelMlp};
/// let comms = wccl::CommGroup::builder().ranks(2).build()?.into_communicators();
/// let (d, ffn, batch) = (8, 32, 4);
/// let w1: Vec<f32> = (0..d * ffn).map(|i| (i % 7) as f32 * 0.01).collect();
/// let w2: Vec<f32> = (0..ffn * d).map(|i| (i % 5) as f32 * 0.01).collect();
/// std::thread::scope(|s| {
///     for mut comm in comms {
///         let (w1, w2) = (&w1, &w2);
///         s.spawn(move || -> wccl::Result<()> {
///             let mut kernels = Kernels::new(comm.device());
///             let mut mlp = ParallelMlp::new(&mut comm, (d, ffn, d), w1, w2)?;
///             let x = comm.upload(&vec![1.0f32; batch * d])?;
///             let y = comm.buffer::<f32>(batch * d)?;
///             mlp.forward(&mut comm, &mut kernels, x.view(), y.view())?;
///             let dx = comm.buffer::<f32>(batch * d)?;
///             mlp.backward(&mut comm, &mut kernels, x.view(), y.view(), dx.view())?;
///             Ok(())
///         });
///     }
/// });
/// # Ok(()) }
/// ```
pub struct ParallelMlp {
    fc1: ColumnParallelLinear,
    fc2: RowParallelLinear,
    /// Per batch size: the hidden pre-activation, its GELU, and their gradients (`batch x
    /// ffn_r` each), kept from forward for backward.
    acts: Option<Activations>,
}

impl std::fmt::Debug for ParallelMlp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelMlp")
            .field("fc1", &self.fc1)
            .field("fc2", &self.fc2)
            .finish_non_exhaustive()
    }
}

struct Activations {
    batch: usize,
    h: DeviceBuffer<f32>,
    z: DeviceBuffer<f32>,
    dz: DeviceBuffer<f32>,
    dh: DeviceBuffer<f32>,
    forward_done: bool,
}

impl ParallelMlp {
    /// The block with dimensions `(d_in, d_ffn, d_out)` and full weights `w1` (`d_in x d_ffn`)
    /// and `w2` (`d_ffn x d_out`), row-major and the same on every rank. Fails when d_ffn is
    /// smaller than the number of ranks.
    pub fn new(
        comm: &mut Communicator,
        (d_in, d_ffn, d_out): (usize, usize, usize),
        w1: &[f32],
        w2: &[f32],
    ) -> Result<Self> {
        let fc1 = ColumnParallelLinear::new(comm, d_in, d_ffn, w1)?;
        let fc2 = RowParallelLinear::new(comm, d_ffn, d_out, w2)?;
        Ok(ParallelMlp {
            fc1,
            fc2,
            acts: None,
        })
    }

    /// The column-parallel first layer (its weight shard and gradient).
    pub fn fc1(&self) -> &ColumnParallelLinear {
        &self.fc1
    }

    /// The row-parallel second layer (its weight shard and gradient).
    pub fn fc2(&self) -> &RowParallelLinear {
        &self.fc2
    }

    /// `y (batch x d_out) = gelu(x W1) W2` on every rank, from `x` (`batch x d_in`, the same on
    /// every rank). One all-reduce.
    pub fn forward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        y: TensorRef<'_>,
    ) -> Result<()> {
        let d_in = self.fc1.in_features();
        if d_in == 0 || !x.count.is_multiple_of(d_in) {
            return Err(refuse(
                comm,
                format!(
                    "parallel MLP: x has {} elements, not whole rows of {d_in}",
                    x.count
                ),
            ));
        }
        let batch = x.count / d_in;
        let mut acts = self.activations(comm, batch)?;
        acts.forward_done = false;
        self.fc1.forward(comm, kernels, x, acts.h.view())?;
        let r = kernels.gelu(comm.device(), acts.h.view(), acts.z.view());
        local(comm, r)?;
        self.fc2.forward(comm, kernels, acts.z.view(), y)?;
        acts.forward_done = true;
        self.acts = Some(acts);
        Ok(())
    }

    /// Backward from `dy` (`batch x d_out`, the same on every rank) after a forward pass on
    /// `x`: writes both layers' weight gradients and `dx` (`batch x d_in`). One all-reduce.
    pub fn backward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        dy: TensorRef<'_>,
        dx: TensorRef<'_>,
    ) -> Result<()> {
        let d_in = self.fc1.in_features();
        let batch = x.count.checked_div(d_in).unwrap_or(0);
        let Some(acts) = self.acts.take_if(|a| a.forward_done && a.batch == batch) else {
            return Err(refuse(
                comm,
                format!(
                    "parallel MLP: backward for a batch of {batch} rows without a forward pass on it"
                ),
            ));
        };
        let result = self
            .fc2
            .backward(comm, kernels, acts.z.view(), dy, acts.dz.view())
            .and_then(|()| {
                let r = kernels.gelu_backward(
                    comm.device(),
                    acts.h.view(),
                    acts.dz.view(),
                    acts.dh.view(),
                );
                local(comm, r)
            })
            .and_then(|()| self.fc1.backward(comm, kernels, x, acts.dh.view(), dx));
        self.acts = Some(acts);
        result
    }

    /// The activation buffers for `batch` rows, made when the batch size changes.
    fn activations(&mut self, comm: &mut Communicator, batch: usize) -> Result<Activations> {
        if let Some(a) = self.acts.take_if(|a| a.batch == batch) {
            return Ok(a);
        }
        let len = batch * self.fc1.columns().len();
        let made = (|| {
            Ok(Activations {
                batch,
                h: comm.buffer(len)?,
                z: comm.buffer(len)?,
                dz: comm.buffer(len)?,
                dh: comm.buffer(len)?,
                forward_done: false,
            })
        })();
        local(comm, made)
    }
}
