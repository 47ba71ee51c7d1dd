//! Prefix notation as provider lists write it: CIDR (`89.16.184.144/28`), single addresses
//! (`/32` or `/128`), and IPv4 netmask notation (`208.123.79.0/255.255.255.0`, or with a
//! space or the word `mask` in place of the slash, as provider pages print it).
//!
//! IPv4-mapped IPv6 prefixes (`::ffff:192.0.2.0/120`) stand for IPv4 sources, which the
//! program sees as IPv4: they are turned into the IPv4 prefix (`192.0.2.0/24`), since as IPv6
//! entries they would never match; one shorter than /96 mixes them with other IPv6 addresses
//! and is refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Why a prefix string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("not an IPv4 or IPv6 address")]
    BadAddress,
    #[error("prefix length must be 0 to {max}")]
    BadLength { max: u8 },
    #[error("netmask {mask} is not contiguous")]
    NonContiguousMask { mask: Ipv4Addr },
    #[error("netmask notation is for IPv4 only; write IPv6 prefixes as ADDR/LEN")]
    MaskOnIpv6,
    #[error(
        "an IPv4-mapped prefix (::ffff:a.b.c.d) shorter than /96 also covers other IPv6 addresses; write the IPv4 prefix"
    )]
    MappedTooShort,
}

/// A parsed prefix, with host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub net: IpNet,
    /// The text had host bits set (`192.168.1.7/24`); `net` is the normalised form.
    pub had_host_bits: bool,
    /// The text was an IPv4-mapped IPv6 prefix; `net` is the IPv4 prefix it stands for.
    pub mapped: bool,
}

/// The IPv4 prefix an IPv4-mapped IPv6 prefix (`::ffff:a.b.c.d/len`) stands for: `None` for
/// any other IPv6 prefix, refused when shorter than /96.
pub fn ipv4_mapped(addr: Ipv6Addr, len: u8) -> Result<Option<Ipv4Net>, PrefixError> {
    let Some(v4) = addr.to_ipv4_mapped() else {
        return Ok(None);
    };
    let len = len.checked_sub(96).ok_or(PrefixError::MappedTooShort)?;
    Ipv4Net::new(v4, len)
        .map(|net| Some(net.trunc()))
        .map_err(|_| PrefixError::BadLength { max: 128 })
}

/// `net` with an IPv4-mapped IPv6 prefix turned into its IPv4 prefix; whether it was one.
pub fn unmap(net: IpNet) -> Result<(IpNet, bool), PrefixError> {
    match net {
        IpNet::V6(v6) => Ok(match ipv4_mapped(v6.addr(), v6.prefix_len())? {
            Some(v4) => (IpNet::V4(v4), true),
            None => (net, false),
        }),
        IpNet::V4(_) => Ok((net, false)),
    }
}

/// Parses one prefix in any of the accepted notations.
pub fn parse(text: &str) -> Result<Parsed, PrefixError> {
    let text = text.trim();
    // Lists of a million prefixes are mostly `ADDR/LEN` with no space inside: those take no
    // allocation; the netmask notations with a space or `mask` are joined into `ADDR/MASK`.
    let joined;
    let text = if text.contains(char::is_whitespace) {
        let words: Vec<&str> = text.split_whitespace().collect();
        match words.as_slice() {
            [addr, mask] | [addr, "mask" | "netmask", mask] if !addr.contains('/') => {
                joined = format!("{addr}/{mask}");
                joined.as_str()
            }
            _ => text,
        }
    } else {
        text
    };
    let (addr, len) = match text.split_once('/') {
        None => {
            let addr: IpAddr = text.parse().map_err(|_| PrefixError::BadAddress)?;
            let len = if addr.is_ipv4() { 32 } else { 128 };
            (addr, len)
        }
        Some((addr, suffix)) => {
            let addr: IpAddr = addr.trim().parse().map_err(|_| PrefixError::BadAddress)?;
            (addr, parse_length(addr, suffix.trim())?)
        }
    };
    let net = match addr {
        IpAddr::V4(v4) => {
            IpNet::V4(Ipv4Net::new(v4, len).map_err(|_| PrefixError::BadLength { max: 32 })?)
        }
        IpAddr::V6(v6) => {
            IpNet::V6(Ipv6Net::new(v6, len).map_err(|_| PrefixError::BadLength { max: 128 })?)
        }
    };
    // Host bits are judged on the prefix as written; mapping only drops the ::ffff: part.
    let had_host_bits = net.trunc().addr() != net.addr();
    let (net, mapped) = unmap(net)?;
    Ok(Parsed {
        net: net.trunc(),
        had_host_bits,
        mapped,
    })
}

fn parse_length(addr: IpAddr, suffix: &str) -> Result<u8, PrefixError> {
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if !suffix.is_empty() && suffix.bytes().all(|byte| byte.is_ascii_digit()) {
        return match suffix.parse::<u8>() {
            Ok(len) if len <= max => Ok(len),
            _ => Err(PrefixError::BadLength { max }),
        };
    }
    let mask: Ipv4Addr = suffix.parse().map_err(|_| PrefixError::BadLength { max })?;
    if addr.is_ipv6() {
        return Err(PrefixError::MaskOnIpv6);
    }
    let bits = u32::from(mask);
    let len = bits.leading_ones();
    if bits.checked_shl(len).unwrap_or(0) != 0 {
        return Err(PrefixError::NonContiguousMask { mask });
    }
    Ok(len as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        parse(text).unwrap().net
    }

    #[test]
    fn cidr_single_and_netmask_notations() {
        assert_eq!(net("89.16.184.144/28").to_string(), "89.16.184.144/28");
        assert_eq!(net("89.16.176.76").to_string(), "89.16.176.76/32");
        assert_eq!(
            net("208.123.79.0/255.255.255.0").to_string(),
            "208.123.79.0/24"
        );
        assert_eq!(net("10.0.0.0/255.0.0.0").to_string(), "10.0.0.0/8");
        assert_eq!(net("0.0.0.0/0.0.0.0").to_string(), "0.0.0.0/0");
        assert_eq!(net("192.0.2.1/255.255.255.255").to_string(), "192.0.2.1/32");
        assert_eq!(net("2001:db8:25::/48").to_string(), "2001:db8:25::/48");
        assert_eq!(net("2001:db8::1").to_string(), "2001:db8::1/128");
        assert_eq!(net(" 192.0.2.0/24 ").to_string(), "192.0.2.0/24");
        assert_eq!(
            net("208.123.79.0 255.255.255.0").to_string(),
            "208.123.79.0/24"
        );
        assert_eq!(
            net("208.123.79.0 mask 255.255.255.0").to_string(),
            "208.123.79.0/24"
        );
        assert_eq!(
            net("208.123.79.0  netmask 255.255.254.0").to_string(),
            "208.123.78.0/23"
        );
    }

    #[test]
    fn host_bits_are_cleared_and_reported() {
        let parsed = parse("192.168.1.7/24").unwrap();
        assert_eq!(parsed.net.to_string(), "192.168.1.0/24");
        assert!(parsed.had_host_bits);
        assert!(!parse("192.168.1.0/24").unwrap().had_host_bits);
        let parsed = parse("2001:db8::1/64").unwrap();
        assert_eq!(parsed.net.to_string(), "2001:db8::/64");
        assert!(parsed.had_host_bits);
    }

    #[test]
    fn ipv4_mapped_prefixes_become_ipv4() {
        let parsed = parse("::ffff:192.0.2.7").unwrap();
        assert_eq!(parsed.net.to_string(), "192.0.2.7/32");
        assert!(parsed.mapped);
        assert!(!parsed.had_host_bits);
        assert_eq!(net("::ffff:192.0.2.0/120").to_string(), "192.0.2.0/24");
        assert_eq!(net("::ffff:c000:200/120").to_string(), "192.0.2.0/24");
        assert_eq!(net("::ffff:0.0.0.0/96").to_string(), "0.0.0.0/0");
        let parsed = parse("::ffff:192.0.2.7/120").unwrap();
        assert_eq!(parsed.net.to_string(), "192.0.2.0/24");
        assert!(parsed.had_host_bits);
        assert_eq!(
            parse("::ffff:192.0.2.0/95"),
            Err(PrefixError::MappedTooShort)
        );
        assert_eq!(parse("::ffff:0:0/64"), Err(PrefixError::MappedTooShort));
        // Not mapped: the IPv4-compatible form and ordinary IPv6 stay IPv6.
        assert!(!parse("::192.0.2.7").unwrap().mapped);
        assert_eq!(net("::/0").to_string(), "::/0");
        assert_eq!(
            unmap("::ffff:203.0.113.9/128".parse().unwrap()).unwrap(),
            ("203.0.113.9/32".parse().unwrap(), true)
        );
        assert_eq!(
            unmap("2001:db8::/32".parse().unwrap()).unwrap(),
            ("2001:db8::/32".parse().unwrap(), false)
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(parse("89.16.184.300/28"), Err(PrefixError::BadAddress));
        assert_eq!(parse("mail.example.com"), Err(PrefixError::BadAddress));
        assert_eq!(parse(""), Err(PrefixError::BadAddress));
        assert_eq!(parse("/24"), Err(PrefixError::BadAddress));
        assert_eq!(
            parse("192.0.2.0/33"),
            Err(PrefixError::BadLength { max: 32 })
        );
        assert_eq!(parse("192.0.2.0/"), Err(PrefixError::BadLength { max: 32 }));
        assert_eq!(
            parse("192.0.2.0/-1"),
            Err(PrefixError::BadLength { max: 32 })
        );
        assert_eq!(
            parse("2001:db8::/129"),
            Err(PrefixError::BadLength { max: 128 })
        );
        assert_eq!(
            parse("2001:db8::/255.255.0.0"),
            Err(PrefixError::MaskOnIpv6)
        );
        assert_eq!(
            parse("192.0.2.0/255.0.255.0"),
            Err(PrefixError::NonContiguousMask {
                mask: Ipv4Addr::new(255, 0, 255, 0)
            })
        );
        assert_eq!(
            parse("192.0.2.0/0.0.0.255"),
            Err(PrefixError::NonContiguousMask {
                mask: Ipv4Addr::new(0, 0, 0, 255)
            })
        );
        assert_eq!(
            parse("192.0.2.0/24/8"),
            Err(PrefixError::BadLength { max: 32 })
        );
        assert_eq!(parse("010.0.0.1"), Err(PrefixError::BadAddress));
        assert_eq!(
            parse("192.0.2.0 mask"),
            Err(PrefixError::BadLength { max: 32 })
        );
        assert_eq!(
            parse("192.0.2.0/24 255.0.0.0"),
            Err(PrefixError::BadLength { max: 32 })
        );
    }
}
