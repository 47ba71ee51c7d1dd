//! Expanding a domain's SPF record (RFC 7208) into the prefixes it authorises: the servers a
//! filtering provider delivers from. `ip4`, `ip6`, `a`, `mx`, `include` and `redirect` are
//! followed; the RFC's limit of 10 DNS-querying terms holds for the whole expansion, and a
//! domain that includes itself, directly or not, is refused. Terms that authorise nothing
//! as prefixes (`-`, `~` and `?` qualifiers, `exists`, `ptr`, macros) are noted, not guessed.

use std::{future::Future, pin::Pin, time::Duration};

use ipnet::IpNet;

use crate::source::{
    dns::{DnsError, Lookup},
    prefix::PrefixError,
};

/// RFC 7208 4.6.4: at most 10 terms that cause DNS queries.
pub const MAX_DNS_TERMS: usize = 10;
/// RFC 7208 4.6.4: at most 10 exchanges are looked up per `mx` term.
const MAX_MX_EXCHANGES: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum SpfError {
    #[error("{domain}: {source}")]
    Dns {
        domain: String,
        #[source]
        source: DnsError,
    },
    #[error("{domain}: no SPF record (no TXT record starting with \"v=spf1\")")]
    NoRecord { domain: String },
    #[error("{domain}: {count} SPF records; RFC 7208 allows one")]
    Several { domain: String, count: usize },
    #[error("include loop: {}", chain.join(" -> "))]
    Loop { chain: Vec<String> },
    #[error(
        "{domain}: more than {MAX_DNS_TERMS} DNS-querying terms in the expansion (RFC 7208 4.6.4)"
    )]
    TooManyLookups { domain: String },
    #[error("{domain}: bad term {term:?}: {reason}")]
    Syntax {
        domain: String,
        term: String,
        reason: &'static str,
    },
}

/// The prefixes a domain's SPF record authorises.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expansion {
    pub nets: Vec<IpNet>,
    /// The shortest TTL among the answers used.
    pub ttl: Option<Duration>,
    /// Terms that were skipped, and why.
    pub notes: Vec<String>,
}

/// Expands the SPF record of `domain`.
pub async fn expand(dns: &impl Lookup, domain: &str) -> Result<Expansion, SpfError> {
    let mut walk = Walk {
        dns,
        lookups: 0,
        stack: Vec::new(),
        out: Expansion::default(),
    };
    walk.domain(normalise(domain)).await?;
    walk.out.nets.sort();
    walk.out.nets.dedup();
    Ok(walk.out)
}

fn normalise(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

struct Walk<'a, L> {
    dns: &'a L,
    lookups: usize,
    stack: Vec<String>,
    out: Expansion,
}

impl<L: Lookup> Walk<'_, L> {
    fn domain(
        &mut self,
        domain: String,
    ) -> Pin<Box<dyn Future<Output = Result<(), SpfError>> + '_>> {
        Box::pin(async move {
            if self.stack.contains(&domain) {
                let mut chain = self.stack.clone();
                chain.push(domain);
                return Err(SpfError::Loop { chain });
            }
            let record = self.record(&domain).await?;
            self.stack.push(domain.clone());
            let mut redirect = None;
            let mut has_all = false;
            for term in record.split_whitespace().skip(1) {
                if let Some((name, value)) = term.split_once('=')
                    && !name.contains(':')
                {
                    if name.eq_ignore_ascii_case("redirect") {
                        redirect = Some(value.to_owned());
                    }
                    // exp= and unknown modifiers do not authorise anything.
                    continue;
                }
                has_all |= self.term(&domain, term).await?;
            }
            if let Some(target) = redirect
                && !has_all
            {
                self.count_lookup(&domain)?;
                self.target(&domain, "redirect", &target)?;
                self.domain(normalise(&target)).await?;
            }
            self.stack.pop();
            Ok(())
        })
    }

    /// The one SPF record of `domain`.
    async fn record(&mut self, domain: &str) -> Result<String, SpfError> {
        let answer = self.dns.txt(domain).await.map_err(|source| {
            if source.is_negative() {
                SpfError::NoRecord {
                    domain: domain.to_owned(),
                }
            } else {
                SpfError::Dns {
                    domain: domain.to_owned(),
                    source,
                }
            }
        })?;
        self.ttl(answer.ttl);
        let records: Vec<&String> = answer
            .records
            .iter()
            .filter(|text| {
                let lower = text.to_ascii_lowercase();
                lower == "v=spf1" || lower.starts_with("v=spf1 ")
            })
            .collect();
        match records.as_slice() {
            [] => Err(SpfError::NoRecord {
                domain: domain.to_owned(),
            }),
            [record] => Ok((*record).clone()),
            several => Err(SpfError::Several {
                domain: domain.to_owned(),
                count: several.len(),
            }),
        }
    }

    /// One mechanism. Returns whether it was `all`.
    async fn term(&mut self, domain: &str, term: &str) -> Result<bool, SpfError> {
        let (qualifier, mechanism) = match term.chars().next() {
            Some(q @ ('+' | '-' | '~' | '?')) => (q, &term[1..]),
            _ => ('+', term),
        };
        let (name, argument) = match mechanism.split_once([':', '/']) {
            Some((name, _)) => (name, &mechanism[name.len()..]),
            None => (mechanism, ""),
        };
        let name = name.to_ascii_lowercase();
        let syntax = |reason| SpfError::Syntax {
            domain: domain.to_owned(),
            term: term.to_owned(),
            reason,
        };
        if name == "all" {
            return Ok(true);
        }
        let queries_dns = matches!(name.as_str(), "a" | "mx" | "include" | "exists" | "ptr");
        if queries_dns {
            self.count_lookup(domain)?;
        }
        if qualifier != '+' {
            self.note(
                domain,
                term,
                "skipped: not a pass qualifier, authorises nothing",
            );
            return Ok(false);
        }
        match name.as_str() {
            "ip4" | "ip6" => {
                let value = argument
                    .strip_prefix(':')
                    .ok_or_else(|| syntax("missing address"))?;
                if value.contains(char::is_whitespace) {
                    return Err(syntax("not an address or prefix"));
                }
                let parsed = crate::source::prefix::parse(value).map_err(|error| {
                    syntax(if error == PrefixError::MappedTooShort {
                        "an IPv4-mapped prefix shorter than /96 also covers other IPv6 addresses"
                    } else {
                        "not an address or prefix"
                    })
                })?;
                // As written: an ip6 term with an IPv4-mapped prefix is IPv6 notation.
                if (name == "ip4") != (parsed.net.addr().is_ipv4() && !parsed.mapped) {
                    return Err(syntax("address family does not match the mechanism"));
                }
                if parsed.mapped {
                    self.note(
                        domain,
                        term,
                        &format!("IPv4-mapped: using the IPv4 prefix {}", parsed.net),
                    );
                }
                self.out.nets.push(parsed.net);
            }
            "a" | "mx" => {
                let (target, v4_len, v6_len) =
                    split_target(argument).ok_or_else(|| syntax("bad prefix length"))?;
                let target = match target {
                    Some(target) => self.target(domain, term, target)?,
                    None => domain.to_owned(),
                };
                let hosts = if name == "a" {
                    vec![target]
                } else {
                    let answer = self.dns.mx(&target).await;
                    match answer {
                        Ok(answer) => {
                            self.ttl(answer.ttl);
                            answer.records.into_iter().take(MAX_MX_EXCHANGES).collect()
                        }
                        Err(source) if source.is_negative() => Vec::new(),
                        Err(source) => {
                            return Err(SpfError::Dns {
                                domain: target,
                                source,
                            });
                        }
                    }
                };
                for host in hosts {
                    match self.dns.addresses(&host).await {
                        Ok(answer) => {
                            self.ttl(answer.ttl);
                            for address in answer.records {
                                let len = if address.is_ipv4() { v4_len } else { v6_len };
                                if let Ok(net) = IpNet::new(address, len) {
                                    self.address_net(domain, term, &host, net);
                                }
                            }
                        }
                        // RFC 7208 5.3/5.4: a name without addresses matches nothing.
                        Err(source) if source.is_negative() => {}
                        Err(source) => {
                            return Err(SpfError::Dns {
                                domain: host,
                                source,
                            });
                        }
                    }
                }
            }
            "include" => {
                let target = argument
                    .strip_prefix(':')
                    .ok_or_else(|| syntax("missing domain"))?;
                let target = self.target(domain, term, target)?;
                self.domain(normalise(&target)).await?;
            }
            "exists" | "ptr" => {
                self.note(
                    domain,
                    term,
                    "skipped: decided per connection by the receiver, not a prefix list",
                );
            }
            _ => return Err(syntax("unknown mechanism")),
        }
        Ok(false)
    }

    /// Adds the prefix an `a` or `mx` term makes of `host`'s address; an IPv4-mapped AAAA
    /// record stands for its IPv4 address.
    fn address_net(&mut self, domain: &str, term: &str, host: &str, net: IpNet) {
        // Judged before truncation: `::ffff:192.0.2.1/64` truncates to `::/64`.
        match crate::source::prefix::unmap(net) {
            Ok((net, false)) => self.out.nets.push(net.trunc()),
            Ok((v4, true)) => {
                self.note(
                    domain,
                    term,
                    &format!("{host} has an IPv4-mapped AAAA record: using the IPv4 prefix {v4}"),
                );
                self.out.nets.push(v4);
            }
            Err(_) => self.note(
                domain,
                term,
                &format!(
                    "{host} has an IPv4-mapped AAAA record and the term asks for /{} of it: shorter than /96, not an IPv4 prefix",
                    net.prefix_len()
                ),
            ),
        }
    }

    /// A domain named by a term; macros are not expanded (they depend on the connection).
    fn target(&mut self, domain: &str, term: &str, target: &str) -> Result<String, SpfError> {
        if target.contains('%') {
            return Err(SpfError::Syntax {
                domain: domain.to_owned(),
                term: term.to_owned(),
                reason: "macros depend on the connection and cannot be listed as prefixes",
            });
        }
        if target.is_empty() {
            return Err(SpfError::Syntax {
                domain: domain.to_owned(),
                term: term.to_owned(),
                reason: "missing domain",
            });
        }
        Ok(target.to_owned())
    }

    fn count_lookup(&mut self, domain: &str) -> Result<(), SpfError> {
        self.lookups += 1;
        if self.lookups > MAX_DNS_TERMS {
            return Err(SpfError::TooManyLookups {
                domain: domain.to_owned(),
            });
        }
        Ok(())
    }

    fn ttl(&mut self, ttl: Duration) {
        self.out.ttl = Some(self.out.ttl.map_or(ttl, |known| known.min(ttl)));
    }

    fn note(&mut self, domain: &str, term: &str, what: &str) {
        self.out.notes.push(format!("{domain}: {term:?}: {what}"));
    }
}

/// `[:domain][/v4len][//v6len]` of an `a` or `mx` term.
fn split_target(argument: &str) -> Option<(Option<&str>, u8, u8)> {
    let (target, lengths) = match argument.strip_prefix(':') {
        Some(rest) => match rest.find('/') {
            Some(slash) => (Some(&rest[..slash]), &rest[slash..]),
            None => (Some(rest), ""),
        },
        None => (None, argument),
    };
    let (v4, v6) = match lengths.split_once("//") {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (lengths, None),
    };
    let v4_len = match v4.strip_prefix('/') {
        Some(len) => len.parse::<u8>().ok().filter(|&len| len <= 32)?,
        None if v4.is_empty() => 32,
        None => return None,
    };
    let v6_len = match v6 {
        Some(len) => len.parse::<u8>().ok().filter(|&len| len <= 128)?,
        None => 128,
    };
    Some((target, v4_len, v6_len))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use std::net::IpAddr;

    use super::*;
    use crate::source::dns::Answer;

    /// A zone in memory, for the parsing and limit rules (the real resolver is exercised by
    /// the end-to-end tests against a DNS server).
    #[derive(Default)]
    struct Zone {
        txt: HashMap<&'static str, Vec<&'static str>>,
        a: HashMap<&'static str, Vec<&'static str>>,
        mx: HashMap<&'static str, Vec<&'static str>>,
    }

    fn missing(name: &str) -> DnsError {
        DnsError::NoRecords {
            name: name.to_owned(),
            what: "test",
        }
    }

    impl Lookup for Zone {
        async fn addresses(&self, name: &str) -> Result<Answer<IpAddr>, DnsError> {
            let records = self.a.get(name).ok_or_else(|| missing(name))?;
            Ok(Answer {
                records: records.iter().map(|a| a.parse().unwrap()).collect(),
                ttl: Duration::from_secs(300),
            })
        }
        async fn txt(&self, name: &str) -> Result<Answer<String>, DnsError> {
            let records = self.txt.get(name).ok_or_else(|| missing(name))?;
            Ok(Answer {
                records: records.iter().map(|r| (*r).to_owned()).collect(),
                ttl: Duration::from_secs(600),
            })
        }
        async fn mx(&self, name: &str) -> Result<Answer<String>, DnsError> {
            let records = self.mx.get(name).ok_or_else(|| missing(name))?;
            Ok(Answer {
                records: records.iter().map(|r| (*r).to_owned()).collect(),
                ttl: Duration::from_secs(900),
            })
        }
    }

    fn run(zone: &Zone, domain: &str) -> Result<Expansion, SpfError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(expand(zone, domain))
    }

    fn nets(expansion: &Expansion) -> Vec<String> {
        expansion.nets.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn includes_a_mx_and_cidr_lengths_expand() {
        let mut zone = Zone::default();
        zone.txt.insert(
            "provider.example",
            vec![
                "google-site-verification=x",
                "v=spf1 include:_spf1.provider.example a:relay.provider.example/28 mx//64 -all",
            ],
        );
        zone.txt.insert(
            "_spf1.provider.example",
            vec!["v=spf1 ip4:89.16.184.144/28 ip6:2001:db8:25::/48 ~ip4:198.51.100.0/24 ?all"],
        );
        zone.a
            .insert("relay.provider.example", vec!["203.0.113.77"]);
        zone.mx
            .insert("provider.example", vec!["mx1.provider.example."]);
        zone.a.insert(
            "mx1.provider.example.",
            vec!["192.0.2.25", "2001:db8:99::25"],
        );
        let expansion = run(&zone, "Provider.Example.").unwrap();
        assert_eq!(
            nets(&expansion),
            [
                "89.16.184.144/28",
                "192.0.2.25/32",
                "203.0.113.64/28",
                "2001:db8:25::/48",
                "2001:db8:99::/64"
            ]
        );
        assert_eq!(expansion.ttl, Some(Duration::from_secs(300)));
        assert_eq!(expansion.notes.len(), 1, "{:?}", expansion.notes);
    }

    #[test]
    fn ipv4_mapped_prefixes_and_records_become_ipv4() {
        let mut zone = Zone::default();
        zone.txt.insert(
            "mapped.example",
            vec!["v=spf1 ip6:::ffff:192.0.2.0/120 a:relay.example a:relay.example//64 -all"],
        );
        zone.a.insert("relay.example", vec!["::ffff:198.51.100.7"]);
        let expansion = run(&zone, "mapped.example").unwrap();
        assert_eq!(nets(&expansion), ["192.0.2.0/24", "198.51.100.7/32"]);
        let notes = expansion.notes.join("\n");
        assert!(
            notes.contains(
                "\"ip6:::ffff:192.0.2.0/120\": IPv4-mapped: using the IPv4 prefix 192.0.2.0/24"
            ),
            "{notes}"
        );
        assert!(notes.contains("shorter than /96"), "{notes}");
        zone.txt
            .insert("short.example", vec!["v=spf1 ip6:::ffff:0:0/64"]);
        let error = run(&zone, "short.example").unwrap_err().to_string();
        assert!(error.contains("shorter than /96"), "{error}");
        zone.txt
            .insert("fam.example", vec!["v=spf1 ip4:::ffff:192.0.2.1"]);
        let error = run(&zone, "fam.example").unwrap_err().to_string();
        assert!(error.contains("family"), "{error}");
    }

    #[test]
    fn redirect_applies_without_all() {
        let mut zone = Zone::default();
        zone.txt
            .insert("a.example", vec!["v=spf1 redirect=b.example"]);
        zone.txt
            .insert("b.example", vec!["v=spf1 ip4:192.0.2.0/24 -all"]);
        assert_eq!(nets(&run(&zone, "a.example").unwrap()), ["192.0.2.0/24"]);
        zone.txt.insert(
            "a.example",
            vec!["v=spf1 ip4:198.51.100.1 -all redirect=b.example"],
        );
        assert_eq!(nets(&run(&zone, "a.example").unwrap()), ["198.51.100.1/32"]);
    }

    #[test]
    fn loops_limits_and_bad_records_are_refused() {
        let mut zone = Zone::default();
        zone.txt
            .insert("loop.example", vec!["v=spf1 include:loop2.example"]);
        zone.txt.insert(
            "loop2.example",
            vec!["v=spf1 ip4:192.0.2.1 include:loop.example"],
        );
        let error = run(&zone, "loop.example").unwrap_err().to_string();
        assert_eq!(
            error,
            "include loop: loop.example -> loop2.example -> loop.example"
        );

        // A chain of 11 includes: one more than RFC 7208 allows.
        let names: Vec<&'static str> = (0..=11).map(|i| &*format!("n{i}.example").leak()).collect();
        for pair in names.windows(2) {
            zone.txt
                .insert(pair[0], vec![format!("v=spf1 include:{}", pair[1]).leak()]);
        }
        zone.txt.insert(names[11], vec!["v=spf1 ip4:192.0.2.1"]);
        let error = run(&zone, "n0.example").unwrap_err().to_string();
        assert!(error.contains("more than 10 DNS-querying terms"), "{error}");
        assert_eq!(nets(&run(&zone, "n1.example").unwrap()), ["192.0.2.1/32"]);

        zone.txt
            .insert("two.example", vec!["v=spf1 -all", "v=spf1 +all"]);
        assert!(
            run(&zone, "two.example")
                .unwrap_err()
                .to_string()
                .contains("2 SPF records")
        );
        zone.txt.insert("none.example", vec!["hello"]);
        assert!(
            run(&zone, "none.example")
                .unwrap_err()
                .to_string()
                .contains("no SPF record")
        );
        zone.txt
            .insert("bad.example", vec!["v=spf1 ip4:192.0.2.300"]);
        assert!(
            run(&zone, "bad.example")
                .unwrap_err()
                .to_string()
                .contains("bad term \"ip4:192.0.2.300\"")
        );
        zone.txt
            .insert("fam.example", vec!["v=spf1 ip4:2001:db8::1"]);
        assert!(
            run(&zone, "fam.example")
                .unwrap_err()
                .to_string()
                .contains("family")
        );
        zone.txt
            .insert("macro.example", vec!["v=spf1 include:%{d}.example"]);
        assert!(
            run(&zone, "macro.example")
                .unwrap_err()
                .to_string()
                .contains("macros")
        );
        zone.txt
            .insert("weird.example", vec!["v=spf1 ipv4:192.0.2.1"]);
        assert!(
            run(&zone, "weird.example")
                .unwrap_err()
                .to_string()
                .contains("unknown mechanism")
        );
    }
}
