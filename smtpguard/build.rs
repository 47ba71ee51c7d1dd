//! Builds the XDP program with the nightly toolchain (aya-build) so the daemon can embed it.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "smtpguard-ebpf")
        .ok_or_else(|| anyhow!("smtpguard-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", ebpf.manifest_path))?;
    // The test-only upgrade build gives the program the other map layout too.
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_UPGRADE_TEST");
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_UPGRADE_TEST").is_some() {
        &["layout-bump"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            features,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
