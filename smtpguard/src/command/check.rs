//! `smtpguard check`: the normalised policy as an admin reads it.

use std::fmt::Write as _;

use crate::{
    policy::{List, Policy},
    source::{config::Config, fetch::Origin},
};

/// The policy built from `config`, one prefix per line, most specific decisions visible.
pub fn render(config: &Config, policy: &Policy) -> String {
    let mut out = String::new();
    let ports: Vec<String> = policy.ports.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "config {}: ok", config.path.display());
    let _ = writeln!(
        out,
        "interfaces: {} (xdp_mode {})",
        config.interfaces.join(", "),
        config.xdp_mode
    );
    let _ = writeln!(out, "guarded TCP ports: {}", ports.join(", "));
    let _ = writeln!(
        out,
        "mode: {}; unlisted sources: {}",
        policy.mode, policy.unlisted_action
    );
    let rule_width = policy
        .entries
        .values()
        .map(|entry| entry.rule.len())
        .max()
        .unwrap_or(4)
        .max(4);
    for list in [List::Allow, List::Deny] {
        for (net, entry) in policy
            .entries
            .iter()
            .filter(|(_, entry)| entry.list == list)
        {
            let action = entry
                .action
                .map(|action| format!(" ({action})"))
                .unwrap_or_default();
            let from = match &entry.origin {
                Origin::Literal => format!("line {}", entry.at.line),
                Origin::File(_) | Origin::Url(_) => entry.at.to_string(),
                origin => format!("{origin}, line {}", entry.at.line),
            };
            let _ = writeln!(
                out,
                "{:<5}  {:<rule_width$}  {:<43}  {from}",
                list.as_str(),
                entry.rule,
                format!("{net}{action}"),
            );
        }
    }
    let family = |list: List, v4: bool| {
        policy
            .entries
            .iter()
            .filter(|(net, entry)| entry.list == list && matches!(net, ipnet::IpNet::V4(_)) == v4)
            .count()
    };
    let _ = writeln!(
        out,
        "{} allow prefixes ({} IPv4, {} IPv6), {} deny prefixes ({} IPv4, {} IPv6)",
        policy.count(List::Allow),
        family(List::Allow, true),
        family(List::Allow, false),
        policy.count(List::Deny),
        family(List::Deny, true),
        family(List::Deny, false),
    );
    if policy.count(List::Allow) == 0 {
        let _ = writeln!(
            out,
            "allow_none = true: every source is blocked on the guarded ports"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn renders_normalised_prefixes_with_rule_and_line() {
        let config = Config::parse(
            Path::new("/etc/smtpguard/smtpguard.toml"),
            "interfaces = [\"eth0\"]\nports = [25, 2525]\n[[allow]]\nname = \"provider\"\nprefixes = [\"208.123.79.0/255.255.255.0\", \"2001:db8:25::/48\"]\n[[deny]]\nname = \"abuser\"\nprefixes = [\"208.123.79.9\"]\n",
        )
        .unwrap();
        let (policy, _) =
            Policy::build(&config, &crate::source::fetch::Fetched::default()).unwrap();
        let text = render(&config, &policy);
        assert!(text.contains("guarded TCP ports: 25, 2525"), "{text}");
        assert!(text.contains("allow  provider  208.123.79.0/24"), "{text}");
        assert!(
            text.contains("deny   abuser    208.123.79.9/32 (drop)"),
            "{text}"
        );
        assert!(
            text.contains("mode: enforce; unlisted sources: drop"),
            "{text}"
        );
        assert!(
            text.contains("2 allow prefixes (1 IPv4, 1 IPv6), 1 deny prefixes (1 IPv4, 0 IPv6)"),
            "{text}"
        );
    }
}
