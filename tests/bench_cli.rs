//! `wccl-bench` end to end: the table, the exit code, `#wrong` counting, CSV and plot output.

use std::process::Command;

/// Runs wccl-bench; whether it succeeded, and its standard output. A failure must be a clean
/// one: exit code 1 (a wrong value or an error) or 2 (bad flags), never a panic (101) or a
/// signal. The all-reduce runs that do not read the model pass `--probe-bytes 0`: the
/// model's 16 MiB probe costs about 5 s a run in a debug build.
fn bench(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wccl-bench"))
        .args(args)
        .output()
        .expect("run wccl-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || matches!(out.status.code(), Some(1 | 2)),
        "wccl-bench {args:?} failed uncleanly ({:?}):\n{stderr}",
        out.status
    );
    assert!(
        !stderr.contains("panicked"),
        "wccl-bench {args:?} panicked:\n{stderr}"
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn probe_on_a_headless_machine_writes_no_error() {
    // Without the variable that `.cargo/config.toml` sets: the binary quiets the layer itself.
    let out = Command::new(env!("CARGO_BIN_EXE_wccl-bench"))
        .args(["probe", "-g", "2", "-b", "4K"])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("NODEVICE_SELECT")
        .output()
        .expect("run wccl-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.to_lowercase().contains("error"), "{stderr}");
}

/// The data rows of the table.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            l.split_whitespace()
                .filter(|w| *w != "|")
                .map(String::from)
                .collect()
        })
        .collect()
}

#[test]
fn all_reduce_table_with_every_algorithm_csv_and_plot() {
    let dir = std::env::temp_dir().join(format!("wccl-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("rows.csv");
    let svg = dir.join("busbw.svg");
    let (ok, out) = bench(&[
        "all_reduce",
        "-b",
        "1K",
        "-e",
        "64K",
        "-f",
        "8",
        "-g",
        "3",
        "-n",
        "2",
        "-w",
        "1",
        "--algo",
        "ring,central,naive",
        // A small probe: the test reads that the model and the floor are there, not how good.
        "--probe-bytes",
        "1M",
        "--csv",
        csv.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
    assert!(out.contains("# Avg bus bandwidth"), "{out}");
    assert!(
        out.contains("busbw") && out.contains("#wrong") && out.contains("algbw"),
        "{out}"
    );
    let r = rows(&out);
    assert_eq!(r.len(), 3 * 3, "3 sizes x 3 algorithms:\n{out}");
    for row in &r {
        // size count type redop root algo | t algbw busbw wrong | t algbw busbw wrong | model
        let size: u64 = row[0].parse().unwrap();
        let count: u64 = row[1].parse().unwrap();
        assert_eq!(size, count * 4);
        assert_eq!(
            (row[2].as_str(), row[3].as_str(), row[4].as_str()),
            ("float", "sum", "-1")
        );
        let (t, algbw, busbw): (f64, f64, f64) = (
            row[6].parse().unwrap(),
            row[7].parse().unwrap(),
            row[8].parse().unwrap(),
        );
        assert!(t > 0.0);
        // algbw = size / time; busbw = algbw * 2(n-1)/n with n = 3 (to the printed precision).
        assert!((algbw - size as f64 / t / 1e3).abs() <= 0.0006, "{row:?}");
        assert!((busbw - algbw * 4.0 / 3.0).abs() <= 0.0011, "{row:?}");
        assert_eq!(row[9], "0");
        // model and floor (one read-back and one upload per rank): the floor depends on the
        // size alone.
        let floor: f64 = row[15].parse().unwrap();
        let same = r.iter().find(|o| o[0] == row[0]).unwrap();
        assert!(floor > 0.0 && same[15] == row[15], "{row:?}");
        assert!(row[14].parse::<f64>().unwrap() > 0.0, "{row:?}");
    }
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 1 + 9);
    assert!(
        csv.starts_with("size,count,type") && csv.lines().next().unwrap().ends_with(",floor_us")
    );
    for line in csv.lines().skip(1) {
        let floor: f64 = line.rsplit(',').next().unwrap().parse().unwrap();
        assert!(floor > 0.0, "{line}");
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.contains("<svg") && svg.contains("central") && svg.contains("naive"));
    assert!(svg.contains("floor"), "the floor's line");
}

#[test]
fn a_corrupted_element_is_counted_and_fails_the_run() {
    let (ok, out) = bench(&[
        "all_reduce",
        "-b",
        "4K",
        "-e",
        "4K",
        "-g",
        "2",
        "-n",
        "1",
        "-w",
        "0",
        "-d",
        "int32",
        "--corrupt-one",
        "--probe-bytes",
        "0",
    ]);
    assert!(
        !ok,
        "a wrong value must make the exit code non-zero:\n{out}"
    );
    let r = rows(&out);
    assert_eq!(r.len(), 1);
    // Checked at each of the 4 buffer shifts, out of place and in place.
    assert_eq!((r[0][9].as_str(), r[0][13].as_str()), ("4", "4"), "{out}");
    assert!(out.contains("# Out of bounds values : 8 FAILED"), "{out}");
}

/// The host-staged ring checks out in mapped tensors and, `--no-map`, through staging buffers
/// (every op, in and out of place, at the four buffer shifts); and the checker still sees a
/// wrong element on both paths.
#[test]
fn the_staged_ring_checks_out_mapped_and_through_staging() {
    for no_map in [false, true] {
        for corrupt in [false, true] {
            let mut args = vec![
                "all_reduce",
                "-b",
                "4K",
                "-e",
                "64K",
                "-f",
                "16",
                "-g",
                "3",
                "-n",
                "1",
                "-w",
                "0",
                "-o",
                "all",
                "--algo",
                "staged",
                "--probe-bytes",
                "0",
            ];
            if no_map {
                args.push("--no-map");
            }
            if corrupt {
                args.push("--corrupt-one");
            }
            let (ok, out) = bench(&args);
            assert_eq!(ok, !corrupt, "no_map {no_map}, corrupt {corrupt}:\n{out}");
            let r = rows(&out);
            assert_eq!(r.len(), 2 * 5, "{out}");
            let wrong: Vec<(&str, &str)> = r
                .iter()
                .map(|row| (row[9].as_str(), row[13].as_str()))
                .collect();
            if corrupt {
                assert!(wrong.iter().any(|w| *w != ("0", "0")), "{out}");
            } else {
                assert!(wrong.iter().all(|w| *w == ("0", "0")), "{out}");
            }
        }
    }
}

/// The checker must see the bugs it is there for: a chunk written 1024·k elements off, and
/// another rank's chunk, in every collective that moves data.
#[test]
fn a_misplaced_or_swapped_chunk_is_counted() {
    for c in [
        "all_reduce",
        "reduce_scatter",
        "all_gather",
        "broadcast",
        "reduce",
    ] {
        for corrupt in ["misplace:1024", "misplace:4096", "misplace:65536", "swap"] {
            let (ok, out) = bench(&[
                c,
                "-b",
                "1M",
                "-e",
                "1M",
                "-g",
                "3",
                "-n",
                "1",
                "-w",
                "0",
                "-d",
                "float",
                "--corrupt",
                corrupt,
                "--probe-bytes",
                "0",
            ]);
            let r = rows(&out);
            assert_eq!(r.len(), 1, "{c} {corrupt}:\n{out}");
            let wrong: u64 = r[0][9].parse().unwrap();
            assert!(
                !ok && wrong >= 4 * 1000,
                "{c} {corrupt}: #wrong {wrong}\n{out}"
            );
        }
    }
    // prod's inputs hold a 1 or a 2: a chunk shifted by a multiple of 3 must still show.
    for corrupt in ["misplace:3072", "swap"] {
        let (ok, out) = bench(&[
            "all_reduce",
            "-b",
            "1M",
            "-e",
            "1M",
            "-g",
            "4",
            "-n",
            "1",
            "-w",
            "0",
            "-o",
            "prod",
            "--corrupt",
            corrupt,
            "--probe-bytes",
            "0",
        ]);
        let wrong: u64 = rows(&out)[0][9].parse().unwrap();
        assert!(
            !ok && wrong >= 4 * 300,
            "prod {corrupt}: #wrong {wrong}\n{out}"
        );
    }
}

#[test]
fn every_collective_runs_and_checks() {
    for c in ["reduce_scatter", "all_gather", "broadcast", "reduce"] {
        let (ok, out) = bench(&[
            c,
            "-b",
            "300",
            "-e",
            "3000",
            "-f",
            "10",
            "-g",
            "3",
            "-n",
            "1",
            "-w",
            "0",
            "-o",
            "all",
            "-d",
            "half",
            "-r",
            "1",
            "--probe-bytes",
            "0",
        ]);
        assert!(ok, "{c}:\n{out}");
        assert!(out.contains("# Out of bounds values : 0 OK"), "{c}:\n{out}");
        // The algo column names what ran: chains for broadcast and reduce on 3 ranks (trees
        // only from 16), the ring for the others.
        let want = if c.starts_with("reduce_") || c == "all_gather" {
            "ring"
        } else {
            "chain"
        };
        let r = rows(&out);
        assert!(
            !r.is_empty() && r.iter().all(|row| row[5] == want),
            "{c}:\n{out}"
        );
    }
}

/// `-d bfloat16`, as nccl-tests spells it: every op on 3 ranks checks out, the type column says
/// bfloat16, a corrupted element is caught, and the matmul checks out in bfloat16 too.
#[test]
fn bfloat16_runs_checks_and_catches_a_wrong_element() {
    let args = [
        "all_reduce",
        "-b",
        "2002",
        "-e",
        "2002",
        "-g",
        "3",
        "-n",
        "1",
        "-w",
        "0",
        "-d",
        "bfloat16",
        "--probe-bytes",
        "0",
    ];
    let (ok, out) = bench(&[&args[..], &["-o", "all"]].concat());
    assert!(ok, "{out}");
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
    let r = rows(&out);
    assert_eq!(r.len(), 5, "{out}");
    assert!(
        r.iter().all(|row| row.contains(&"bfloat16".to_string())),
        "{out}"
    );
    let (ok, out) = bench(&[&args[..], &["--corrupt-one"]].concat());
    assert!(!ok, "a wrong bf16 value must fail the run:\n{out}");
    assert!(out.contains("FAILED"), "{out}");
    let (ok, out) = bench(&["matmul", "--sizes", "33x17x70", "-d", "bfloat16", "-n", "1"]);
    assert!(ok, "{out}");
    assert!(out.contains("over the 1e-2 error limit: 0"), "{out}");
    let (ok, _) = bench(&["matmul", "--sizes", "8x8x8", "-d", "int32"]);
    assert!(!ok, "the matmul takes float types only");
}

#[test]
fn bad_flags_are_refused() {
    let (ok, _) = bench(&["all_reduce", "-b", "12Q"]);
    assert!(!ok);
    let (ok, _) = bench(&["all_reduce", "-o", "median"]);
    assert!(!ok);
    let (ok, _) = bench(&["broadcast", "-g", "2", "-r", "5", "-b", "8", "-e", "8"]);
    assert!(!ok);
}

#[test]
fn probe_and_model_subcommands() {
    let (ok, out) = bench(&["probe", "-g", "2", "-b", "64K"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("together") && out.contains("reduce kernel traffic"),
        "{out}"
    );
    // Each rank's adapter with its bus id ("unknown" where the driver reports none).
    for r in 0..2 {
        let line = out.lines().find(|l| l.contains(&format!("rank {r}: ")));
        assert!(line.is_some_and(|l| l.contains(", bus ")), "{out}");
    }
    let (ok, out) = bench(&[
        "model",
        "--ranks",
        "2..64",
        "--link-gbps",
        "10",
        "--link-latency-us",
        "5",
        "-b",
        "64M",
        "--here",
        "2",
        "--probe-bytes",
        "64K",
    ]);
    assert!(ok, "{out}");
    // Where `auto` changes its mind on this machine: on free links, over the given one, and
    // for tensors apart from the host; each line starts from the smallest size.
    let cross: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("#  ") && l.contains(" links"))
        .collect();
    assert_eq!(cross.len(), 3, "{out}");
    assert!(cross.iter().all(|l| l.contains(" from 4 B")), "{out}");
    let rows: Vec<Vec<f64>> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(|w| w.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        rows.iter().map(|r| r[0] as usize).collect::<Vec<_>>(),
        vec![2, 4, 8, 16, 32, 64]
    );
    for r in &rows {
        // ranks, ring, central, tree, hd busbw, and the better log-step over central.
        assert_eq!(r.len(), 6, "{r:?}");
        // Ring busbw stays near the link speed; central falls behind from 4 ranks on.
        assert!(r[1] > 8.0 && r[1] <= 10.0, "{r:?}");
        if r[0] >= 4.0 {
            assert!(r[2] < r[1], "{r:?}");
        }
        // At 64 MiB halving-doubling moves the ring's volume: near the link speed too.
        assert!(r[4] > 8.0 && r[4] <= 10.0, "{r:?}");
        let best = r[3].max(r[4]);
        assert!((r[5] - best / r[2]).abs() <= 0.02 * r[5] + 0.01, "{r:?}");
    }
    // Flags that make no link are refused, not turned into NaN.
    for bad in [["--link-gbps", "0"], ["--message-us", "-1"]] {
        let (ok, out) = bench(&["model", "--here", "0", bad[0], bad[1]]);
        assert!(!ok, "{bad:?}: {out}");
    }
}

#[test]
fn ps_row_sits_beside_the_ring() {
    let (ok, out) = bench(&[
        "all_reduce",
        "-b",
        "4K",
        "-e",
        "64K",
        "-f",
        "16",
        "-g",
        "3",
        "-n",
        "2",
        "-w",
        "1",
        "--algo",
        "ring,ps",
        "--probe-bytes",
        "0",
    ]);
    assert!(ok, "{out}");
    let r = rows(&out);
    let ps: Vec<_> = r.iter().filter(|row| row[5] == "ps").collect();
    assert_eq!(ps.len(), 2, "{out}");
    for row in ps {
        assert_eq!(row[3], "avg");
        assert_eq!(row[9], "0", "{out}");
    }
}

#[test]
fn matmul_table_puts_each_kernel_beside_the_plain_one_and_checks_it() {
    let (ok, out) = bench(&[
        "matmul",
        "--sizes",
        "7,65x33x130",
        "--kernel",
        "tiled,plain,tiled-large",
        "-n",
        "1",
        "-w",
        "0",
    ]);
    assert!(ok, "{out}");
    let rows = rows(&out);
    assert_eq!(rows.len(), 6, "{out}");
    for row in &rows {
        // m n k type kernel time_ms GFLOP/s x_plain rel_err
        assert_eq!(row.len(), 9, "{row:?}");
        let err: f64 = row[8].parse().unwrap();
        assert!(err < 1e-5, "{row:?}");
        let gflops: f64 = row[6].parse().unwrap();
        assert!(gflops >= 0.0, "{row:?}");
    }
    // Plain runs first for each shape so the others can be put beside it.
    assert_eq!(rows[0][4], "plain", "{out}");
    assert_eq!(rows[3][4], "plain", "{out}");
    assert!(rows[1][7].parse::<f64>().is_ok(), "{out}");
    assert!(out.contains("# rows over the 1e-5 error limit: 0"), "{out}");
    let (ok, out) = bench(&["matmul", "--sizes", "8x8", "--kernel", "plain"]);
    assert!(
        !ok && !out.contains("plain"),
        "a malformed shape must be refused: {out}"
    );
}

#[test]
fn availability_prints_the_lectures_numbers_and_checks_its_model() {
    let (ok, out) = bench(&["availability", "--nines", "4"]);
    assert!(ok && out.contains("52.56 minutes"), "{out}");
    let (ok, out) = bench(&["availability", "--node", "0.99", "--target", "0.9999"]);
    assert!(
        ok && out.contains(": 2 replicas") && out.contains("99.99%"),
        "{out}"
    );
    let svg = std::env::temp_dir().join(format!("wccl-availability-{}.svg", std::process::id()));
    let svg_arg = svg.to_string_lossy().into_owned();
    let (ok, out) = bench(&[
        "availability",
        "--ranks",
        "64,1024,16384",
        "--simulate",
        "20000",
        "--plot",
        &svg_arg,
    ]);
    assert!(ok, "{out}");
    assert!(out.contains(": agrees"), "{out}");
    assert_eq!(rows(&out).len(), 6 + 6 + 3, "{out}"); // nines, replicas, job sizes
    let plot = std::fs::read_to_string(&svg).expect("the plot");
    assert!(plot.contains("surviving ring"), "{plot}");
    let _ = std::fs::remove_file(&svg);
    // Out of range: a clean error.
    let (ok, _) = bench(&["availability", "--nines", "-1"]);
    assert!(!ok);
}

#[test]
fn chaos_exits_non_zero_only_when_its_checks_fail() {
    let (ok, out) = bench(&["chaos", "--faults", "8", "--seed", "3"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(
            "hangs 0, silently wrong results 0, inconsistent outcomes or panics 0, lost \
             acknowledged updates 0: passed"
        ),
        "{out}"
    );
    let (ok, out) = bench(&[
        "chaos",
        "--faults",
        "8",
        "--seed",
        "3",
        "--plant",
        "wrong-element",
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("FAILED"), "{out}");
}

#[test]
fn reliability_prints_every_cell_of_the_lectures_table_and_fails_on_a_wrong_result() {
    let (ok, out) = bench(&[
        "reliability",
        "--bytes",
        "1M",
        "--scale-ranks",
        "3",
        "--iters",
        "1",
        "--steps",
        "6",
        "--model-ranks",
        "64",
        // Half the default compute (the straggler's 10x, 100 ms, stays well inside the
        // default 1 s deadline, which the warm-up's shader compiles also need).
        "--compute-ms",
        "10",
    ]);
    assert!(ok, "{out}");
    for cell in [
        "scalability     parameter server",
        "model at 64 ranks",
        "dead worker     parameter server",
        "silent (cut off)",
        "ring, fail-stop",
        "ring, survivors (wccl)",
        "10x straggler   parameter server",
        "skip_after 10.0 ms",
        "dead server     ps, one server",
        "ps, 2 replicas, Strong",
        "acknowledged updates lost: 0, every key equal to the reference of every push",
        "partition       ps, 2 replicas, Strong",
        "the replicas are equal (converged)",
        "the cut-off rank is told",
    ] {
        assert!(out.contains(cell), "no '{cell}' in:\n{out}");
    }
    assert!(out.contains("0 problems: passed"), "{out}");
    // Every row was run with the faults it names: its checks did not find a fault elsewhere.
    assert!(!out.contains("WRONG"), "{out}");
    let (ok, out) = bench(&[
        "reliability",
        "--only",
        "dead-worker",
        "--steps",
        "4",
        "--plant",
        "wrong-element",
    ]);
    assert!(!ok, "{out}");
    // Both halves of the row catch it: a ring rank's result and the servers' parameters.
    assert!(out.contains("WRONG: ring rank"), "{out}");
    assert!(out.contains("WRONG: ps, a dead worker"), "{out}");
    assert!(out.contains("FAILED"), "{out}");
    let (ok, _) = bench(&["reliability", "--only", "everything"]);
    assert!(!ok);
    for bad in [
        &["--ranks", "2"][..],
        &["--grad", "1G"],
        &["--link-latency-us=-1"],
        &["--compute-ms", "100"],
    ] {
        let mut args = vec!["reliability"];
        args.extend_from_slice(bad);
        let (ok, _) = bench(&args);
        assert!(!ok, "{bad:?} was accepted");
    }
}

/// `--algo ring,staged,auto` on reduce_scatter and all_gather with the probe on: a row for
/// each, auto's labelled with what it ran (`auto:ring` or `auto:staged`), every row with the
/// model's prediction, every result checked.
#[test]
fn reduce_scatter_and_all_gather_rows_have_auto_and_the_model() {
    for c in ["reduce_scatter", "all_gather"] {
        let (ok, out) = bench(&[
            c,
            "-b",
            "3K",
            "-e",
            "3K",
            "-g",
            "3",
            "-n",
            "1",
            "-w",
            "0",
            "--algo",
            "ring,staged,auto",
            "--probe-bytes",
            "64K",
        ]);
        assert!(ok, "{c}:\n{out}");
        assert!(out.contains("# Out of bounds values : 0 OK"), "{c}:\n{out}");
        let r = rows(&out);
        let labels: Vec<&str> = r.iter().map(|row| row[5].as_str()).collect();
        assert_eq!(labels.len(), 3, "{c}:\n{out}");
        assert_eq!(&labels[..2], &["ring", "staged"], "{c}:\n{out}");
        assert!(
            matches!(labels[2], "auto:ring" | "auto:staged"),
            "{c}:\n{out}"
        );
        for row in &r {
            let model: f64 = row[14].parse().unwrap_or(0.0);
            assert!(model > 0.0, "{c}: no model in {row:?}");
        }
    }
}
