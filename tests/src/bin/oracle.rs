//! `cargo xtask oracle [FRAMES] [SEED]`: the same random and mutated frames injected into a
//! real kernel without a filter, behind the daemon dropping, and behind it rejecting; the
//! kernel's answers judge the filter. Exits non-zero on any bypass, wrongly stopped SYN or
//! bad RST.

use std::time::Instant;

use smtpguard_tests::oracle;

fn main() {
    let mut args = std::env::args().skip(1);
    let frames: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let seed: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(0x5347);
    let started = Instant::now();
    let report = oracle::run(seed, frames);
    print!("{report}");
    println!("in {:.1} s", started.elapsed().as_secs_f64());
    if !report.clean() {
        std::process::exit(1);
    }
}
