//! `cargo xtask fuzz [FRAMES] [SEED]`: differential fuzzing of the real program against the
//! independent reference, under a drop and a reject policy; exits non-zero on any
//! disagreement.

use std::time::Instant;

use smtpguard_tests::fuzz;

fn main() {
    let mut args = std::env::args().skip(1);
    let frames: u64 = args
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let seed: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0x5347);
    let started = Instant::now();
    let outcome = fuzz::run(seed, frames);
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} frames (seed {seed:#x}) in {elapsed:.1} s ({:.0} frames/s; {} more not runnable: under 14 bytes or over a page), each under a drop and a reject policy: {} dropped, {} reset by the program, {} disagreements with the reference",
        outcome.frames,
        outcome.frames as f64 / elapsed,
        outcome.not_runnable,
        outcome.dropped,
        outcome.reset,
        outcome.disagreements
    );
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
