//! A fleet host's policy: the group's published policy with the host's own rules (the local
//! file's top-level `[[allow]]` and `[[deny]]`) merged into its default scope. A local prefix
//! that conflicts with a published one is refused exactly as a conflict inside one file is;
//! the precedence of feeds is settled again over the merged entries.

use std::collections::BTreeMap;

use ipnet::IpNet;

use super::{Building, Entry, Policy, settle_precedence};
use crate::source::config::{ConfigError, Safety};

/// Merges the entries of `local`'s default scope into `group`'s default scope. The group's
/// scopes, ports, mode and action stand: the local file only adds rules.
pub fn merge(group: &Policy, local: &Policy) -> Result<Policy, ConfigError> {
    let mut merged = group.clone();
    let (Some(target), Some(source)) = (merged.scopes.first_mut(), local.scopes.first()) else {
        return Ok(merged);
    };
    if source.entries.is_empty() {
        return Ok(merged);
    }
    let safety = Safety::default();
    let mut building = Building {
        safety: &safety,
        path: source
            .entries
            .values()
            .next()
            .map(|entry| entry.at.file.to_path_buf())
            .unwrap_or_default(),
        entries: std::mem::take(&mut target.entries),
        outranked: std::mem::take(&mut target.outranked),
        warnings: Vec::new(),
        refused: Vec::new(),
    };
    for entry in building.entries.values_mut() {
        entry.decided_by = None;
    }
    for (net, entry) in &source.entries {
        building.insert(
            *net,
            Entry {
                decided_by: None,
                ..entry.clone()
            },
        )?;
    }
    building.outranked.extend(source.outranked.iter().cloned());
    let mut entries = std::mem::take(&mut building.entries);
    settle_precedence(&mut entries);
    target.entries = entries;
    target.outranked = std::mem::take(&mut building.outranked);
    merged.refused.extend(local.refused.iter().cloned());
    Ok(merged)
}

/// Gives each deny prefix of `allow` precedence the prefix that decides for it, as
/// [`Policy::build`] does: for a policy read back from elsewhere (a published snapshot).
pub fn settle(entries: &mut BTreeMap<IpNet, Entry>) {
    for entry in entries.values_mut() {
        entry.decided_by = None;
    }
    settle_precedence(entries);
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::source::{config::Config, fetch::Fetched};

    fn build(text: &str) -> Policy {
        let config = Config::parse(Path::new("/etc/smtpguard/test.toml"), text).unwrap();
        Policy::build(&config, &Fetched::default()).unwrap().0
    }

    const GROUP: &str = "interfaces = [\"eth0\"]\naction = \"reject\"\n[[allow]]\nname = \"provider\"\nprefixes = [\"192.0.2.0/24\"]\n";

    #[test]
    fn local_rules_join_the_default_scope_and_keep_the_group_settings() {
        let group = build(GROUP);
        let local = build(
            "interfaces = [\"eth0\"]\n[[allow]]\nname = \"lan\"\nprefixes = [\"10.0.0.0/8\"]\n[[deny]]\nname = \"abuser\"\nprefixes = [\"192.0.2.9\"]\n",
        );
        let merged = merge(&group, &local).unwrap();
        let scope = merged.default_scope();
        assert_eq!(scope.entries.len(), 3, "{scope:?}");
        assert_eq!(scope.unlisted_action, crate::source::config::Action::Reject);
        assert!(matches!(
            merged.verdict("192.0.2.9".parse().unwrap(), 25),
            super::super::Verdict::Denied(_, entry) if &*entry.rule == "abuser"
        ));
        assert!(matches!(
            merged.verdict("10.1.2.3".parse().unwrap(), 25),
            super::super::Verdict::Allowed(_, entry) if &*entry.rule == "lan"
        ));
    }

    #[test]
    fn a_local_prefix_in_the_other_list_is_a_conflict() {
        let group = build(GROUP);
        let local = build(
            "interfaces = [\"eth0\"]\nallow_none = true\n[[deny]]\nname = \"mine\"\nprefixes = [\"192.0.2.0/24\"]\n",
        );
        let error = merge(&group, &local).unwrap_err().to_string();
        assert!(
            error.contains("prefix 192.0.2.0/24 is in both lists: allow rule \"provider\""),
            "{error}"
        );
    }
}
