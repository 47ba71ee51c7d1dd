//! `[fleet]` as the configuration gives it: the group a host follows and how to reach its
//! etcd cluster. Read by [`crate::source::config`]; used by [`crate::fleet`], which talks to
//! the cluster.

use std::{path::PathBuf, time::Duration};

/// How the daemon, `publish` and `fleet status` reach the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Connection {
    /// `http://` or `https://` URLs of the cluster's members.
    pub endpoints: Vec<String>,
    /// PEM CA certificate that signs the members' certificates (HTTPS).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for clusters that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user, with its password in `password_file` (one line).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
}

/// A daemon's `[fleet]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    pub connection: Connection,
    pub group: String,
    /// The name this host reports under: the `host` key, else the system's host name.
    pub host: String,
    /// The lease of the host's report: it disappears this long after the host does.
    pub report_ttl: Duration,
}

/// The lease of a host's report when `[fleet]` does not say.
pub const DEFAULT_REPORT_TTL: Duration = Duration::from_secs(10);

/// What is wrong with `name` as a group or host name (it becomes part of an etcd key).
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty")
    } else if name.len() > 64 {
        Some("longer than 64 bytes")
    } else if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.'))
    {
        Some("only letters, digits, '-', '_' and '.' may be used")
    } else {
        None
    }
}

/// The system's host name.
pub fn system_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::source::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/smtpguard/mx1.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn fleet_settings_and_their_refusals() {
        let config = parse(
            "interfaces = [\"eth0\"]\n[fleet]\netcd = [\"http://10.0.0.5:2379\", \"https://10.0.0.6:2379\"]\ngroup = \"mx\"\nhost = \"mx1\"\nreport_ttl_secs = 5\n",
        )
        .unwrap();
        let fleet = config.fleet.expect("[fleet]");
        assert_eq!(fleet.group, "mx");
        assert_eq!(fleet.host, "mx1");
        assert_eq!(fleet.connection.endpoints.len(), 2);
        assert_eq!(fleet.report_ttl.as_secs(), 5);
        for (text, expected) in [
            (
                "interfaces = [\"eth0\"]\nmode = \"audit\"\n[fleet]\netcd = [\"http://e:2379\"]\ngroup = \"mx\"\n",
                "/etc/smtpguard/mx1.toml:2: bad mode \"\": with [fleet], the group's published policy says this",
            ),
            (
                "interfaces = [\"eth0\"]\n[fleet]\netcd = [\"etcd:2379\"]\ngroup = \"mx\"\n",
                "/etc/smtpguard/mx1.toml:3: bad etcd \"etcd:2379\": an http:// or https:// URL",
            ),
            (
                "interfaces = [\"eth0\"]\n[fleet]\netcd = [\"http://e:2379\"]\ngroup = \"m x\"\n",
                "/etc/smtpguard/mx1.toml:4: bad group \"m x\": only letters",
            ),
            (
                "interfaces = [\"eth0\"]\n[fleet]\netcd = [\"http://e:2379\"]\ngroup = \"mx\"\nuser = \"u\"\n",
                "/etc/smtpguard/mx1.toml:5: bad user \"u\": user and password_file go together",
            ),
        ] {
            let error = parse(text).unwrap_err();
            assert!(
                error.starts_with(expected),
                "expected {expected:?}, got {error:?}"
            );
        }
        // A central file: no interfaces, and no [fleet].
        let central = std::env::temp_dir().join(format!("sg-central-{}.toml", std::process::id()));
        std::fs::write(
            &central,
            "[fleet]\netcd = [\"http://e:2379\"]\ngroup = \"mx\"\n",
        )
        .unwrap();
        let error = Config::load_central(&central).unwrap_err().to_string();
        std::fs::write(
            &central,
            "[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/24\"]\n",
        )
        .unwrap();
        let ok = Config::load_central(&central);
        let _ = std::fs::remove_file(&central);
        assert!(
            error.contains("[fleet] belongs in each host's file"),
            "{error}"
        );
        assert!(ok.unwrap().interfaces.is_empty());
    }
}
