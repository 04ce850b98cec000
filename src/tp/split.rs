//! One matrix product split across the ranks of a communicator: by columns of B
//! ([`ColumnParallel`], joined by an all-gather) or along the inner dimension
//! ([`RowParallel`], joined by an all-reduce).

use std::ops::Range;

use super::kernels::{Kernels, Matmul};
use super::{local, refuse};
use crate::comm::Communicator;
use crate::device::{DeviceBuffer, TensorRef};
use crate::error::{At, Result};
use crate::types::{DType, ReduceOp};

/// The part of `len` items that part `index` of `parts` owns: contiguous, in order, the first
/// `len % parts` parts one item longer than the rest.
///
/// ```
/// assert_eq!(wccl::tp::shard(10, 4, 0), 0..3);
/// assert_eq!(wccl::tp::shard(10, 4, 3), 8..10);
/// ```
pub fn shard(len: usize, parts: usize, index: usize) -> Range<usize> {
    let parts = parts.max(1);
    let (q, r) = (len / parts, len % parts);
    let start = index * q + index.min(r);
    start..start + q + usize::from(index < r)
}

/// Columns `cols` of a row-major `rows x width` host matrix, as a `rows x cols.len()` matrix.
///
/// ```
/// let m = [1, 2, 3, 4, 5, 6]; // 2 x 3
/// assert_eq!(wccl::tp::columns_of(&m, 3, 1..3), vec![2, 3, 5, 6]);
/// ```
pub fn columns_of<T: Copy>(matrix: &[T], width: usize, cols: Range<usize>) -> Vec<T> {
    matrix
        .chunks(width.max(1))
        .flat_map(|row| row[cols.clone()].iter().copied())
        .collect()
}

/// Rows `rows` of a row-major host matrix with `width` columns.
///
/// ```
/// let m = [1, 2, 3, 4, 5, 6]; // 3 x 2
/// assert_eq!(wccl::tp::rows_of(&m, 2, 1..3), &[3, 4, 5, 6]);
/// ```
pub fn rows_of<T>(matrix: &[T], width: usize, rows: Range<usize>) -> &[T] {
    &matrix[rows.start * width..rows.end * width]
}

/// Checks that `len` (columns or rows to split) gives every rank at least one.
fn check_split(comm: &mut Communicator, what: &str, len: usize) -> Result<()> {
    if len < comm.size() {
        return Err(refuse(
            comm,
            format!(
                "cannot split {len} {what} over {} ranks: every rank needs at least one",
                comm.size()
            ),
        ));
    }
    Ok(())
}

/// `C = A B` with B split by columns: rank r holds all of A (`m x k`) and columns
/// [`columns`](Self::columns) of B (`k x n_r`), and computes the same columns of C. An
/// all-gather joins them when the full C is wanted ([`forward_gathered`](Self::forward_gathered)).
/// Column counts that do not divide by the number of ranks are fine (see [`shard`]).
pub struct ColumnParallel {
    spec: Matmul,
    rank: usize,
    ranks: usize,
    /// The gather's scratch: this rank's padded block and everyone's, as 4-byte words, with the
    /// element type and block length they were made for.
    scratch: Option<(DeviceBuffer<u32>, DeviceBuffer<u32>, DType, usize)>,
}

impl std::fmt::Debug for ColumnParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ColumnParallel")
            .field("rank", &self.rank)
            .field("ranks", &self.ranks)
            .finish_non_exhaustive()
    }
}

impl ColumnParallel {
    /// The split of an `m x n x k` product over `comm`'s ranks; fails when n < ranks.
    pub fn new(comm: &mut Communicator, m: usize, n: usize, k: usize) -> Result<Self> {
        check_split(comm, "columns", n)?;
        Ok(ColumnParallel {
            spec: Matmul::new(m, n, k),
            rank: comm.rank(),
            ranks: comm.size(),
            scratch: None,
        })
    }

    /// The product's full shape (C is `m x n`).
    pub fn shape(&self) -> Matmul {
        self.spec
    }

    /// The columns of B and C this rank owns.
    pub fn columns(&self) -> Range<usize> {
        shard(self.spec.n, self.ranks, self.rank)
    }

    /// `c_shard (m x n_r) = a (m x k) b_shard (k x n_r)`; no communication.
    pub fn forward(
        &self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        a: TensorRef<'_>,
        b_shard: TensorRef<'_>,
        c_shard: TensorRef<'_>,
    ) -> Result<()> {
        let Matmul { m, k, .. } = self.spec;
        let spec = Matmul {
            n: self.columns().len(),
            ..Matmul::new(m, 0, k)
        };
        let r = kernels.matmul(comm.device(), &spec, a, b_shard, c_shard);
        local(comm, r)
    }

    /// The full `c (m x n) = a b` on every rank: each computes its columns, an all-gather
    /// brings everyone's, and a copy puts each block of columns in place. Shards are padded to
    /// the widest so that the all-gather moves equal blocks.
    pub fn forward_gathered(
        &mut self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        a: TensorRef<'_>,
        b_shard: TensorRef<'_>,
        c: TensorRef<'_>,
    ) -> Result<()> {
        let Matmul { m, n, .. } = self.spec;
        if c.count != m * n {
            return Err(refuse(
                comm,
                format!(
                    "column-parallel: c has {} elements, m x n is {}",
                    c.count,
                    m * n
                ),
            ));
        }
        let width = n.div_ceil(self.ranks);
        let block_len = m * width;
        let made = self.make_scratch(comm, c.dtype, block_len);
        local(comm, made)?;
        let Some((block, all, _, _)) = &self.scratch else {
            return Err(refuse(comm, "internal: no scratch buffers".into()));
        };
        let block = TensorRef::new(block.raw(), 0, block_len, c.dtype);
        let all = TensorRef::new(all.raw(), 0, block_len * self.ranks, c.dtype);
        let own = self.columns().len();
        self.forward(comm, kernels, a, b_shard, block.slice(0, m * own))?;
        comm.all_gather(block, all)?;
        for q in 0..self.ranks {
            let cols = shard(n, self.ranks, q);
            let r = kernels.copy_columns(
                comm.device(),
                all.slice(q * block_len, m * cols.len()),
                cols.len(),
                c.slice(cols.start, c.count - cols.start),
                n,
                m,
                cols.len(),
            );
            local(comm, r)?;
        }
        Ok(())
    }

    /// The gather's two scratch buffers (this rank's padded block, everyone's), kept while
    /// their size and type stay the same.
    fn make_scratch(&mut self, comm: &Communicator, dtype: DType, block_len: usize) -> Result<()> {
        let fits = self
            .scratch
            .as_ref()
            .is_some_and(|s| s.2 == dtype && s.3 == block_len);
        if !fits {
            comm.device().check_dtype(At::rank(comm.rank()), dtype)?;
            let words = |len: usize| (len * dtype.size()).div_ceil(4);
            let block = comm.buffer::<u32>(words(block_len))?;
            let all = comm.buffer::<u32>(words(block_len * self.ranks))?;
            self.scratch = Some((block, all, dtype, block_len));
        }
        Ok(())
    }
}

/// `C = A B` split along the inner dimension: rank r holds columns [`rows`](Self::rows) of A
/// (`m x k_r`) and the same rows of B (`k_r x n`), computes the partial product `A_r B_r`
/// (`m x n`), and an all-reduce sums the partial products into C on every rank.
pub struct RowParallel {
    spec: Matmul,
    rank: usize,
    ranks: usize,
}

impl std::fmt::Debug for RowParallel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RowParallel")
            .field("rank", &self.rank)
            .field("ranks", &self.ranks)
            .finish_non_exhaustive()
    }
}

impl RowParallel {
    /// The split of an `m x n x k` product over `comm`'s ranks; fails when k < ranks.
    pub fn new(comm: &mut Communicator, m: usize, n: usize, k: usize) -> Result<Self> {
        check_split(comm, "inner rows", k)?;
        Ok(RowParallel {
            spec: Matmul::new(m, n, k),
            rank: comm.rank(),
            ranks: comm.size(),
        })
    }

    /// The product's full shape.
    pub fn shape(&self) -> Matmul {
        self.spec
    }

    /// The columns of A and rows of B this rank owns.
    pub fn rows(&self) -> Range<usize> {
        shard(self.spec.k, self.ranks, self.rank)
    }

    /// `c (m x n) = sum over ranks of a_shard (m x k_r) b_shard (k_r x n)`, on every rank.
    pub fn forward(
        &self,
        comm: &mut Communicator,
        kernels: &mut Kernels,
        a_shard: TensorRef<'_>,
        b_shard: TensorRef<'_>,
        c: TensorRef<'_>,
    ) -> Result<()> {
        let spec = Matmul {
            k: self.rows().len(),
            ..self.spec
        };
        let r = kernels.matmul(comm.device(), &spec, a_shard, b_shard, c);
        local(comm, r)?;
        comm.all_reduce(c, ReduceOp::Sum)
    }
}
