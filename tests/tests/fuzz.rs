//! A short, fixed-seed run of the differential fuzzer (`cargo xtask fuzz` runs a million
//! frames): the real program and the independent reference agree on every frame.

use smtpguard_tests::fuzz;

#[test]
fn the_program_agrees_with_the_reference_on_random_and_mutated_frames() {
    let outcome = fuzz::run(0x5347_0001, 30_000);
    let examples: Vec<String> = outcome
        .examples
        .iter()
        .map(|(expected, got, hex)| format!("{}: {hex}", fuzz::describe(*expected, *got)))
        .collect();
    assert_eq!(
        outcome.disagreements,
        0,
        "disagreements, first ones:\n{}",
        examples.join("\n")
    );
    // The run exercised both outcomes, not one of them only.
    assert!(
        outcome.dropped > outcome.frames / 20 && outcome.dropped < outcome.frames / 2,
        "{outcome:?}"
    );
}
