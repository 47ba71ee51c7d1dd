//! A short, fixed-seed run of the differential fuzzer (`cargo xtask fuzz` runs a million
//! frames): the real program and the reference agree on every frame, under a drop and a
//! reject policy, and every reset is the RST the reference describes.

use smtpguard_tests::fuzz;

#[test]
fn the_program_agrees_with_the_reference_on_random_and_mutated_frames() {
    let outcome = fuzz::run(0x5347_0001, 30_000);
    let kinds: Vec<String> = outcome
        .kinds
        .iter()
        .map(|(kind, count)| format!("{count:>6}  {kind}"))
        .collect();
    assert_eq!(
        outcome.disagreements,
        0,
        "{} disagreements with the reference; by kind:\n{}\nfirst ones:\n{}",
        outcome.disagreements,
        kinds.join("\n"),
        outcome.examples.join("\n")
    );
    // The run exercised every outcome, not one of them only.
    assert!(
        outcome.dropped > outcome.frames / 20 && outcome.dropped < outcome.frames / 2,
        "drops: {outcome:?}"
    );
    assert!(outcome.reset > outcome.frames / 50, "resets: {outcome:?}");
}

/// A canary compares every frame with a candidate policy unlike the running one: it records
/// changes, and changes no verdict (the reference judges by the running policy alone).
#[test]
fn a_running_canary_changes_no_verdict() {
    let outcome = fuzz::run_with(0x5347_0002, 20_000, true);
    assert_eq!(
        outcome.disagreements,
        0,
        "the canary changed verdicts; first ones:\n{}",
        outcome.examples.join("\n")
    );
    assert!(
        outcome.canary_changes > outcome.frames / 50,
        "the canary compared frames: {outcome:?}"
    );
}
