//! `cargo xtask setup`: everything the build and tests need that a fresh machine lacks.
//! Each step checks first and does nothing when its piece is already in place, so a machine
//! that is set up pays a few seconds.
//!
//! - the nightly toolchain's `rust-src` (the eBPF crate builds `core` from source);
//! - `bpf-linker`, built against the nightly's own libLLVM and cached per nightly version
//!   in `~/.cache/smtpguard/bpf-linker/`, linked where `.cargo/config.toml` looks for it;
//! - clippy and rustfmt for the stable toolchain;
//! - the Debian packages the tests call.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};

const BPF_LINKER_VERSION: &str = "0.13.0";
/// What the tests, demo and benchmark run beside the daemon: `ip` and `nsenter` for
/// namespaces, `dnsmasq` as the DNS server the resolver tests query, Prometheus to scrape the
/// metrics endpoint, `nft` for the benchmark's nftables comparison, `ethtool` to switch a
/// test veth's VLAN offload (the program withholds resets where the NIC strips tags), `nginx`
/// to serve the lists fetched by URL (with `openssl` making the test CA for HTTPS), `tmux` as
/// the real terminal `smtpguard top` is tested in, `etcd-server` as the cluster a fleet follows
/// (`etcd-client` for its `etcdctl`), and `protobuf-compiler`, which the etcd client crate's
/// build runs on etcd's API definitions, with `libprotobuf-dev` for the well-known types they
/// import (`google/protobuf/descriptor.proto`).
const DEBIAN_PACKAGES: [&str; 13] = [
    "iproute2",
    "util-linux",
    "dnsmasq-base",
    "prometheus",
    "nftables",
    "ethtool",
    "nginx",
    "openssl",
    "tmux",
    "etcd-server",
    "etcd-client",
    "protobuf-compiler",
    "libprotobuf-dev",
];

pub fn run(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    nightly_rust_src()?;
    stable_components()?;
    let linker = bpf_linker()?;
    link_into_workspace(root, &linker)?;
    debian_packages()?;
    cargo_deb()?;
    eprintln!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The version of cargo-deb that builds the Debian package.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// `~/.cache/smtpguard` (or `$XDG_CACHE_HOME/smtpguard`): tools built once per machine.
fn cache_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map_or_else(|| PathBuf::from(&home).join(".cache"), PathBuf::from);
    Ok(cache.join("smtpguard"))
}

/// The cached cargo-deb, installed if missing.
pub fn cargo_deb() -> anyhow::Result<PathBuf> {
    let root = cache_dir()?.join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let binary = root.join("bin/cargo-deb");
    let works = Command::new(&binary)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    if works {
        eprintln!("setup: cargo-deb ok ({})", binary.display());
        return Ok(binary);
    }
    eprintln!("setup: installing cargo-deb {CARGO_DEB_VERSION} (about a minute)");
    crate::run(
        Path::new("."),
        "cargo",
        &[
            "install",
            "--locked",
            "--quiet",
            "--version",
            CARGO_DEB_VERSION,
            "--root",
            &root.to_string_lossy(),
            "cargo-deb",
        ],
    )?;
    Ok(binary)
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain (eBPF builds need it)");
        crate::run(
            Path::new("."),
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src ok");
        return Ok(());
    }
    crate::run(
        Path::new("."),
        "rustup",
        &["component", "add", "rust-src", "--toolchain", "nightly"],
    )
}

fn stable_components() -> anyhow::Result<()> {
    let have = |args: &[&str]| {
        Command::new("cargo")
            .args(args)
            .output()
            .is_ok_and(|output| output.status.success())
    };
    if have(&["clippy", "--version"]) && have(&["fmt", "--version"]) {
        eprintln!("setup: clippy and rustfmt ok");
        return Ok(());
    }
    crate::run(
        Path::new("."),
        "rustup",
        &["component", "add", "clippy", "rustfmt"],
    )
}

/// The cached bpf-linker for the current nightly, built if missing or stale.
fn bpf_linker() -> anyhow::Result<PathBuf> {
    let sysroot = PathBuf::from(output("rustc", &["+nightly", "--print", "sysroot"])?.trim());
    let version = output("rustc", &["+nightly", "-vV"])?;
    let release = output("rustc", &["+nightly", "-V"])?;
    let llvm_major = version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|llvm| llvm.split('.').next())
        .context("rustc +nightly -vV does not name its LLVM version")?
        .to_owned();
    let key: String = release
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let prefix = cache_dir()?.join("bpf-linker").join(&key);
    let binary = prefix.join("bin/bpf-linker");
    if linker_works(&binary, &sysroot) {
        eprintln!("setup: bpf-linker ok ({})", binary.display());
        return Ok(binary);
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (about 2 minutes)"
    );
    build_bpf_linker(&sysroot, &llvm_major, &prefix)?;
    if !linker_works(&binary, &sysroot) {
        bail!(
            "{} was built but does not run against {}",
            binary.display(),
            sysroot.display()
        );
    }
    Ok(binary)
}

/// Runs, and resolves its libLLVM inside the current nightly (a `rustup update` deletes the
/// old one).
fn linker_works(binary: &Path, sysroot: &Path) -> bool {
    if !binary.exists() {
        return false;
    }
    let Ok(ldd) = output("ldd", &[&binary.to_string_lossy()]) else {
        return false;
    };
    let resolves = ldd
        .lines()
        .any(|line| line.contains("libLLVM") && line.contains(&*sysroot.to_string_lossy()))
        && !ldd.contains("not found");
    resolves
        && Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success())
}

fn build_bpf_linker(sysroot: &Path, llvm_major: &str, prefix: &Path) -> anyhow::Result<()> {
    // rustc ships libLLVM.so.<ver> but no libLLVM.so, which `-lLLVM` needs at link time.
    let llvm_prefix = prefix.with_extension("llvm-prefix");
    let lib = llvm_prefix.join("lib");
    let _ = std::fs::remove_dir_all(&llvm_prefix);
    std::fs::create_dir_all(&lib).with_context(|| format!("create {}", lib.display()))?;
    let shipped = std::fs::read_dir(sysroot.join("lib"))
        .with_context(|| format!("read {}/lib", sysroot.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}/lib", sysroot.display()))?;
    std::os::unix::fs::symlink(&shipped, lib.join("libLLVM.so")).context("link libLLVM.so")?;
    let status = Command::new("cargo")
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
            "--root",
        ])
        .arg(prefix)
        .env("LLVM_PREFIX", &llvm_prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}/lib", sysroot.display()),
        )
        .status()
        .context("cannot run cargo install")?;
    let _ = std::fs::remove_dir_all(&llvm_prefix);
    if !status.success() {
        bail!("building bpf-linker failed with {status}");
    }
    Ok(())
}

/// `.cargo/config.toml` names `target/tools/bin/bpf-linker` as the eBPF target's linker.
fn link_into_workspace(root: &Path, linker: &Path) -> anyhow::Result<()> {
    let dir = root.join("target/tools/bin");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let link = dir.join("bpf-linker");
    if std::fs::read_link(&link).is_ok_and(|target| target == linker) {
        return Ok(());
    }
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(linker, &link)
        .with_context(|| format!("link {} to {}", link.display(), linker.display()))
}

fn debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .into_iter()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|output| {
                    String::from_utf8_lossy(&output.stdout).contains("install ok installed")
                })
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages ok ({})", DEBIAN_PACKAGES.join(", "));
        return Ok(());
    }
    crate::run(Path::new("."), "apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(missing);
    crate::run(Path::new("."), "apt-get", &args)
}
