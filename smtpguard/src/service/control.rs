//! The daemon's control socket: requests only the running daemon can carry out (a canary's
//! start, commit and end), one JSON line each way over a Unix socket in the instance's run
//! directory, reachable by root alone.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _},
    net::UnixListener,
    sync::{mpsc, oneshot},
};

/// What a client asks of the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Start a canary: decide every SYN by the candidate configuration too, and record the
    /// sources whose verdict would change. `for_secs` ends it by itself. The client reads
    /// the file (the daemon's sandbox may not see the admin's directories): `config` names
    /// it in messages, `text` is what is compared.
    Try {
        config: PathBuf,
        text: String,
        for_secs: Option<u64>,
    },
    /// Apply the configuration file, which the client has just replaced with the candidate,
    /// and end the canary; if it is refused, the canary goes on.
    Commit,
    /// End the canary; the running policy stays as it is.
    Abort,
}

/// The daemon's answer: whether it did what was asked, and what to tell the admin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
}

/// A request on its way to the daemon's loop, with where its answer goes.
pub struct Call {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}", path = path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "no daemon answers on {path} ({source}); is `smtpguard run` running for this instance?",
        path = path.display()
    )]
    NoDaemon {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("control socket {path}: the daemon's answer is not understood: {source}", path = path.display())]
    BadAnswer {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Longest request line accepted: a configuration file at its limit, escaped as JSON.
const MAX_REQUEST: u64 = 2 * crate::source::config::MAX_CONFIG_BYTES + 64 * 1024;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Listens on `path` (replacing a socket left by a daemon of this instance that is gone:
/// the caller holds the instance lock) and hands each request to the returned channel.
pub fn listen(path: &Path) -> Result<mpsc::Receiver<Call>, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(io(error)),
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of descriptors, say: try again later rather than spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut line = String::new();
                let mut reader =
                    tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
                let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
                let response = match read.unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within 30 s",
                    ))
                }) {
                    Ok(_) => match serde_json::from_str::<Request>(&line) {
                        Ok(request) => {
                            let (reply, answer) = oneshot::channel();
                            if sender.send(Call { request, reply }).await.is_err() {
                                return;
                            }
                            match answer.await {
                                Ok(response) => response,
                                Err(_) => return,
                            }
                        }
                        Err(error) => Response {
                            ok: false,
                            message: format!("request not understood: {error}"),
                        },
                    },
                    Err(error) => Response {
                        ok: false,
                        message: format!("reading the request: {error}"),
                    },
                };
                if let Ok(mut text) = serde_json::to_string(&response) {
                    text.push('\n');
                    let _ = write.write_all(text.as_bytes()).await;
                }
            });
        }
    });
    Ok(receiver)
}

/// Sends `request` to the daemon listening on `path` and waits up to `timeout` for its answer.
pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|source| ControlError::NoDaemon {
            path: path.to_owned(),
            source,
        })?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_string(request).map_err(|source| ControlError::BadAnswer {
        path: path.to_owned(),
        source,
    })?;
    text.push('\n');
    stream.write_all(text.as_bytes()).map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(io)?;
    serde_json::from_str(&line).map_err(|source| ControlError::BadAnswer {
        path: path.to_owned(),
        source,
    })
}
