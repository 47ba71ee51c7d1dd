//! `cargo xtask fuzz [FRAMES] [SEED] [--canary]`: differential fuzzing of the real program
//! against the independent reference, under a drop and a reject policy; exits non-zero on
//! any disagreement. With `--canary`, a canary compares every frame with a very different
//! candidate policy, which must change no verdict.

use std::time::Instant;

use smtpguard_tests::fuzz;

fn main() {
    let canary = std::env::args().any(|arg| arg == "--canary");
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--canary");
    let frames: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0x5347);
    let started = Instant::now();
    let outcome = fuzz::run_with(seed, frames, canary);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} frames (seed {seed:#x}) in {elapsed:.1} s ({:.0} frames/s; {} more not runnable: under 14 bytes or over a page), each under a drop policy, a reject policy and a drop policy without its scope (the IPv4 table decides): {} dropped, {} reset by the program, {} disagreements with the reference",
        outcome.frames,
        outcome.frames as f64 / elapsed,
        outcome.not_runnable,
        outcome.dropped,
        outcome.reset,
        outcome.disagreements
    );
    if canary {
        println!(
            "  canary: {} SYNs the candidate would decide otherwise, every verdict the running policy's",
            outcome.canary_changes
        );
    }
    for (kind, count) in &outcome.kinds {
        println!("  {count:>8}  {kind}");
    }
    for example in &outcome.examples {
        println!("  {example}");
    }
    if outcome.disagreements > 0 {
        std::process::exit(1);
    }
}
