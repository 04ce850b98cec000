//! Megatron-LM's two linear layers (f32, no bias), forward and backward: the column-parallel
//! one (weight split by output columns; identity forward, all-reduce of the input gradient
//! backward: Megatron's "f") and the row-parallel one (weight split by input rows; all-reduce
//! forward, identity backward: "g").

use std::ops::Range;

use super::kernels::{Kernels, Matmul};
use super::split::{ColumnParallel, columns_of, rows_of, shard};
use super::{local, refuse};
use crate::comm::Communicator;
use crate::device::{DeviceBuffer, TensorRef};
use crate::error::Result;
use crate::types::ReduceOp;

/// The batch size of `x`, which holds whole rows of `width` elements.
fn batch_of(comm: &mut Communicator, what: &str, x: &TensorRef<'_>, width: usize) -> Result<usize> {
    if width == 0 || !x.count.is_multiple_of(width) {
        return Err(refuse(
            comm,
            format!("{what}: {} elements are not whole rows of {width}", x.count),
        ));
    }
    Ok(x.count / width)
}

fn check_weight(
    comm: &mut Communicator,
    what: &str,
    (rows, cols): (usize, usize),
    split: usize,
    len: usize,
) -> Result<()> {
    if split < comm.size() {
        return Err(refuse(
            comm,
            format!(
                "{what}: cannot split {split} over {} ranks: every rank needs at least one",
                comm.size()
            ),
        ));
    }
    if len != rows * cols {
        return Err(refuse(
            comm,
            format!(
                "{what}: weight has {len} elements, {rows} x {cols} needs {}",
                rows * cols
            ),
        ));
    }
    Ok(())
}

/// One rank's shard of a linear layer as a dense layer of its own: `y = x W` with W `n_in x
/// n_out`, and its backward pass; the parallel layers add the communication around it.
struct LocalLinear {
    n_in: usize,
    n_out: usize,
    weight: DeviceBuffer<f32>,
    weight_grad: DeviceBuffer<f32>,
}

impl LocalLinear {
    fn upload(comm: &mut Communicator, weight: &[f32], n_in: usize, n_out: usize) -> Result<Self> {
        let made = comm
            .upload(weight)
            .and_then(|w| Ok((w, comm.buffer::<f32>(weight.len())?)));
        let (weight, weight_grad) = local(comm, made)?;
        Ok(LocalLinear {
            n_in,
            n_out,
            weight,
            weight_grad,
        })
    }

    /// `y (batch x n_out) = x (batch x n_in) W`.
    fn forward(
        &self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        what: &str,
        x: TensorRef<'_>,
        y: TensorRef<'_>,
    ) -> Result<()> {
        let batch = batch_of(comm, what, &x, self.n_in)?;
        let spec = Matmul::new(batch, self.n_out, self.n_in);
        let r = kernels.matmul(comm.device(), &spec, x, self.weight.view(), y);
        local(comm, r)
    }

    /// The weight gradient `xᵀ dy` (`n_in x n_out`) and `dx = dy Wᵀ` (`batch x n_in`).
    fn backward(
        &self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        what: &str,
        x: TensorRef<'_>,
        dy: TensorRef<'_>,
        dx: TensorRef<'_>,
    ) -> Result<()> {
        let batch = batch_of(comm, what, &x, self.n_in)?;
        let (n_in, n_out) = (self.n_in, self.n_out);
        let dev = comm.device();
        let weight_grad = Matmul::new(n_in, n_out, batch).trans_a();
        let input_grad = Matmul::new(batch, n_in, n_out).trans_b();
        let r = kernels
            .matmul(dev, &weight_grad, x, dy, self.weight_grad.view())
            .and_then(|()| kernels.matmul(dev, &input_grad, dy, self.weight.view(), dx));
        local(comm, r)
    }
}

/// `Y = X W` with W (`in x out`) split by columns: rank r keeps columns
/// [`columns`](Self::columns) of W and computes the same columns of Y from the whole X.
///
/// Forward needs no communication ([`forward`](Self::forward) leaves Y split, as the
/// row-parallel layer after it wants; [`forward_gathered`](Self::forward_gathered) all-gathers
/// it). Backward sums the input gradient over the ranks with one all-reduce.
pub struct ColumnParallelLinear {
    in_features: usize,
    out_features: usize,
    columns: Range<usize>,
    shard: LocalLinear,
    gather: Option<ColumnParallel>,
    dy_shard: Option<DeviceBuffer<f32>>,
}

impl std::fmt::Debug for ColumnParallelLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColumnParallelLinear")
            .field("in_features", &self.in_features)
            .field("out_features", &self.out_features)
            .field("columns", &self.columns)
            .finish_non_exhaustive()
    }
}

impl ColumnParallelLinear {
    /// The layer with the full weight `weight` (`in_features x out_features`, row-major, the
    /// same on every rank); this rank uploads its columns.
    pub fn new(
        comm: &mut Communicator,
        in_features: usize,
        out_features: usize,
        weight: &[f32],
    ) -> Result<Self> {
        let what = "column-parallel linear";
        check_weight(
            comm,
            what,
            (in_features, out_features),
            out_features,
            weight.len(),
        )?;
        let columns = shard(out_features, comm.size(), comm.rank());
        let part = columns_of(weight, out_features, columns.clone());
        let shard = LocalLinear::upload(comm, &part, in_features, columns.len())?;
        Ok(ColumnParallelLinear {
            in_features,
            out_features,
            columns,
            shard,
            gather: None,
            dy_shard: None,
        })
    }

    /// The layer's input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The layer's (full) output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The output columns this rank owns.
    pub fn columns(&self) -> Range<usize> {
        self.columns.clone()
    }

    /// This rank's weight shard (`in x out_r`).
    pub fn weight(&self) -> &DeviceBuffer<f32> {
        &self.shard.weight
    }

    /// This rank's weight gradient (`in x out_r`), written by the last backward pass.
    pub fn weight_grad(&self) -> &DeviceBuffer<f32> {
        &self.shard.weight_grad
    }

    /// `y_shard (batch x out_r) = x (batch x in) W_r`.
    pub fn forward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        y_shard: TensorRef<'_>,
    ) -> Result<()> {
        let what = "column-parallel forward x";
        self.shard.forward(comm, kernels, what, x, y_shard)
    }

    /// `y (batch x out) = x W`, the same on every rank (one all-gather).
    pub fn forward_gathered(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        y: TensorRef<'_>,
    ) -> Result<()> {
        let batch = batch_of(comm, "column-parallel forward x", &x, self.in_features)?;
        if self.gather.as_ref().is_none_or(|g| g.shape().m != batch) {
            self.gather = Some(ColumnParallel::new(
                comm,
                batch,
                self.out_features,
                self.in_features,
            )?);
        }
        match self.gather.as_mut() {
            Some(g) => g.forward_gathered(comm, kernels, x, self.shard.weight.view(), y),
            None => Err(refuse(comm, "internal: no gather".into())),
        }
    }

    /// Backward from this rank's output gradient `dy_shard` (`batch x out_r`): writes the
    /// weight gradient `xᵀ dy_shard` and the input gradient `dx (batch x in)`, summed over the
    /// ranks with one all-reduce. `x` is the forward pass's input.
    pub fn backward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        dy_shard: TensorRef<'_>,
        dx: TensorRef<'_>,
    ) -> Result<()> {
        let what = "column-parallel backward x";
        self.shard.backward(comm, kernels, what, x, dy_shard, dx)?;
        comm.all_reduce(dx, ReduceOp::Sum)
    }

    /// Backward from the full output gradient `dy` (`batch x out`, the same on every rank), as
    /// after [`forward_gathered`](Self::forward_gathered): this rank's columns are cut out, then
    /// as [`backward`](Self::backward).
    pub fn backward_gathered(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x: TensorRef<'_>,
        dy: TensorRef<'_>,
        dx: TensorRef<'_>,
    ) -> Result<()> {
        let batch = batch_of(comm, "column-parallel backward dy", &dy, self.out_features)?;
        let len = batch * self.columns.len();
        if self.dy_shard.as_ref().is_none_or(|b| b.len() != len) {
            let made = comm.buffer::<f32>(len);
            self.dy_shard = Some(local(comm, made)?);
        }
        let Some(dy_shard) = self.dy_shard.take() else {
            return Err(refuse(comm, "internal: no dy shard".into()));
        };
        let start = self.columns.start;
        let r = kernels.copy_columns(
            comm.device(),
            dy.slice(start, dy.count - start),
            self.out_features,
            dy_shard.view(),
            self.columns.len(),
            batch,
            self.columns.len(),
        );
        let result =
            local(comm, r).and_then(|()| self.backward(comm, kernels, x, dy_shard.view(), dx));
        self.dy_shard = Some(dy_shard);
        result
    }
}

/// `Y = X W` with W (`in x out`) split by rows: rank r keeps rows [`rows`](Self::rows) of W and
/// takes the same columns of X (what a column-parallel layer before it leaves on the rank); an
/// all-reduce sums the partial products forward. Backward needs no communication.
pub struct RowParallelLinear {
    in_features: usize,
    out_features: usize,
    rows: Range<usize>,
    shard: LocalLinear,
}

impl std::fmt::Debug for RowParallelLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowParallelLinear")
            .field("in_features", &self.in_features)
            .field("out_features", &self.out_features)
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl RowParallelLinear {
    /// The layer with the full weight `weight` (`in_features x out_features`, row-major, the
    /// same on every rank); this rank uploads its rows.
    pub fn new(
        comm: &mut Communicator,
        in_features: usize,
        out_features: usize,
        weight: &[f32],
    ) -> Result<Self> {
        let what = "row-parallel linear";
        check_weight(
            comm,
            what,
            (in_features, out_features),
            in_features,
            weight.len(),
        )?;
        let rows = shard(in_features, comm.size(), comm.rank());
        let part = rows_of(weight, out_features, rows.clone());
        let shard = LocalLinear::upload(comm, part, rows.len(), out_features)?;
        Ok(RowParallelLinear {
            in_features,
            out_features,
            rows,
            shard,
        })
    }

    /// The input rows (columns of X) this rank owns.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// This rank's weight shard (`in_r x out`).
    pub fn weight(&self) -> &DeviceBuffer<f32> {
        &self.shard.weight
    }

    /// This rank's weight gradient (`in_r x out`), written by the last backward pass.
    pub fn weight_grad(&self) -> &DeviceBuffer<f32> {
        &self.shard.weight_grad
    }

    /// `y (batch x out) = sum over ranks of x_shard (batch x in_r) W_r`, on every rank.
    pub fn forward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x_shard: TensorRef<'_>,
        y: TensorRef<'_>,
    ) -> Result<()> {
        let what = "row-parallel forward x";
        self.shard.forward(comm, kernels, what, x_shard, y)?;
        comm.all_reduce(y, ReduceOp::Sum)
    }

    /// Backward from the output gradient `dy` (`batch x out`, the same on every rank): writes
    /// the weight gradient `x_shardᵀ dy` and this rank's input gradient `dx_shard (batch x in_r)`.
    pub fn backward(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        x_shard: TensorRef<'_>,
        dy: TensorRef<'_>,
        dx_shard: TensorRef<'_>,
    ) -> Result<()> {
        let what = "row-parallel backward x";
        self.shard
            .backward(comm, kernels, what, x_shard, dy, dx_shard)
    }

    /// The layer's (full) input width.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The layer's output width.
    pub fn out_features(&self) -> usize {
        self.out_features
    }
}
