//! The last-good store: what the daemon last applied from automatic sources (every name's
//! prefixes and when they were resolved, every list file's entries, every URL's content with
//! the validators to ask whether it changed), kept per instance under
//! `/var/lib/smtpguard/NAME`, so that a restart with DNS down or a list file gone starts with
//! the policy it had instead of not starting at all (which would leave port 25 open).
//!
//! `store.json` holds the names and an index of the list files; `lists/HASH.list` holds each
//! list file's entries at their original lines (comments and blank lines left empty), so
//! messages about a stored copy name the original file and line; `lists/HASH.url.json` holds
//! a URL's entries with their lines (several may share a line of a JSON document). Every file is written
//! atomically (a temporary file, fsync, rename, fsync of the directory) and only when what it
//! holds changed. Directories are 0700, files 0600.

use std::{
    fs, io,
    io::Write as _,
    os::unix::{
        ffi::OsStrExt as _,
        fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::source::{
    config::{ConfigError, Location, read_text},
    fetch::{Fetched, Name, Resolution, UrlContent},
    listfile,
    url::Validators,
};

/// The layout this code reads and writes.
const FORMAT: u32 = 1;
const MANIFEST: &str = "store.json";
const LISTS: &str = "lists";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("last-good store: {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("last-good store: {path}: unreadable: {source}", path = path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("last-good store: {path}: format {found}; this smtpguard reads format {FORMAT}", path = path.display())]
    Format { path: PathBuf, found: u32 },
    #[error("last-good store: {0}")]
    Read(#[source] ConfigError),
    #[error("last-good store: {path}: cannot encode: {source}", path = path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What the store holds, as `store.json` says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    names: Vec<StoredName>,
    files: Vec<StoredFile>,
    /// Absent from stores written before lists could be fetched by URL.
    #[serde(default)]
    urls: Vec<StoredUrl>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Host,
    Spf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredName {
    kind: Kind,
    name: String,
    prefixes: Vec<IpNet>,
    resolved_at_unix: u64,
}

impl StoredName {
    fn is(&self, name: &Name) -> bool {
        match name {
            Name::Host(host) => self.kind == Kind::Host && self.name == *host,
            Name::Spf(domain) => self.kind == Kind::Spf && self.name == *domain,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredFile {
    path: PathBuf,
    /// The copy's file name under `lists/`.
    copy: String,
    entries: usize,
    /// Of the entries: tells whether the copy must be written again.
    digest: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredUrl {
    url: String,
    /// The copy's file name under `lists/`.
    copy: String,
    entries: usize,
    digest: String,
    etag: Option<String>,
    last_modified: Option<String>,
    fetched_at_unix: u64,
}

/// The last-good store of one instance.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    manifest: Manifest,
}

impl Store {
    /// The daemon's store in `dir`, created (0700) if missing. A store that cannot be created
    /// or read comes back empty, with the reason: the daemon then runs without one, and says so.
    pub fn open(dir: &Path) -> (Self, Option<StoreError>) {
        let mut store = Self {
            dir: dir.to_owned(),
            manifest: Manifest::default(),
        };
        let problem = create_dir(dir)
            .and_then(|()| load(dir))
            .map(|manifest| store.manifest = manifest)
            .err();
        (store, problem)
    }

    /// As [`Store::open`], for commands that only read (`check`, `explain`): never creates
    /// anything; a missing store is an empty one.
    pub fn read_only(dir: &Path) -> (Self, Option<StoreError>) {
        let mut store = Self {
            dir: dir.to_owned(),
            manifest: Manifest::default(),
        };
        let problem = load(dir).map(|manifest| store.manifest = manifest).err();
        (store, problem)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last good answer stored for `name`.
    pub fn name(&self, name: &Name) -> Option<Resolution> {
        let stored = self.manifest.names.iter().find(|stored| stored.is(name))?;
        Some(Resolution::last_good(
            stored.prefixes.clone(),
            UNIX_EPOCH + Duration::from_secs(stored.resolved_at_unix),
        ))
    }

    /// The entries stored for the list file at `path`, with the original file's lines.
    pub fn file(&self, path: &Path) -> Result<Option<Vec<(String, Location)>>, StoreError> {
        let Some(stored) = self.manifest.files.iter().find(|file| file.path == path) else {
            return Ok(None);
        };
        let copy = self.dir.join(LISTS).join(&stored.copy);
        let text = read_text(&copy, listfile::MAX_FILE_BYTES).map_err(StoreError::Read)?;
        Ok(Some(listfile::entries(path, &text)))
    }

    /// The content stored for the list at `url`, with the validators it was fetched with.
    pub fn url(&self, url: &str) -> Result<Option<UrlContent>, StoreError> {
        let Some(stored) = self.manifest.urls.iter().find(|stored| stored.url == url) else {
            return Ok(None);
        };
        let copy = self.dir.join(LISTS).join(&stored.copy);
        let text = read_text(&copy, listfile::MAX_FILE_BYTES).map_err(StoreError::Read)?;
        let lines: Vec<(String, usize)> =
            serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
                path: copy.clone(),
                source,
            })?;
        let file: Arc<Path> = Path::new(url).into();
        let entries = lines
            .into_iter()
            .map(|(text, line)| {
                (
                    text,
                    Location {
                        file: Arc::clone(&file),
                        line,
                    },
                )
            })
            .collect();
        Ok(Some(UrlContent::last_good(
            entries,
            Validators {
                etag: stored.etag.clone(),
                last_modified: stored.last_modified.clone(),
            },
            UNIX_EPOCH + Duration::from_secs(stored.fetched_at_unix),
        )))
    }

    /// Records what `fetched` holds, the policy just applied being built from it; writes only
    /// what changed. Returns whether anything was written.
    pub fn save(&mut self, fetched: &Fetched) -> Result<bool, StoreError> {
        let lists = self.dir.join(LISTS);
        create_dir(&self.dir)?;
        create_dir(&lists)?;
        let mut manifest = Manifest {
            format: FORMAT,
            names: fetched
                .names
                .iter()
                .map(|(name, resolution)| {
                    let (kind, text) = match name {
                        Name::Host(host) => (Kind::Host, host),
                        Name::Spf(domain) => (Kind::Spf, domain),
                    };
                    StoredName {
                        kind,
                        name: text.clone(),
                        prefixes: resolution.nets.clone(),
                        resolved_at_unix: resolution
                            .resolved_at
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |since| since.as_secs()),
                    }
                })
                .collect(),
            files: Vec::new(),
            urls: Vec::new(),
        };
        let mut written = false;
        for (path, entries) in &fetched.files {
            let digest = digest(entries);
            let hash = fnv1a(path.as_os_str().as_bytes());
            let mut copy = format!("{hash:016x}.list");
            for n in 1.. {
                if !manifest.files.iter().any(|file| file.copy == copy) {
                    break;
                }
                copy = format!("{hash:016x}-{n}.list");
            }
            let unchanged = self
                .manifest
                .files
                .iter()
                .any(|file| file.path == *path && file.copy == copy && file.digest == digest)
                && lists.join(&copy).is_file();
            if !unchanged {
                write_atomic(&lists, &copy, listfile::render(entries).as_bytes())?;
                written = true;
            }
            manifest.files.push(StoredFile {
                path: path.clone(),
                copy,
                entries: entries.len(),
                digest,
            });
        }
        for (url, content) in &fetched.urls {
            let lines: Vec<(&str, usize)> = content
                .entries
                .iter()
                .map(|(text, at)| (text.as_str(), at.line))
                .collect();
            let digest = digest(&content.entries);
            let copy = format!("{:016x}.url.json", fnv1a(url.as_bytes()));
            let unchanged = self
                .manifest
                .urls
                .iter()
                .any(|stored| stored.url == *url && stored.digest == digest)
                && lists.join(&copy).is_file();
            if !unchanged {
                let json = serde_json::to_vec(&lines).map_err(|source| StoreError::Encode {
                    path: lists.join(&copy),
                    source,
                })?;
                write_atomic(&lists, &copy, &json)?;
                written = true;
            }
            manifest.urls.push(StoredUrl {
                url: url.clone(),
                copy,
                entries: content.entries.len(),
                digest,
                etag: content.validators.etag.clone(),
                last_modified: content.validators.last_modified.clone(),
                fetched_at_unix: content
                    .fetched_at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs()),
            });
        }
        if manifest != self.manifest || !self.dir.join(MANIFEST).is_file() {
            let json =
                serde_json::to_vec_pretty(&manifest).map_err(|source| StoreError::Encode {
                    path: self.dir.join(MANIFEST),
                    source,
                })?;
            write_atomic(&self.dir, MANIFEST, &json)?;
            written = true;
        }
        self.manifest = manifest;
        if written {
            self.remove_unused_copies(&lists)?;
        }
        Ok(written)
    }

    /// Removes copies of list files no longer named, and temporary files a crash left.
    fn remove_unused_copies(&self, lists: &Path) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: lists.to_owned(),
            source,
        };
        for entry in fs::read_dir(lists).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let used = self
                .manifest
                .files
                .iter()
                .map(|file| &file.copy)
                .chain(self.manifest.urls.iter().map(|url| &url.copy))
                .any(|copy| copy.as_bytes() == name.as_bytes());
            if !used {
                fs::remove_file(entry.path()).map_err(|source| StoreError::Io {
                    path: entry.path(),
                    source,
                })?;
            }
        }
        Ok(())
    }
}

fn load(dir: &Path) -> Result<Manifest, StoreError> {
    let path = dir.join(MANIFEST);
    let text = match read_text(&path, listfile::MAX_FILE_BYTES) {
        Ok(text) => text,
        Err(ConfigError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(Manifest::default());
        }
        Err(error) => return Err(StoreError::Read(error)),
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|source| StoreError::Corrupt {
        path: path.clone(),
        source,
    })?;
    if manifest.format != FORMAT {
        return Err(StoreError::Format {
            path,
            found: manifest.format,
        });
    }
    Ok(manifest)
}

/// Creates `dir` (and missing parents) 0700, and makes it 0700 if it was not.
fn create_dir(dir: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mode = fs::metadata(dir).map_err(io)?.permissions().mode() & 0o7777;
    if mode != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or the new one: a
/// temporary file (0600), fsync, rename, fsync of the directory.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let temporary = dir.join(format!(".{name}.tmp"));
    let io = |source| StoreError::Io {
        path: path.clone(),
        source,
    };
    // A temporary file a crash left may have another mode: start afresh.
    match fs::remove_file(&temporary) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(io(error)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&temporary)
        .map_err(io)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    drop(file);
    fs::rename(&temporary, &path).map_err(io)?;
    fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io)
}

/// FNV-1a, 64 bits: a stable hash (std's is not promised to be) for names of copies and
/// digests of entries.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What a list file's entries amount to: their count and a hash of lines and texts.
fn digest(entries: &[(String, Location)]) -> String {
    let hash = entries
        .iter()
        .fold(0xcbf2_9ce4_8422_2325_u64, |hash, (text, at)| {
            let line = (at.line as u64).to_le_bytes();
            line.iter()
                .chain(text.as_bytes())
                .chain(&[0xff])
                .fold(hash, |hash, &byte| {
                    (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
                })
        });
    format!("{}:{hash:016x}", entries.len())
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Instant};

    use super::*;

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("sg-store-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            Self(dir)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fetched(nets: &[&str], lines: &[(&str, usize)]) -> Fetched {
        let list = Path::new("/etc/smtpguard/provider.txt");
        Fetched {
            files: BTreeMap::from([(
                list.to_owned(),
                lines
                    .iter()
                    .map(|(text, line)| {
                        (
                            (*text).to_owned(),
                            Location {
                                file: list.into(),
                                line: *line,
                            },
                        )
                    })
                    .collect(),
            )]),
            stale_files: BTreeMap::new(),
            urls: BTreeMap::new(),
            names: BTreeMap::from([(
                Name::Spf("provider.test".into()),
                Resolution {
                    nets: nets.iter().map(|net| net.parse().unwrap()).collect(),
                    resolved_at: UNIX_EPOCH + Duration::from_secs(1_800_000_000),
                    refresh_at: Instant::now(),
                    stale: None,
                    held: None,
                    failures: 0,
                },
            )]),
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn saves_what_changed_and_reads_it_back() {
        let scratch = Scratch::new("save");
        let dir = scratch.0.join("instance");
        let (mut store, problem) = Store::open(&dir);
        assert!(problem.is_none(), "{problem:?}");
        assert_eq!(mode(&dir), 0o700);

        let first = fetched(
            &["192.0.2.0/24"],
            &[("192.0.2.0/24", 2), ("198.51.100.7", 5)],
        );
        assert!(store.save(&first).unwrap(), "first save writes");
        assert!(
            !store.save(&first).unwrap(),
            "nothing changed: nothing written"
        );
        assert_eq!(mode(&dir.join(MANIFEST)), 0o600);
        assert_eq!(mode(&dir.join(LISTS)), 0o700);
        let copies: Vec<PathBuf> = fs::read_dir(dir.join(LISTS))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(copies.len(), 1, "{copies:?}");
        assert_eq!(mode(&copies[0]), 0o600);

        // A new process reads the same answers, with the original file and lines.
        let (reopened, problem) = Store::read_only(&dir);
        assert!(problem.is_none(), "{problem:?}");
        let name = reopened.name(&Name::Spf("provider.test".into())).unwrap();
        assert_eq!(name.nets, first.names.values().next().unwrap().nets);
        assert_eq!(
            name.resolved_at,
            UNIX_EPOCH + Duration::from_secs(1_800_000_000)
        );
        assert!(reopened.name(&Name::Host("provider.test".into())).is_none());
        let list = Path::new("/etc/smtpguard/provider.txt");
        assert_eq!(
            reopened.file(list).unwrap().unwrap(),
            first.files[list],
            "entries at their original lines"
        );
        assert!(reopened.file(Path::new("/elsewhere")).unwrap().is_none());

        // A changed list is written again; a list no longer named loses its copy.
        let second = fetched(&["192.0.2.0/24"], &[("192.0.2.0/25", 2)]);
        assert!(store.save(&second).unwrap());
        assert_eq!(
            Store::read_only(&dir).0.file(list).unwrap().unwrap(),
            second.files[list]
        );
        let mut third = second.clone();
        third.files.clear();
        assert!(store.save(&third).unwrap());
        assert_eq!(fs::read_dir(dir.join(LISTS)).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_store_is_empty_and_a_corrupt_one_says_so() {
        let scratch = Scratch::new("corrupt");
        let (store, problem) = Store::read_only(&scratch.0);
        assert!(problem.is_none(), "{problem:?}");
        assert!(store.name(&Name::Host("a.test".into())).is_none());
        assert!(!scratch.0.exists(), "read_only creates nothing");

        fs::create_dir_all(&scratch.0).unwrap();
        fs::write(scratch.0.join(MANIFEST), "{ not json").unwrap();
        let (store, problem) = Store::open(&scratch.0);
        let message = problem.expect("a corrupt store is reported").to_string();
        assert!(message.contains("store.json: unreadable"), "{message}");
        assert!(store.name(&Name::Host("a.test".into())).is_none());

        fs::write(
            scratch.0.join(MANIFEST),
            "{\"format\": 9, \"names\": [], \"files\": []}",
        )
        .unwrap();
        let message = Store::open(&scratch.0).1.unwrap().to_string();
        assert!(message.contains("format 9"), "{message}");
    }
}
