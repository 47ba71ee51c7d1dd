//! The XDP program in the kernel: load the embedded object (the verifier runs here), hand its
//! maps to [`crate::kernel::maps::PolicyMaps`], and attach to or detach from interfaces.
//!
//! With a pin directory, the maps live in bpffs: a later daemon reuses them (policy, counters
//! and all), and links pinned there keep the program attached after the daemon exits. Such a
//! daemon takes over a pinned link by swapping its program in place (`bpf_link_update`), so
//! the interface is never without a filter.

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapInfo},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use smtpguard_common::{
    MAX_OFFENDERS, MAX_PREFIX_COUNTERS, MAX_PREFIXES_PER_FAMILY, Offender, PROGRAM_NAME,
    RecordBudget, RuleValue, SLOTS, SlotConfig, V4_COARSE_WORDS, V4_GUARD_WORDS, counter, map_name,
};

use crate::{
    kernel::maps::{MapsError, PolicyMaps},
    source::config::XdpMode,
};

/// The XDP program, built by `build.rs` from the `smtpguard-ebpf` crate.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpguard"));

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the object has no program {PROGRAM_NAME:?}")]
    MissingProgram,
    #[error("the kernel refused the XDP program: {0}")]
    Verifier(#[source] ProgramError),
    #[error("cannot pin map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("interface {interface:?} does not exist (see `ip link`)")]
    NoSuchInterface { interface: String },
    #[error(
        "interface {interface:?}: native XDP attach failed: {source}; the driver may not support native XDP: set xdp_mode = \"auto\" to fall back to generic mode, or \"skb\""
    )]
    NativeAttach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "interface {interface:?}: {mode} XDP attach failed: {source}; is another XDP program attached? (`ip link show {interface}`)"
    )]
    Attach {
        interface: String,
        mode: AttachedMode,
        #[source]
        source: ProgramError,
    },
    #[error("interface {interface:?}: smtpguard is already attached to it")]
    AlreadyAttached { interface: String },
    #[error("interface {interface:?}: detach failed: {source}")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("test run failed: {0}")]
    TestRun(#[source] ProgramError),
    #[error(
        "the map pinned at {path} was made by an incompatible smtpguard (key {key} bytes, value {value}, {entries} entries; expected {expected_key}, {expected_value}, {expected_entries}): run `smtpguard detach` to remove the old filter first",
        path = path.display()
    )]
    IncompatiblePin {
        path: PathBuf,
        key: u32,
        value: u32,
        entries: u32,
        expected_key: u32,
        expected_value: u32,
        expected_entries: u32,
    },
    #[error("cannot pin the link of {interface} at {path}: {source}", path = path.display())]
    PinLink {
        interface: String,
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot take over the pinned link {path}: {source}", path = path.display())]
    Adopt {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot remove the pinned link {path}: {source}", path = path.display())]
    Unpin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The XDP mode actually in force on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    Native,
    Generic,
}

impl std::fmt::Display for AttachedMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// One interface the program is attached to.
#[derive(Debug)]
pub struct Attachment {
    pub interface: String,
    pub mode: AttachedMode,
    link: XdpLinkId,
    /// Where the link is pinned, if it outlives this process.
    pub pin: Option<PathBuf>,
}

/// The loaded program and its attachments. Dropping it detaches from every interface.
pub struct Filter {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
}

impl Filter {
    /// Loads and verifies the program. With `pin_dir`, its maps are the ones pinned there, if
    /// a previous daemon left them (checked for a compatible layout), or new ones pinned there
    /// (so `smtpguard stats` can read them from another process). Either way they are handed
    /// out as [`PolicyMaps`], which reads back what they hold.
    pub fn load(pin_dir: Option<&Path>) -> Result<(Self, PolicyMaps), FilterError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = match pin_dir {
            Some(dir) => map_name::ALL
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            if path.exists() {
                check_layout(name, path)?;
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(FilterError::Object)?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(FilterError::Verifier)?;
        let mut take = |name: &'static str| -> Result<Map, MapsError> {
            ebpf.take_map(name).ok_or(MapsError::Missing(name))
        };
        let maps = PolicyMaps::from_maps(&mut take)?;
        Ok((
            Self {
                ebpf,
                attachments: Vec::new(),
            },
            maps,
        ))
    }

    /// Takes over the link pinned at `path` on `interface`: the program behind it is replaced
    /// by this one in a single step, and the pin stays.
    pub fn adopt(
        &mut self,
        interface: &str,
        mode: AttachedMode,
        path: &Path,
    ) -> Result<(), FilterError> {
        let adopt_error = |source: Box<dyn std::error::Error + Send + Sync>| FilterError::Adopt {
            path: path.to_owned(),
            source,
        };
        let pinned = PinnedLink::from_pin(path).map_err(|error| adopt_error(Box::new(error)))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|error: LinkError| adopt_error(Box::new(error)))?;
        let link = xdp_program(&mut self.ebpf)?
            .attach_to_link(link)
            .map_err(|error| adopt_error(Box::new(error)))?;
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
            pin: Some(path.to_owned()),
        });
        Ok(())
    }

    /// Pins the link of `interface` at `path`: the program stays attached after this process
    /// exits, until the pin is removed.
    pub fn pin_link(&mut self, interface: &str, path: &Path) -> Result<(), FilterError> {
        let Some(index) = self.position(interface) else {
            return Ok(());
        };
        let pin_error = |source| FilterError::PinLink {
            interface: interface.to_owned(),
            path: path.to_owned(),
            source,
        };
        if self.attachments[index].pin.is_some() {
            return Ok(());
        }
        let mut attachment = self.attachments.remove(index);
        let program = xdp_program(&mut self.ebpf)?;
        // The link leaves the program's hands for the pin and comes straight back: should
        // pinning fail, the link is dropped and the interface detached, and the caller's
        // attach fails as a whole.
        let link = program
            .take_link(attachment.link)
            .map_err(|source| FilterError::Detach {
                interface: interface.to_owned(),
                source,
            })?;
        let fd_link = FdLink::try_from(link).map_err(|error| FilterError::Adopt {
            path: path.to_owned(),
            source: Box::new(error),
        })?;
        let pinned = fd_link.pin(path).map_err(pin_error)?;
        // Re-pointing the link at the program it already runs changes nothing for packets.
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|error| FilterError::Adopt {
            path: path.to_owned(),
            source: Box::new(error),
        })?;
        attachment.link = program
            .attach_to_link(link)
            .map_err(|error| FilterError::Adopt {
                path: path.to_owned(),
                source: Box::new(error),
            })?;
        attachment.pin = Some(path.to_owned());
        self.attachments.push(attachment);
        Ok(())
    }

    /// Removes the pin of `interface`'s link, if any: the link now lives as long as this
    /// process holds it.
    pub fn unpin_link(&mut self, interface: &str) -> Result<(), FilterError> {
        let Some(index) = self.position(interface) else {
            return Ok(());
        };
        let attachment = &mut self.attachments[index];
        if let Some(pin) = attachment.pin.take()
            && let Err(error) = remove_pin(&pin)
        {
            attachment.pin = Some(pin);
            return Err(error);
        }
        Ok(())
    }

    /// Attaches to `interface`, honouring `mode`; returns the mode in force.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AttachedMode, FilterError> {
        if self.attachment(interface).is_some() {
            return Err(FilterError::AlreadyAttached {
                interface: interface.to_owned(),
            });
        }
        if !interface_exists(interface) {
            return Err(FilterError::NoSuchInterface {
                interface: interface.to_owned(),
            });
        }
        let program = xdp_program(&mut self.ebpf)?;
        let (link, attached) = match mode {
            XdpMode::Native => program
                .attach(interface, aya::programs::XdpMode::Driver)
                .map(|link| (link, AttachedMode::Native))
                .map_err(|source| FilterError::NativeAttach {
                    interface: interface.to_owned(),
                    source,
                })?,
            XdpMode::Skb => program
                .attach(interface, aya::programs::XdpMode::Skb)
                .map(|link| (link, AttachedMode::Generic))
                .map_err(|source| FilterError::Attach {
                    interface: interface.to_owned(),
                    mode: AttachedMode::Generic,
                    source,
                })?,
            XdpMode::Auto => match program.attach(interface, aya::programs::XdpMode::Driver) {
                Ok(link) => (link, AttachedMode::Native),
                Err(native_error) => {
                    let link = program
                        .attach(interface, aya::programs::XdpMode::Skb)
                        .map_err(|source| FilterError::Attach {
                            interface: interface.to_owned(),
                            mode: AttachedMode::Generic,
                            source,
                        })?;
                    log::warn!(
                        "interface {interface}: native XDP unavailable ({native_error}); using generic (skb) mode, which runs later in the stack and costs more per packet"
                    );
                    (link, AttachedMode::Generic)
                }
            },
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: attached,
            link,
            pin: None,
        });
        Ok(attached)
    }

    /// Detaches from `interface`.
    pub fn detach(&mut self, interface: &str) -> Result<(), FilterError> {
        let Some(index) = self.position(interface) else {
            return Ok(());
        };
        let attachment = self.attachments.remove(index);
        if let Some(pin) = &attachment.pin {
            remove_pin(pin)?;
        }
        xdp_program(&mut self.ebpf)?
            .detach(attachment.link)
            .map_err(|source| FilterError::Detach {
                interface: interface.to_owned(),
                source,
            })
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    pub fn attachment(&self, interface: &str) -> Option<&Attachment> {
        self.position(interface)
            .map(|index| &self.attachments[index])
    }

    /// Where `interface`'s attachment sits in the list, if it is attached.
    fn position(&self, interface: &str) -> Option<usize> {
        self.attachments
            .iter()
            .position(|attachment| attachment.interface == interface)
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN`; returns the XDP action.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<u32, FilterError> {
        self.test_run_output(frame).map(|(verdict, _)| verdict)
    }

    /// Runs the program `repeat` times on `frame` in the kernel; returns the kernel's own
    /// time per repetition.
    pub fn time_run(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<std::time::Duration, FilterError> {
        let program = xdp_program(&mut self.ebpf)?;
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.repeat = repeat;
        program
            .test_run(options)
            .map(|result| result.duration)
            .map_err(FilterError::TestRun)
    }

    /// Statistics of the loaded program (run count and time, when
    /// `kernel.bpf_stats_enabled` is on).
    pub fn program_info(&mut self) -> Result<aya::programs::ProgramInfo, FilterError> {
        xdp_program(&mut self.ebpf)?
            .info()
            .map_err(FilterError::Verifier)
    }

    /// Runs the program once on `frame`; returns its verdict and the frame as the program
    /// left it (rewritten, for a reply sent with `XDP_TX`).
    pub fn test_run_output(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), FilterError> {
        let program = xdp_program(&mut self.ebpf)?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.data_out = Some(&mut out);
        let result = program.test_run(options).map_err(FilterError::TestRun)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, FilterError> {
    ebpf.program_mut(PROGRAM_NAME)
        .ok_or(FilterError::MissingProgram)?
        .try_into()
        .map_err(|_| FilterError::MissingProgram)
}

fn interface_exists(interface: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(interface) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Removes a link's pin; one already gone is fine.
fn remove_pin(path: &Path) -> Result<(), FilterError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FilterError::Unpin {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Refuses a pinned map whose layout is not the one this program declares (a pin left by
/// another version): reusing it would make the program misread every entry.
fn check_layout(name: &'static str, path: &Path) -> Result<(), FilterError> {
    let info = MapInfo::from_pin(path).map_err(|source| MapsError::Map { name, source })?;
    let (expected_key, expected_value, expected_entries) = layout(name);
    if (info.key_size(), info.value_size(), info.max_entries())
        != (expected_key, expected_value, expected_entries)
    {
        return Err(FilterError::IncompatiblePin {
            path: path.to_owned(),
            key: info.key_size(),
            value: info.value_size(),
            entries: info.max_entries(),
            expected_key,
            expected_value,
            expected_entries,
        });
    }
    Ok(())
}

/// Key size, value size and capacity of each map, as the program declares it.
fn layout(name: &str) -> (u32, u32, u32) {
    const fn size<T>() -> u32 {
        size_of::<T>() as u32
    }
    match name {
        map_name::ACTIVE_SLOT => (4, 4, 1),
        map_name::SLOT_CONFIG => (4, size::<SlotConfig>(), SLOTS),
        map_name::V4_SLOT0 | map_name::V4_SLOT1 => {
            (4 + 4, size::<RuleValue>(), MAX_PREFIXES_PER_FAMILY)
        }
        map_name::V6_SLOT0 | map_name::V6_SLOT1 => {
            (4 + 16, size::<RuleValue>(), MAX_PREFIXES_PER_FAMILY)
        }
        map_name::V4_GUARD => (4, size::<[u32; V4_GUARD_WORDS]>(), SLOTS),
        map_name::V4_COARSE => (4, size::<[u32; V4_COARSE_WORDS]>(), SLOTS),
        map_name::RECORD_BUDGET => (4, size::<RecordBudget>(), 1),
        map_name::PREFIX_HITS => (4, 8, MAX_PREFIX_COUNTERS),
        map_name::GLOBAL => (4, 8, counter::COUNT),
        _ => (4, size::<Offender>(), MAX_OFFENDERS),
    }
}
