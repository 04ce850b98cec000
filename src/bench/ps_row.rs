//! `--algo ps`: an all-reduce through the parameter server (push, aggregate on the server's
//! device, pull), timed like the collectives so its busbw sits beside the ring's.

use std::time::{Duration, Instant};

use super::BenchError;
use super::report::{Measure, Row, busbw_factor};
use super::verify::{Pattern, is_right};
use crate::ps::{Mode, ParameterServer, Sgd};
use crate::{CollectiveKind, DType, ReduceOp};

/// One row per size: `ranks` workers and one more rank as the server, f32. Each iteration every
/// worker pushes its buffer for step t and pulls step t+1 (which waits for the aggregate). With
/// SGD at lr = -1 and no momentum the first pull returns the mean of the inputs, which is
/// checked (`#wrong`); the same time stands in both the out-of-place and in-place columns.
pub fn ps_rows(
    ranks: usize,
    sizes: &[u64],
    iters: usize,
    warmup: usize,
    check: bool,
    timeout: Duration,
) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for &bytes in sizes {
        let count = (bytes / 4) as usize;
        if count == 0 {
            continue;
        }
        let (servers, workers) = ParameterServer::builder()
            .servers(1)
            .workers(ranks)
            .mode(Mode::Sync)
            .rule(Sgd {
                lr: -1.0,
                momentum: 0.0,
            })
            .param("x", vec![0.0; count])
            .timeout(timeout)
            .build()?;
        let steps = (warmup + iters.max(1)) as u64;
        let results = std::thread::scope(|s| {
            let hs: Vec<_> = servers
                .into_iter()
                .map(|sv| s.spawn(move || sv.serve()))
                .collect();
            let ws: Vec<_> = workers
                .into_iter()
                .map(|mut w| {
                    s.spawn(move || -> crate::Result<(f64, u64)> {
                        let q = w.index();
                        let pattern = Pattern::new(DType::F32, ReduceOp::Sum, ranks);
                        let values: Vec<f32> =
                            (0..count).map(|i| pattern.value(q, i) as f32).collect();
                        let grad = w.comm().upload(&values)?;
                        let params = w.comm().buffer::<f32>(count)?;
                        let mut wrong = 0;
                        let mut started = Instant::now();
                        for step in 0..steps {
                            if step == warmup as u64 {
                                started = Instant::now();
                            }
                            w.push("x", &grad, step)?;
                            w.pull("x", step + 1, &params)?;
                            if step == 0 && check {
                                let got = w.comm().download(&params)?;
                                wrong = got
                                    .iter()
                                    .enumerate()
                                    .filter(|&(i, g)| {
                                        let mean =
                                            (0..ranks).map(|r| pattern.value(r, i)).sum::<f64>()
                                                / ranks as f64;
                                        !is_right(DType::F32, *g as f64, mean)
                                    })
                                    .count() as u64;
                            }
                        }
                        let secs = started.elapsed().as_secs_f64() / iters.max(1) as f64;
                        w.done()?;
                        Ok((secs, wrong))
                    })
                })
                .collect();
            let ws: Vec<_> = ws.into_iter().map(|h| h.join()).collect();
            let hs: Vec<_> = hs.into_iter().map(|h| h.join()).collect();
            (ws, hs)
        });
        let (ws, hs) = results;
        let mut seconds = 0.0f64;
        let mut wrong = 0;
        for r in ws {
            let (s, w) = r.map_err(|_| "a ps worker thread panicked")??;
            seconds = seconds.max(s);
            wrong += w;
        }
        for r in hs {
            r.map_err(|_| "a ps server thread panicked")??;
        }
        let m = Measure::new(
            bytes,
            seconds,
            busbw_factor(CollectiveKind::AllReduce, ranks),
            wrong,
        );
        rows.push(Row {
            size: (count * 4) as u64,
            count: count as u64,
            dtype: DType::F32,
            op: Some(ReduceOp::Avg),
            root: -1,
            algo: "ps".into(),
            out_of_place: m,
            in_place: m,
            predicted: None,
            floor: None,
        });
    }
    Ok(rows)
}
