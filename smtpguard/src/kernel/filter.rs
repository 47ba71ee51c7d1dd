//! The XDP program in the kernel: load the embedded object (the verifier runs here), hand its
//! maps to [`crate::kernel::maps::PolicyMaps`], and attach to or detach from interfaces.
//!
//! The object holds two entry points over the same maps: one for frames that start with an
//! Ethernet header, one for layer-3 interfaces (TUN, WireGuard, PPP, IP tunnels) whose
//! packets start at the IP header. Each interface gets the one its link type calls for.
//!
//! With a maps folder, the maps live in bpffs: a later daemon of the same map layout (checked
//! by the stamp the creator wrote into `SG_LAYOUT`) reuses them, policy, counters and all, and
//! links pinned beside them keep the program attached after the daemon exits. A later daemon
//! takes over a pinned link by swapping its program in place (`bpf_link_update`): the
//! interface is never without a filter, and if the swap fails the old program stays.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, Map, MapData, MapInfo},
    programs::{
        ProgramError, TestRun, TestRunOptions, Xdp,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use smtpguard_common::{LAYOUT_STAMP, MAP_LAYOUTS, PROGRAM_NAME, PROGRAM_NAME_L3, map_name};

use crate::{
    kernel::{
        interface::{Interface, InterfaceError, LinkKind},
        link,
        maps::{MapsError, PolicyMaps},
    },
    source::config::XdpMode,
};

/// The XDP program, built by `build.rs` from the `smtpguard-ebpf` crate.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpguard"));

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("the kernel refused the XDP program {program}: {source}")]
    Verifier {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error(transparent)]
    Interface(#[from] InterfaceError),
    #[error(
        "interface {interface:?}: native XDP attach failed: {source}; the driver may not support native XDP: set xdp_mode = \"auto\" to fall back to generic mode, or \"skb\""
    )]
    NativeAttach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error(
        "interface {interface:?} is a layer-3 device (link type {link_type}): its driver runs no native XDP program (TUN, WireGuard, PPP and IP tunnels refuse one), and smtpguard attaches there in generic mode; set xdp_mode = \"auto\" or \"skb\""
    )]
    NativeOnLayer3 {
        interface: String,
        link_type: &'static str,
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
    #[error("test run failed: {0}")]
    TestRun(#[source] ProgramError),
    #[error(
        "the map pinned at {path} was made by an incompatible smtpguard (key {key} bytes, value {value}, {entries} entries; expected {expected_key}, {expected_value}, {expected_entries}): its folder is named for this build's layout, so it was not made by smtpguard; remove it",
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
    #[error(
        "the maps pinned in {dir} carry layout stamp {found:016x}, not this build's {expected:016x}; remove the folder",
        dir = dir.display()
    )]
    WrongStamp {
        dir: PathBuf,
        found: u64,
        expected: u64,
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

impl FilterError {
    /// Whether a pinned link could not be taken over because its interface went away (the
    /// kernel detached the program then): nothing runs there, so attaching afresh is safe.
    pub fn link_is_gone(&self) -> bool {
        let Self::Adopt { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(error) = cause {
            if let Some(io) = error.downcast_ref::<std::io::Error>()
                && io.raw_os_error() == Some(libc::ENOLINK)
            {
                return true;
            }
            cause = error.source();
        }
        false
    }
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
    /// The interface as it was when the program was attached.
    pub facts: Interface,
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
    /// Loads and verifies both programs. With `maps_dir`, the maps are the ones pinned there,
    /// if a daemon of this layout left them (checked against the layout stamp and each map's
    /// sizes), or new ones pinned there (so `smtpguard stats` can read them from another
    /// process) and stamped. Either way they are handed out as [`PolicyMaps`], which reads
    /// back what they hold.
    pub fn load(maps_dir: Option<&Path>) -> Result<(Self, PolicyMaps), FilterError> {
        let mut loader = EbpfLoader::new();
        let mut adopting = false;
        if let Some(dir) = maps_dir {
            for layout in MAP_LAYOUTS {
                let path = dir.join(layout.name);
                if path.exists() {
                    check_layout(layout.name, &path)?;
                    adopting = true;
                }
                loader.map_pin_path(layout.name, path);
            }
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(FilterError::Object)?;
        for name in [PROGRAM_NAME, PROGRAM_NAME_L3] {
            xdp_program(&mut ebpf, name)?
                .load()
                .map_err(|source| FilterError::Verifier {
                    program: name,
                    source,
                })?;
        }
        stamp(&mut ebpf, maps_dir, adopting)?;
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
    /// by this one in a single step, and the pin stays. On failure the link, and the program
    /// it runs, are left as they were.
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
        let facts = Interface::lookup(interface)?;
        #[cfg(feature = "upgrade-test")]
        if std::env::var_os("SMTPGUARD_FAIL_LINK_UPDATE").is_some() {
            return Err(adopt_error(
                "link update failed on purpose (SMTPGUARD_FAIL_LINK_UPDATE, upgrade-test build)"
                    .into(),
            ));
        }
        let pinned = PinnedLink::from_pin(path).map_err(|error| adopt_error(Box::new(error)))?;
        let link = XdpLink::try_from(FdLink::from(pinned))
            .map_err(|error: LinkError| adopt_error(Box::new(error)))?;
        let link = xdp_program(&mut self.ebpf, program_for(facts.kind))?
            .attach_to_link(link)
            .map_err(|error| adopt_error(Box::new(error)))?;
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            facts,
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
        let program = xdp_program(&mut self.ebpf, program_for(attachment.facts.kind))?;
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

    /// Attaches to `interface` the program its link type calls for, honouring `mode`;
    /// returns the mode in force. Layer-3 interfaces get generic mode, the only one that runs
    /// on them.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<AttachedMode, FilterError> {
        if self.attachment(interface).is_some() {
            return Err(FilterError::AlreadyAttached {
                interface: interface.to_owned(),
            });
        }
        let facts = Interface::lookup(interface)?;
        let mode = match (facts.kind, mode) {
            (LinkKind::Ethernet, mode) => mode,
            (LinkKind::Layer3, XdpMode::Native) => {
                return Err(FilterError::NativeOnLayer3 {
                    interface: interface.to_owned(),
                    link_type: facts.link_type,
                });
            }
            (LinkKind::Layer3, _) => XdpMode::Skb,
        };
        let program = xdp_program(&mut self.ebpf, program_for(facts.kind))?;
        let attach_error = |source| FilterError::Attach {
            interface: interface.to_owned(),
            mode: AttachedMode::Generic,
            source,
        };
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
                .map_err(attach_error)?,
            XdpMode::Auto => match program.attach(interface, aya::programs::XdpMode::Driver) {
                Ok(link) => (link, AttachedMode::Native),
                Err(native_error) => {
                    let link = program
                        .attach(interface, aya::programs::XdpMode::Skb)
                        .map_err(attach_error)?;
                    log::warn!(
                        "interface {interface}: native XDP unavailable ({native_error}); using generic (skb) mode, which runs later in the stack and costs more per packet"
                    );
                    (link, AttachedMode::Generic)
                }
            },
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            facts,
            mode: attached,
            link,
            pin: None,
        });
        Ok(attached)
    }

    /// Asks the kernel again about every attached interface (a MAC or offload setting may have
    /// changed since); returns those whose facts changed.
    pub fn refresh_facts(&mut self) -> Vec<&Attachment> {
        let mut changed = Vec::new();
        for (index, attachment) in self.attachments.iter_mut().enumerate() {
            match Interface::lookup(&attachment.interface) {
                Ok(facts) if facts != attachment.facts => {
                    attachment.facts = facts;
                    changed.push(index);
                }
                Ok(_) => {}
                Err(error) => log::warn!("{error}"),
            }
        }
        changed
            .into_iter()
            .map(|index| &self.attachments[index])
            .collect()
    }

    /// Lets go of `interface`'s attachment whatever state its link is in (its interface may
    /// be gone): the pin is removed and the link dropped.
    pub fn forget(&mut self, interface: &str) -> Result<(), FilterError> {
        let Some(index) = self.position(interface) else {
            return Ok(());
        };
        let attachment = self.attachments.remove(index);
        let program = xdp_program(&mut self.ebpf, program_for(attachment.facts.kind))?;
        // A defunct link may refuse a detach; dropping it is all that is left to do.
        let _ = program.detach(attachment.link);
        match &attachment.pin {
            Some(pin) => remove_pin(pin),
            None => Ok(()),
        }
    }

    /// Detaches from `interface`.
    pub fn detach(&mut self, interface: &str) -> Result<(), FilterError> {
        let Some(index) = self.position(interface) else {
            return Ok(());
        };
        let attachment = self.attachments.remove(index);
        if let Some(pin) = &attachment.pin {
            // Off the interface now: the pin's own reference would let go of the link only
            // after the kernel's deferred release.
            match link::detach_pinned(pin) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(FilterError::Unpin {
                        path: pin.clone(),
                        source,
                    });
                }
            }
        }
        xdp_program(&mut self.ebpf, program_for(attachment.facts.kind))?
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

    /// How many instructions the verifier went through for each program: the measure of how
    /// close the parser is to the kernel's limit of a million.
    pub fn verified_instructions(&mut self) -> Result<Vec<(&'static str, u32)>, FilterError> {
        [PROGRAM_NAME, PROGRAM_NAME_L3]
            .into_iter()
            .map(|name| {
                let info = xdp_program(&mut self.ebpf, name)?
                    .info()
                    .map_err(|source| FilterError::Verifier {
                        program: name,
                        source,
                    })?;
                Ok((name, info.verified_instruction_count().unwrap_or(0)))
            })
            .collect()
    }

    /// Runs the Ethernet program once on `frame` through `BPF_PROG_TEST_RUN`; returns the
    /// XDP action.
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
        let program = xdp_program(&mut self.ebpf, PROGRAM_NAME)?;
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
        xdp_program(&mut self.ebpf, PROGRAM_NAME)?
            .info()
            .map_err(|source| FilterError::Verifier {
                program: PROGRAM_NAME,
                source,
            })
    }

    /// Runs the program once on `frame`; returns its verdict and the frame as the program
    /// left it (rewritten, for a reply sent with `XDP_TX`).
    pub fn test_run_output(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), FilterError> {
        self.test_run_on(LinkKind::Ethernet, frame)
    }

    /// Runs the program for interfaces of `kind` once on `frame` (arriving on `lo`); returns
    /// its verdict and the frame as the program left it.
    pub fn test_run_on(
        &mut self,
        kind: LinkKind,
        frame: &[u8],
    ) -> Result<(u32, Vec<u8>), FilterError> {
        let program = xdp_program(&mut self.ebpf, program_for(kind))?;
        let mut out = vec![0u8; frame.len() + 256];
        let mut options = TestRunOptions::new();
        options.data_in = Some(frame);
        options.data_out = Some(&mut out);
        let result = program.test_run(options).map_err(FilterError::TestRun)?;
        out.truncate(result.data_size_out as usize);
        Ok((result.return_value, out))
    }
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, FilterError> {
    ebpf.program_mut(name)
        .ok_or(FilterError::MissingProgram(name))?
        .try_into()
        .map_err(|_| FilterError::MissingProgram(name))
}

/// The entry point for interfaces of `kind`.
fn program_for(kind: LinkKind) -> &'static str {
    match kind {
        LinkKind::Ethernet => PROGRAM_NAME,
        LinkKind::Layer3 => PROGRAM_NAME_L3,
    }
}

/// Stamps fresh pinned maps with this build's layout, or checks that adopted ones carry it.
fn stamp(ebpf: &mut Ebpf, maps_dir: Option<&Path>, adopting: bool) -> Result<(), FilterError> {
    let name = map_name::LAYOUT;
    let map_error = |source| MapsError::Map { name, source };
    let mut layout: Array<&mut MapData, u64> = ebpf
        .map_mut(name)
        .ok_or(MapsError::Missing(name))?
        .try_into()
        .map_err(map_error)?;
    let found = layout.get(&0, 0).map_err(map_error)?;
    match (maps_dir, adopting) {
        (Some(dir), true) if found != LAYOUT_STAMP => Err(FilterError::WrongStamp {
            dir: dir.to_owned(),
            found,
            expected: LAYOUT_STAMP,
        }),
        (_, true) => Ok(()),
        (_, false) => Ok(layout.set(0, LAYOUT_STAMP, 0).map_err(map_error)?),
    }
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

/// Refuses a pinned map whose layout is not the one this program declares: reusing it would
/// make the program misread every entry.
fn check_layout(name: &'static str, path: &Path) -> Result<(), FilterError> {
    let info = MapInfo::from_pin(path).map_err(|source| MapsError::Map { name, source })?;
    let expected = MAP_LAYOUTS
        .iter()
        .find(|layout| layout.name == name)
        .ok_or(MapsError::Missing(name))?;
    if (info.key_size(), info.value_size(), info.max_entries())
        != (expected.key_size, expected.value_size, expected.max_entries)
    {
        return Err(FilterError::IncompatiblePin {
            path: path.to_owned(),
            key: info.key_size(),
            value: info.value_size(),
            entries: info.max_entries(),
            expected_key: expected.key_size,
            expected_value: expected.value_size,
            expected_entries: expected.max_entries,
        });
    }
    Ok(())
}
