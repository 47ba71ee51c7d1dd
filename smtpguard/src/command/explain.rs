//! `smtpguard explain ADDR`: how the policy decides a SYN from one address, step by step, with
//! the same policy code the daemon writes into the kernel.

use std::{fmt::Write as _, net::IpAddr};

use crate::{
    policy::{List, Policy, Verdict},
    source::config::{Action, Mode},
};

/// The decision for a SYN from `source` to `destination` (`None`: any destination the
/// default scope covers), port `port`, explained.
pub fn explain(policy: &Policy, source: IpAddr, destination: Option<IpAddr>, port: u16) -> String {
    // An IPv4 sender as a dual-stack MTA logs it (::ffff:192.0.2.9) is IPv4 on the wire.
    let (source, destination) = (
        source.to_canonical(),
        destination.map(|to| to.to_canonical()),
    );
    let mut out = String::new();
    let (_, scope) = policy.scope_for(destination);
    if policy.scoped() {
        let by = match destination {
            Some(to) if !scope.destinations.is_empty() => {
                let net = scope
                    .destinations
                    .iter()
                    .filter(|net| net.contains(&to))
                    .max_by_key(|net| net.prefix_len());
                format!(
                    " ({to} is in {})",
                    net.map_or_else(String::new, ToString::to_string)
                )
            }
            Some(to) => format!(" ({to} is in no other scope)"),
            None => " (no destination given: --to DEST picks the scope)".to_owned(),
        };
        let _ = writeln!(out, "scope: {:?}{by}", scope.name);
    }
    if !scope.guarded {
        let _ = writeln!(out, "not guarded: the scope has no rules");
        let _ = writeln!(out, "verdict: PASS");
        return out;
    }
    let ports: Vec<String> = scope.ports.iter().map(ToString::to_string).collect();
    let verdict = policy.verdict_to(source, destination, port);
    if verdict == Verdict::NotGuarded {
        let _ = writeln!(
            out,
            "port {port}: not guarded (guarded: {}): SYNs pass untouched",
            ports.join(", ")
        );
        let _ = writeln!(out, "verdict: PASS");
        return out;
    }
    let _ = writeln!(out, "port {port}: guarded");
    // A deny prefix that an allow match outranks is the longest match, but not what decides.
    if let Some((net, entry)) = scope.longest_match(source)
        && let Some(by) = entry.decided_by
    {
        let by_list = scope
            .entries
            .get(&by)
            .map_or(List::Allow, |decider| decider.list);
        let _ = writeln!(
            out,
            "longest match: {net} on the {} list, rule {:?}, from {} ({}), precedence {}: outranked by {by_list} {by}",
            entry.list, entry.rule, entry.origin, entry.at, entry.precedence
        );
    }
    let stop = match &verdict {
        Verdict::Allowed(net, entry) | Verdict::Denied(net, entry) => {
            let _ = writeln!(
                out,
                "match: {net} on the {} list, rule {:?}, from {} ({})",
                entry.list, entry.rule, entry.origin, entry.at
            );
            if matches!(verdict, Verdict::Allowed(..)) {
                None
            } else {
                Some(entry.action.unwrap_or(scope.unlisted_action))
            }
        }
        Verdict::Unlisted => {
            let _ = writeln!(out, "match: none: {source} is unlisted");
            Some(scope.unlisted_action)
        }
        Verdict::NotGuarded => None,
    };
    for outranked in scope
        .outranked
        .iter()
        .filter(|outranked| outranked.net.contains(&source))
    {
        let _ = writeln!(
            out,
            "also: {} on the deny list, rule {:?}, from {} ({}), outranked by the same allow prefix",
            outranked.net, outranked.entry.rule, outranked.entry.origin, outranked.entry.at
        );
    }
    let _ = writeln!(out, "mode: {}", scope.mode);
    let outcome = match (stop, scope.mode) {
        (None, _) => "PASS".to_owned(),
        (Some(action), Mode::Audit) => {
            format!("PASS (audit mode; counted as would-be-blocked: enforce would {action})")
        }
        (Some(Action::Drop), Mode::Enforce) => "DROP (the sender times out)".to_owned(),
        (Some(Action::Reject), Mode::Enforce) => {
            "REJECT (answered with a TCP RST; the sender fails at once)".to_owned()
        }
    };
    let _ = writeln!(out, "verdict: {outcome}");
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::{config::Config, fetch::Fetched};

    fn policy(text: &str) -> Policy {
        let config = Config::parse(Path::new("/etc/smtpguard/smtpguard.toml"), text).unwrap();
        Policy::build(&config, &Fetched::default()).unwrap().0
    }

    const CONFIG: &str = "interfaces = [\"eth0\"]\naction = \"reject\"\n[[allow]]\nname = \"provider\"\nprefixes = [\"89.16.184.144/28\"]\n[[deny]]\nname = \"abuser\"\naction = \"drop\"\nprefixes = [\"89.16.184.150\"]\n";

    #[test]
    fn each_step_is_shown() {
        let enforce = policy(CONFIG);
        let text = explain(&enforce, "89.16.184.145".parse().unwrap(), None, 25);
        assert_eq!(
            text,
            "port 25: guarded\nmatch: 89.16.184.144/28 on the allow list, rule \"provider\", from literal (/etc/smtpguard/smtpguard.toml:5)\nmode: enforce\nverdict: PASS\n"
        );
        let text = explain(&enforce, "89.16.184.150".parse().unwrap(), None, 25);
        assert!(text.contains("rule \"abuser\""), "{text}");
        assert!(
            text.ends_with("verdict: DROP (the sender times out)\n"),
            "{text}"
        );
        let mapped = explain(&enforce, "::ffff:89.16.184.145".parse().unwrap(), None, 25);
        assert!(
            mapped.ends_with("verdict: PASS\n"),
            "an IPv4 sender as a dual-stack MTA logs it: {mapped}"
        );
        let text = explain(&enforce, "203.0.113.9".parse().unwrap(), None, 25);
        assert!(text.contains("203.0.113.9 is unlisted"), "{text}");
        assert!(text.contains("verdict: REJECT"), "{text}");
        let text = explain(&enforce, "203.0.113.9".parse().unwrap(), None, 587);
        assert!(
            text.starts_with("port 587: not guarded (guarded: 25)"),
            "{text}"
        );
        let audit = policy(&CONFIG.replace(
            "action = \"reject\"",
            "action = \"reject\"\nmode = \"audit\"",
        ));
        let text = explain(&audit, "203.0.113.9".parse().unwrap(), None, 25);
        assert!(
            text.contains(
                "verdict: PASS (audit mode; counted as would-be-blocked: enforce would reject)"
            ),
            "{text}"
        );
    }
}
