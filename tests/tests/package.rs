//! The Debian package `cargo xtask package` builds (the path arrives in `SMTPGUARD_DEB`):
//! its files, its conffile, a unit that `systemd-analyze verify` accepts, and an install and
//! purge with dpkg on this machine. A machine that already has an smtpguard package of its own
//! is left alone.

use std::process::Command;

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("cannot run {program}: {error}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn must(program: &str, args: &[&str]) -> String {
    let (ok, text) = run(program, args);
    assert!(ok, "{program} {args:?} failed:\n{text}");
    text
}

#[test]
fn the_package_installs_verifies_and_purges() {
    let Some(deb) = std::env::var_os("SMTPGUARD_DEB") else {
        eprintln!("SMTPGUARD_DEB is not set: run `cargo xtask test`, which builds the package");
        return;
    };
    let deb = deb.to_string_lossy().into_owned();
    let (installed, status) = run("dpkg-query", &["-W", "-f=${Status}", "smtpguard"]);
    if installed && status.contains("install ok installed") {
        panic!("an smtpguard package is already installed here; not touching it");
    }

    let files = must("dpkg-deb", &["-c", &deb]);
    for path in [
        "./usr/sbin/smtpguard",
        "./lib/systemd/system/smtpguard.service",
        "./etc/smtpguard/smtpguard.toml",
        "./usr/share/man/man8/smtpguard.8.gz",
        "./usr/share/doc/smtpguard/README.md",
        "./usr/share/smtpguard/grafana-dashboard.json",
    ] {
        assert!(
            files.contains(path),
            "{path} missing from the package:\n{files}"
        );
    }
    let conffiles = must("dpkg-deb", &["-f", &deb, "Package"]);
    assert_eq!(conffiles.trim(), "smtpguard");
    let control = must("dpkg-deb", &["-I", &deb]);
    assert!(control.contains("conffiles"), "{control}");

    must("dpkg", &["-i", &deb]);
    let outcome = std::panic::catch_unwind(|| {
        let listed = must("dpkg", &["-L", "smtpguard"]);
        assert!(listed.contains("/usr/sbin/smtpguard"), "{listed}");
        let conffiles = must("dpkg-query", &["-W", "-f=${Conffiles}", "smtpguard"]);
        assert!(
            conffiles.contains("/etc/smtpguard/smtpguard.toml"),
            "{conffiles}"
        );
        let version = must("/usr/sbin/smtpguard", &["--version"]);
        assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
        // The shipped configuration is valid as shipped.
        let checked = must(
            "/usr/sbin/smtpguard",
            &["check", "--config", "/etc/smtpguard/smtpguard.toml"],
        );
        assert!(checked.contains("mode: audit"), "{checked}");
        // The installed unit, its binary in place.
        let (ok, verified) = run(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/smtpguard.service"],
        );
        assert!(
            ok && !verified.contains("smtpguard.service:"),
            "systemd-analyze verify:\n{verified}"
        );
        let page = must("zcat", &["/usr/share/man/man8/smtpguard.8.gz"]);
        assert!(page.contains(".TH smtpguard 8"), "{page}");
        assert!(
            page.contains("report"),
            "the page lists the subcommands: {page}"
        );
    });
    must("dpkg", &["--purge", "smtpguard"]);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(
        !std::path::Path::new("/usr/sbin/smtpguard").exists(),
        "purged"
    );
}
