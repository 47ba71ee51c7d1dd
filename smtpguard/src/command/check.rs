//! `smtpguard check`: the normalised policy as an admin reads it.

use std::fmt::Write as _;

use crate::{
    policy::{List, Policy, Scope},
    source::{config::Config, fetch::Origin},
};

/// The policy built from `config`, one prefix per line, scope by scope, most specific
/// decisions visible: how each deny prefix ranks, and which allow prefix outranks it.
pub fn render(config: &Config, policy: &Policy) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "config {}: ok", config.path.display());
    let _ = writeln!(
        out,
        "interfaces: {} (xdp_mode {})",
        config.interfaces.join(", "),
        config.xdp_mode
    );
    let rule_width = policy
        .entries()
        .map(|(_, _, entry)| entry.rule.len())
        .max()
        .unwrap_or(4)
        .max(4);
    for scope in &policy.scopes {
        render_scope(&mut out, policy, scope, rule_width);
    }
    let family = |list: List, v4: bool| {
        policy
            .entries()
            .filter(|(_, net, entry)| entry.list == list && net.addr().is_ipv4() == v4)
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
    out
}

fn render_scope(out: &mut String, policy: &Policy, scope: &Scope, rule_width: usize) {
    if policy.scoped() {
        let destinations: Vec<String> =
            scope.destinations.iter().map(ToString::to_string).collect();
        let to = if destinations.is_empty() {
            "every destination no other scope names".to_owned()
        } else {
            destinations.join(", ")
        };
        let _ = writeln!(out, "\nscope {:?}: {to}", scope.name);
    }
    if !scope.guarded {
        let _ = writeln!(out, "not guarded: no rules at the top level");
        return;
    }
    let ports: Vec<String> = scope.ports.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "guarded TCP ports: {}", ports.join(", "));
    let _ = writeln!(
        out,
        "mode: {}; unlisted sources: {}",
        scope.mode, scope.unlisted_action
    );
    for list in [List::Allow, List::Deny] {
        for (net, entry) in scope.entries.iter().filter(|(_, entry)| entry.list == list) {
            let ranking = match entry.decided_by {
                Some(by) => {
                    let decider = scope.entries.get(&by);
                    format!(
                        ", outranked by {} {by} (rule {:?})",
                        decider.map_or("allow", |entry| entry.list.as_str()),
                        decider.map_or("", |entry| &*entry.rule)
                    )
                }
                None => String::new(),
            };
            let action = match (entry.list, entry.action) {
                (List::Deny, Some(action)) => {
                    format!(" ({action}, precedence {}{ranking})", entry.precedence)
                }
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "{:<5}  {:<rule_width$}  {:<43}  {}",
                list.as_str(),
                entry.rule,
                format!("{net}{action}"),
                from(entry)
            );
        }
    }
    for outranked in &scope.outranked {
        let _ = writeln!(
            out,
            "{:<5}  {:<rule_width$}  {:<43}  {}",
            "deny",
            outranked.entry.rule,
            format!(
                "{} (outranked by the same allow prefix: not written)",
                outranked.net
            ),
            from(&outranked.entry)
        );
    }
    if scope
        .entries
        .values()
        .all(|entry| entry.list != List::Allow)
    {
        let _ = writeln!(
            out,
            "allow_none = true: every source is blocked on the guarded ports"
        );
    }
}

/// Where an entry came from, as `check` prints it.
fn from(entry: &crate::policy::Entry) -> String {
    match &entry.origin {
        Origin::Literal => format!("line {}", entry.at.line),
        Origin::File(_) | Origin::Url(_) => entry.at.to_string(),
        origin => format!("{origin}, line {}", entry.at.line),
    }
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
            text.contains("deny   abuser    208.123.79.9/32 (drop, precedence specific)"),
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
