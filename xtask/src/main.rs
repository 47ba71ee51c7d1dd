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
    /// Measure: per-packet cost beside an XDP_DROP floor, a SYN flood against nftables,
    /// policy apply through the daemon. Pass `-- --quick` for a short run.
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Differential fuzzing of the program against an independent classifier:
    /// `cargo xtask fuzz [FRAMES] [SEED]` (default a million frames).
    Fuzz {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The Linux kernel as the oracle: the same frames into a real kernel without a filter,
    /// behind the daemon dropping and behind it rejecting; its answers judge the filter:
    /// `cargo xtask oracle [FRAMES] [SEED]` (default 100,000 frames).
    Oracle {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build the Debian package (release binary, systemd unit, default config, man page)
    /// into target/package/.
    Package,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::run(&root),
        Task::Test => test(&root),
        Task::Demo => demo(&root),
        Task::Bench { args } => release_tool(&root, "bench", &args),
        Task::Fuzz { args } => release_tool(&root, "fuzz", &args),
        Task::Oracle { args } => release_tool(&root, "oracle", &args),
        Task::Package => {
            setup::run(&root)?;
            let deb = package(&root)?;
            println!("{}", deb.display());
            Ok(())
        }
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
    // The upgrade tests need a second build whose map layout differs; it is built first and
    // copied aside, because the package build below overwrites target/release/smtpguard.
    let upgrade = upgrade_build(root)?;
    // The packaging test installs the package this run builds, and the end-to-end tests run
    // the release binary it holds.
    let deb = package(root)?;
    // SAFETY: single-threaded at this point; the variables are read by the child processes.
    unsafe {
        std::env::set_var("SMTPGUARD_DEB", &deb);
        std::env::set_var("SMTPGUARD_BIN", root.join("target/release/smtpguard"));
        std::env::set_var("SMTPGUARD_UPGRADE_BIN", &upgrade);
    }
    let summary = cargo_test(root)?;
    eprintln!(
        "all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    // The closing line: the totals of every test binary.
    println!("{summary}");
    Ok(())
}

/// Runs the release build of the tests crate's `tool` binary, with the release daemon.
fn release_tool(root: &Path, tool: &str, args: &[String]) -> anyhow::Result<()> {
    require_root(tool)?;
    setup::run(root)?;
    run(
        root,
        "cargo",
        &[
            "build",
            "--locked",
            "--release",
            "--package",
            "smtpguard",
            "--package",
            "smtpguard-tests",
            "--bin",
            "smtpguard",
            "--bin",
            tool,
        ],
    )?;
    let binary = root.join("target/release").join(tool);
    let status = Command::new(&binary)
        .args(args)
        .env("SMTPGUARD_BIN", root.join("target/release/smtpguard"))
        .current_dir(root)
        .status()
        .with_context(|| format!("run {}", binary.display()))?;
    if !status.success() {
        bail!("{tool} failed with {status}");
    }
    Ok(())
}

/// Builds the test-only `upgrade-test` daemon (another map layout, link swaps that fail on
/// request) and copies it to `target/upgrade-test/smtpguard`, where the upgrade tests find it.
fn upgrade_build(root: &Path) -> anyhow::Result<PathBuf> {
    run(
        root,
        "cargo",
        &[
            "build",
            "--locked",
            "--release",
            "--package",
            "smtpguard",
            "--features",
            "upgrade-test",
        ],
    )?;
    let dir = root.join("target/upgrade-test");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let binary = dir.join("smtpguard");
    std::fs::copy(root.join("target/release/smtpguard"), &binary)
        .with_context(|| format!("copy the upgrade build to {}", binary.display()))?;
    Ok(binary)
}

/// Builds `target/package/smtpguard_VERSION_ARCH.deb` with cargo-deb: the release binary,
/// the systemd unit, the default configuration (a conffile) and the manual page.
fn package(root: &Path) -> anyhow::Result<PathBuf> {
    let out = root.join("target/package");
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    run(
        root,
        "cargo",
        &["build", "--locked", "--release", "--package", "smtpguard"],
    )?;
    let page = Command::new(root.join("target/release/smtpguard"))
        .arg("manpage")
        .output()
        .context("run smtpguard manpage")?;
    if !page.status.success() {
        bail!(
            "smtpguard manpage failed: {}",
            String::from_utf8_lossy(&page.stderr)
        );
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut encoder, &page.stdout)?;
    std::fs::write(out.join("smtpguard.8.gz"), encoder.finish()?)
        .context("write the manual page")?;
    let cargo_deb = setup::cargo_deb()?;
    let output = Command::new(&cargo_deb)
        .args([
            "deb",
            "--locked",
            "--no-build",
            "--package",
            "smtpguard",
            "--output",
        ])
        .arg(&out)
        .current_dir(root)
        .output()
        .with_context(|| format!("run {}", cargo_deb.display()))?;
    if !output.status.success() {
        bail!(
            "cargo deb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let deb = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    eprintln!("==> package {}", deb.display());
    Ok(deb)
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

/// `cargo test` over the default members, echoing its output; returns the totals of every
/// test binary as one line (cargo's own last lines are for the doc-tests, which are none).
fn cargo_test(root: &Path) -> anyhow::Result<String> {
    use std::io::{BufRead as _, BufReader};
    let started = Instant::now();
    eprintln!("==> cargo test --locked --no-fail-fast");
    let mut child = Command::new("cargo")
        .args(["test", "--locked", "--no-fail-fast"])
        .current_dir(root)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(result) = line.strip_prefix("test result: ") {
            for part in result.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(count), Some(kind)) = (words.next(), words.next()) {
                    let count: u64 = count.parse().unwrap_or(0);
                    match kind {
                        "passed" => passed += count,
                        "failed" => failed += count,
                        "ignored" => ignored += count,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    eprintln!("    ({:.1} s)", started.elapsed().as_secs_f64());
    let summary = format!("{passed} passed, {failed} failed, {ignored} skipped");
    if !status.success() {
        println!("{summary}");
        bail!("cargo test failed with {status}");
    }
    Ok(summary)
}
