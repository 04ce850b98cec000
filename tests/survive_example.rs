//! `examples/survive.rs` as a test: 4 ranks train through a kill at step 100 and a rejoin at
//! step 150, every rank's every step checked against the f64 mean of its contributors.

#[allow(dead_code)] // its `main` is the example's, unused here
#[path = "../examples/survive.rs"]
mod survive;

#[test]
fn training_goes_on_through_a_kill_and_a_rejoin() {
    let s = survive::run(7).unwrap_or_else(|e| panic!("the example failed: {e}"));
    assert_eq!(
        s.wrong, 0,
        "steps whose average differs from their contributors' mean"
    );
    // Both runs, every rank's every step: 4 x 200 without faults; with them, 4 ranks to step
    // 100, 3 (or 4, if the victim finished its last call) at it, 3 to 150, 4 after.
    assert!(
        s.checked >= 4 * 200 + 4 * 100 + 3 * 50 + 4 * 50,
        "{} steps",
        s.checked
    );
    assert!(s.recovered_in.is_some(), "the kill was recovered from");
    // The model still learns: within 10x of the fault-free run's held-out loss.
    let (faulty, clean) = s.loss;
    assert!(
        faulty <= 10.0 * clean + 1e-4,
        "loss {faulty} against {clean}"
    );
}
