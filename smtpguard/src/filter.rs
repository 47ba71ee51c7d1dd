//! The XDP program in the kernel: load the embedded object (the verifier runs here), hand its
//! maps to [`crate::maps::PolicyMaps`], and attach to or detach from interfaces.

use std::path::Path;

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, xdp::XdpLinkId},
};
use smtpguard_common::PROGRAM_NAME;

use crate::{config::XdpMode, maps::PolicyMaps};

/// The XDP program, built by `build.rs` from the `smtpguard-ebpf` crate.
pub static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtpguard"));

#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    #[error("cannot load the eBPF object: {0}")]
    Object(#[source] aya::EbpfError),
    #[error("the object has no program {PROGRAM_NAME:?}")]
    MissingProgram,
    #[error("the object has no map {0:?}")]
    MissingMap(&'static str),
    #[error("the kernel refused the XDP program: {0}")]
    Verifier(#[source] ProgramError),
    #[error("cannot pin map {name} at {path}: {source}")]
    Pin {
        name: &'static str,
        path: String,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
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
    #[error(
        "the pinned counter maps are not readable ({pins}), and the maps the state file names are gone ({ids})"
    )]
    CountersGone {
        pins: Box<FilterError>,
        ids: Box<FilterError>,
    },
    #[error("test run failed: {0}")]
    TestRun(#[source] ProgramError),
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
}

/// The loaded program and its attachments. Dropping it detaches from every interface.
pub struct Filter {
    ebpf: Ebpf,
    attachments: Vec<Attachment>,
}

impl Filter {
    /// Loads and verifies the program. Its maps are pinned under `pin_dir` when given (so
    /// `smtpguard stats` can read them from another process) and handed out as [`PolicyMaps`].
    pub fn load(pin_dir: Option<&Path>) -> Result<(Self, PolicyMaps), FilterError> {
        let mut ebpf = EbpfLoader::new()
            .load(PROGRAM_OBJECT)
            .map_err(FilterError::Object)?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(FilterError::Verifier)?;
        let mut take = |name: &'static str| -> Result<Map, FilterError> {
            let map = ebpf.take_map(name).ok_or(FilterError::MissingMap(name))?;
            if let Some(dir) = pin_dir {
                let path = dir.join(name);
                map.pin(&path).map_err(|source| FilterError::Pin {
                    name,
                    path: path.display().to_string(),
                    source,
                })?;
            }
            Ok(map)
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
        });
        Ok(attached)
    }

    /// Detaches from `interface`.
    pub fn detach(&mut self, interface: &str) -> Result<(), FilterError> {
        let Some(index) = self
            .attachments
            .iter()
            .position(|attachment| attachment.interface == interface)
        else {
            return Ok(());
        };
        let attachment = self.attachments.remove(index);
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
        self.attachments
            .iter()
            .find(|attachment| attachment.interface == interface)
    }

    /// Runs the program once on `frame` through `BPF_PROG_TEST_RUN`; returns the XDP action.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<u32, FilterError> {
        self.test_run_output(frame).map(|(verdict, _)| verdict)
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
