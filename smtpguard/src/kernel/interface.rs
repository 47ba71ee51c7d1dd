//! What the filter needs to know about a network interface before it attaches: its index,
//! its link type (does a frame start with an Ethernet header, or with the IP header?), its
//! MAC address (a reset answers only frames sent to it), and whether the NIC strips VLAN tags
//! before XDP sees the frame (a reset could then not carry the tag back).
//!
//! Everything is asked of the kernel with ioctls on a socket of the calling thread's network
//! namespace; sysfs would show the namespace it was mounted in, not ours.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use smtpguard_common::{IfaceInfo, iface};

/// `ARPHRD_*` link types from linux/if_arp.h that smtpguard handles.
const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;
const ARPHRD_NONE: u16 = 0xfffe;
const ARPHRD_PPP: u16 = 512;
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL: u16 = 768;
const ARPHRD_TUNNEL6: u16 = 769;
const ARPHRD_SIT: u16 = 776;
const ARPHRD_IPGRE: u16 = 778;
const ARPHRD_IP6GRE: u16 = 823;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GFEATURES: u32 = 0x3a;
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;
/// The ethtool names of the features that strip VLAN tags on receive.
const VLAN_STRIP_FEATURES: [&str; 2] = ["rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"];

#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("interface {interface:?} does not exist (see `ip link`)")]
    NoSuchInterface { interface: String },
    #[error("interface {interface:?}: {call} failed: {source}")]
    Syscall {
        interface: String,
        call: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "interface {interface:?} has link type {link_type} ({name}), which smtpguard cannot read: it knows Ethernet interfaces and layer-3 ones (TUN, WireGuard, PPP, IP tunnels)"
    )]
    UnsupportedLinkType {
        interface: String,
        link_type: u16,
        name: &'static str,
    },
}

/// How a frame on the interface starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkKind {
    /// An Ethernet header (physical NICs, veth, bridges, TAP, VXLAN, loopback).
    Ethernet,
    /// The IP header: TUN, WireGuard, PPP, IPIP/GRE/SIT tunnels. Only generic (skb) XDP runs
    /// on these (their drivers refuse a native program).
    Layer3,
}

impl std::fmt::Display for LinkKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ethernet => "Ethernet",
            Self::Layer3 => "layer 3",
        })
    }
}

/// An interface as the kernel describes it now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub kind: LinkKind,
    /// The link type's name (`ether`, `none`, `ppp`, ...), for messages.
    pub link_type: &'static str,
    pub mac: [u8; 6],
    /// Which receive features strip VLAN tags before XDP sees the frame, where active.
    pub vlan_stripping: Vec<&'static str>,
}

impl Interface {
    /// Asks the kernel about `name` in the calling thread's network namespace.
    pub fn lookup(name: &str) -> Result<Self, InterfaceError> {
        let socket = Socket::open(name)?;
        let index = socket.index()?;
        let (link_type, mac) = socket.hardware_address()?;
        let (kind, type_name) = match link_type {
            ARPHRD_ETHER => (LinkKind::Ethernet, "ether"),
            ARPHRD_LOOPBACK => (LinkKind::Ethernet, "loopback"),
            ARPHRD_NONE => (LinkKind::Layer3, "none"),
            ARPHRD_PPP => (LinkKind::Layer3, "ppp"),
            ARPHRD_RAWIP => (LinkKind::Layer3, "rawip"),
            ARPHRD_TUNNEL => (LinkKind::Layer3, "ipip"),
            ARPHRD_TUNNEL6 => (LinkKind::Layer3, "tunnel6"),
            ARPHRD_SIT => (LinkKind::Layer3, "sit"),
            ARPHRD_IPGRE => (LinkKind::Layer3, "gre"),
            ARPHRD_IP6GRE => (LinkKind::Layer3, "ip6gre"),
            other => {
                return Err(InterfaceError::UnsupportedLinkType {
                    interface: name.to_owned(),
                    link_type: other,
                    name: arphrd_name(other),
                });
            }
        };
        let vlan_stripping = match kind {
            // Devices without Ethernet frames carry no tags; many answer no ethtool queries.
            LinkKind::Layer3 => Vec::new(),
            LinkKind::Ethernet => socket.active_features(&VLAN_STRIP_FEATURES)?,
        };
        Ok(Self {
            name: name.to_owned(),
            index,
            kind,
            link_type: type_name,
            mac: if kind == LinkKind::Ethernet {
                mac
            } else {
                [0; 6]
            },
            vlan_stripping,
        })
    }

    /// What the program needs to know to answer SYNs on this interface.
    pub fn info(&self) -> IfaceInfo {
        let mut flags = 0;
        if self.kind == LinkKind::Layer3 {
            flags |= iface::LAYER3;
        }
        if self.resets_allowed() {
            flags |= iface::REPLIES;
        }
        IfaceInfo {
            mac: self.mac,
            flags,
            ..IfaceInfo::default()
        }
    }

    /// Whether a reset may be sent back out of this interface: not where the NIC strips VLAN
    /// tags (the tag is out of the program's sight, and a reset without it would leave on the
    /// wrong VLAN). aya 0.14 cannot load the device-bound program the RX metadata kfunc
    /// (`bpf_xdp_metadata_rx_vlan_tag`) needs, so the tag cannot be read back.
    pub fn resets_allowed(&self) -> bool {
        self.vlan_stripping.is_empty()
    }

    /// Why resets are withheld on this interface, and what to do, if they are.
    pub fn resets_withheld_because(&self) -> Option<String> {
        (!self.resets_allowed()).then(|| {
            format!(
                "interface {}: the NIC strips VLAN tags before XDP sees them ({} on), so a reset could leave without its tag: action = \"reject\" drops on {} instead; `ethtool -K {} rxvlan off rx-vlan-stag-hw-parse off` restores resets",
                self.name,
                self.vlan_stripping.join(", "),
                self.name,
                self.name
            )
        })
    }
}

fn arphrd_name(link_type: u16) -> &'static str {
    match link_type {
        24 => "ieee1394",
        32 => "infiniband",
        280 => "can",
        512..=519 => "ppp-like",
        770 => "frad",
        776..=799 => "tunnel",
        800..=803 => "ieee802",
        804 => "ieee802.15.4",
        _ => "unknown",
    }
}

/// `struct ifreq`: a name and a union of at most 24 bytes.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// A datagram socket to ask the kernel about one interface with.
struct Socket {
    fd: OwnedFd,
    name: String,
    c_name: CString,
}

impl Socket {
    fn open(name: &str) -> Result<Self, InterfaceError> {
        let no_such = || InterfaceError::NoSuchInterface {
            interface: name.to_owned(),
        };
        let c_name = CString::new(name).map_err(|_| no_such())?;
        if c_name.as_bytes().len() >= libc::IFNAMSIZ {
            return Err(no_such());
        }
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(InterfaceError::Syscall {
                interface: name.to_owned(),
                call: "socket",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            fd,
            name: name.to_owned(),
            c_name,
        })
    }

    fn request(&self) -> IfReq {
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        for (slot, byte) in request.name.iter_mut().zip(self.c_name.as_bytes()) {
            *slot = *byte as libc::c_char;
        }
        request
    }

    fn ioctl(
        &self,
        call: &'static str,
        request: libc::c_ulong,
        ifreq: &mut IfReq,
    ) -> Result<(), InterfaceError> {
        // SAFETY: `ifreq` is a valid `struct ifreq` for these requests, alive for the call;
        // where its union holds a pointer, that pointer's buffer outlives the call too.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), request as _, ifreq as *mut IfReq) };
        if rc == 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::ENODEV) {
            return Err(InterfaceError::NoSuchInterface {
                interface: self.name.clone(),
            });
        }
        Err(InterfaceError::Syscall {
            interface: self.name.clone(),
            call,
            source,
        })
    }

    fn index(&self) -> Result<u32, InterfaceError> {
        let mut ifreq = self.request();
        self.ioctl("SIOCGIFINDEX", libc::SIOCGIFINDEX, &mut ifreq)?;
        let bytes = [ifreq.data[0], ifreq.data[1], ifreq.data[2], ifreq.data[3]];
        Ok(i32::from_ne_bytes(bytes) as u32)
    }

    /// The link type (`sa_family`) and the first six bytes of the hardware address.
    fn hardware_address(&self) -> Result<(u16, [u8; 6]), InterfaceError> {
        let mut ifreq = self.request();
        self.ioctl("SIOCGIFHWADDR", libc::SIOCGIFHWADDR, &mut ifreq)?;
        let family = u16::from_ne_bytes([ifreq.data[0], ifreq.data[1]]);
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&ifreq.data[2..8]);
        Ok((family, mac))
    }

    /// Which of the ethtool features `wanted` are active. A device without ethtool support
    /// has none active.
    fn active_features(
        &self,
        wanted: &[&'static str],
    ) -> Result<Vec<&'static str>, InterfaceError> {
        let Some(names) = self.feature_names()? else {
            return Ok(Vec::new());
        };
        let words = names.len().div_ceil(32);
        // struct ethtool_gfeatures: cmd, size, then `size` blocks of
        // {available, requested, active, never_changed}.
        let mut buffer = vec![0u32; 2 + 4 * words];
        buffer[0] = ETHTOOL_GFEATURES;
        buffer[1] = words as u32;
        self.ethtool("ETHTOOL_GFEATURES", buffer.as_mut_ptr().cast())?;
        let active = |index: usize| buffer[2 + 4 * (index / 32) + 2] & (1 << (index % 32)) != 0;
        Ok(wanted
            .iter()
            .copied()
            .filter(|feature| {
                names
                    .iter()
                    .position(|name| name == feature)
                    .is_some_and(active)
            })
            .collect())
    }

    /// The names of the device's features, by bit index; `None` where the device answers no
    /// ethtool queries.
    fn feature_names(&self) -> Result<Option<Vec<String>>, InterfaceError> {
        // struct ethtool_sset_info: cmd, reserved, sset_mask (u64), then one u32 per set.
        let mut info = [0u32; 5];
        info[0] = ETHTOOL_GSSET_INFO;
        let mask = 1u64 << ETH_SS_FEATURES;
        info[2] = mask as u32;
        info[3] = (mask >> 32) as u32;
        match self.ethtool("ETHTOOL_GSSET_INFO", info.as_mut_ptr().cast()) {
            Ok(()) => {}
            Err(InterfaceError::Syscall { source, .. })
                if source.raw_os_error() == Some(libc::EOPNOTSUPP) =>
            {
                return Ok(None);
            }
            Err(error) => return Err(error),
        }
        if u64::from(info[2]) | (u64::from(info[3]) << 32) != mask {
            return Ok(None);
        }
        let count = info[4] as usize;
        // struct ethtool_gstrings: cmd, string_set, len, then len * 32 bytes.
        let mut buffer = vec![0u8; 3 * size_of::<u32>() + count * ETH_GSTRING_LEN];
        buffer[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
        buffer[4..8].copy_from_slice(&ETH_SS_FEATURES.to_ne_bytes());
        buffer[8..12].copy_from_slice(&(count as u32).to_ne_bytes());
        self.ethtool("ETHTOOL_GSTRINGS", buffer.as_mut_ptr())?;
        Ok(Some(
            buffer[12..]
                .chunks_exact(ETH_GSTRING_LEN)
                .map(|raw| {
                    let end = raw.iter().position(|byte| *byte == 0).unwrap_or(raw.len());
                    String::from_utf8_lossy(&raw[..end]).into_owned()
                })
                .collect(),
        ))
    }

    fn ethtool(&self, call: &'static str, data: *mut u8) -> Result<(), InterfaceError> {
        let mut ifreq = self.request();
        ifreq.data[..size_of::<usize>()].copy_from_slice(&(data as usize).to_ne_bytes());
        self.ioctl(call, SIOCETHTOOL, &mut ifreq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_an_ethernet_like_interface() {
        let lo = Interface::lookup("lo").expect("lo exists in every namespace");
        assert_eq!(lo.kind, LinkKind::Ethernet);
        assert_eq!(lo.index, 1);
        assert_eq!(lo.mac, [0; 6]);
    }

    #[test]
    fn a_missing_interface_is_named() {
        let error = Interface::lookup("sg-nosuch0").unwrap_err().to_string();
        assert_eq!(
            error,
            "interface \"sg-nosuch0\" does not exist (see `ip link`)"
        );
    }
}
