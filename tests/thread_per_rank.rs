//! The way training code calls NCCL: one thread per rank, each calling the collectives in the
//! same order on its own communicator, with typed device buffers.

use rand::Rng;
use wccl::{CommGroup, Communicator, ReduceOp};

fn rank_main(comm: &mut Communicator, inputs: &[Vec<i32>]) -> wccl::Result<()> {
    let (n, r) = (comm.size(), comm.rank());
    let len = inputs[0].len();
    let mine = &inputs[r];
    let sum: Vec<i32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).sum())
        .collect();
    let max: Vec<i32> = (0..len)
        .map(|i| inputs.iter().map(|v| v[i]).max().unwrap_or(0))
        .collect();

    // In-place all-reduce.
    let buf = comm.upload(mine)?;
    comm.all_reduce(&buf, ReduceOp::Sum)?;
    assert_eq!(comm.download(&buf)?, sum, "all_reduce on rank {r}");

    // Out-of-place all-reduce: the input stays.
    let input = comm.upload(mine)?;
    let output = comm.upload(&vec![i32::MIN; len])?;
    comm.all_reduce_into(&input, &output, ReduceOp::Max)?;
    assert_eq!(comm.download(&output)?, max);
    assert_eq!(comm.download(&input)?, *mine);

    // Reduce-scatter of n chunks of len/n (len is a multiple of n here).
    let chunk = len / n;
    let rs_out = comm.upload(&vec![-1; chunk])?;
    comm.reduce_scatter(&input, &rs_out, ReduceOp::Sum)?;
    assert_eq!(
        comm.download(&rs_out)?,
        sum[r * chunk..(r + 1) * chunk].to_vec()
    );

    // All-gather of each rank's first `chunk` elements.
    let piece = comm.upload(&mine[..chunk])?;
    let gathered = comm.upload(&vec![-1; n * chunk])?;
    comm.all_gather(&piece, &gathered)?;
    let expected: Vec<i32> = inputs.iter().flat_map(|v| v[..chunk].to_vec()).collect();
    assert_eq!(comm.download(&gathered)?, expected);

    // Broadcast and reduce from the last rank.
    let root = n - 1;
    let b = comm.upload(mine)?;
    comm.broadcast(&b, root)?;
    assert_eq!(comm.download(&b)?, inputs[root]);
    let red = comm.upload(mine)?;
    comm.reduce(&red, ReduceOp::Sum, root)?;
    if r == root {
        assert_eq!(comm.download(&red)?, sum);
    }
    comm.barrier()?;
    assert_eq!(comm.seq(), 7);
    Ok(())
}

#[test]
fn one_thread_per_rank() {
    for n in [2, 3, 5] {
        let len = n * 333;
        let mut rng = rand::rng();
        let inputs: Vec<Vec<i32>> = (0..n)
            .map(|_| (0..len).map(|_| rng.random_range(-1000..1000)).collect())
            .collect();
        let comms = CommGroup::builder()
            .ranks(n)
            .build()
            .expect("group")
            .into_communicators();
        let inputs = &inputs;
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|mut c| s.spawn(move || rank_main(&mut c, inputs)))
                .collect();
            for h in handles {
                h.join()
                    .expect("rank thread panicked")
                    .expect("rank failed");
            }
        });
    }
}
