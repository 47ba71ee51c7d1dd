//! Developer workflows: `setup` installs what the build and tests need (idempotently),
//! `test` runs every check CI runs, `demo` shows the lock-down on throwaway namespaces.
//!
//! xtask depends on nothing that needs the eBPF toolchain, so it builds on a machine that has
//! never seen this project and can then install the rest.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "smtpguard developer workflows")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain pieces and Debian packages the build and tests need.
    Setup,
    /// Setup, format check, clippy (host and eBPF crates), unit, kernel and end-to-end tests.
    Test,
    /// Lock port 25 down on two throwaway namespaces and show what gets through.
    Demo,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(&root),
        Task::Test => test(&root),
        Task::Demo => demo(&root),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

/// Runs `program args` in `root`, failing with the command line if it fails.
pub(crate) fn run(root: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("==> {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed with {status}", args.join(" "));
    }
    eprintln!("    ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask {task}` needs root: it loads XDP programs and creates network namespaces"
        );
    }
    Ok(())
}

fn test(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    require_root("test")?;
    setup::run(root)?;
    run(root, "cargo", &["fmt", "--all", "--check"])?;
    run(
        root,
        "cargo",
        &[
            "clippy",
            "--locked",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    run(
        root,
        "cargo",
        &[
            "+nightly",
            "clippy",
            "--locked",
            "--package",
            "smtpguard-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ],
    )?;
    // The end-to-end tests run the real binary.
    run(
        root,
        "cargo",
        &["build", "--locked", "--package", "smtpguard"],
    )?;
    run(root, "cargo", &["test", "--locked", "--no-fail-fast"])?;
    eprintln!(
        "all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn demo(root: &Path) -> anyhow::Result<()> {
    require_root("demo")?;
    setup::run(root)?;
    run(
        root,
        "cargo",
        &["build", "--locked", "--package", "smtpguard"],
    )?;
    run(
        root,
        "cargo",
        &[
            "run",
            "--quiet",
            "--locked",
            "--package",
            "smtpguard-tests",
            "--bin",
            "demo",
        ],
    )
}
