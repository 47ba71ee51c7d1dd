//! The fleet's commands: `publish` and `fleet status` (part of the binary: arguments, output,
//! exit status).

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use smtpguard::{
    fleet::{
        self, Connection, Keys,
        publish::{self as publishing, Current, Diff, Limits},
        snapshot,
    },
    instance::Instance,
    service::daemon::FleetState,
    source::config::Config,
};

/// How the command reaches the cluster (the daemon's `[fleet]` keys, as options).
#[derive(Args, Clone, Debug)]
pub struct EtcdArgs {
    /// The etcd members: URL[,URL...], e.g. http://10.0.0.5:2379,http://10.0.0.6:2379.
    #[arg(
        long,
        value_name = "URL[,URL...]",
        value_delimiter = ',',
        required = true
    )]
    etcd: Vec<String>,
    /// The group of gateways.
    #[arg(long, value_name = "NAME")]
    group: String,
    /// PEM CA certificate of the members (HTTPS).
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// PEM client certificate, with --key-file.
    #[arg(long, value_name = "FILE", requires = "key_file")]
    cert_file: Option<PathBuf>,
    #[arg(long, value_name = "FILE", requires = "cert_file")]
    key_file: Option<PathBuf>,
    /// etcd user, with --password-file.
    #[arg(long, value_name = "NAME", requires = "password_file")]
    user: Option<String>,
    #[arg(long, value_name = "FILE", requires = "user")]
    password_file: Option<PathBuf>,
}

impl EtcdArgs {
    fn connection(&self) -> Connection {
        Connection {
            endpoints: self.etcd.clone(),
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            user: self.user.clone(),
            password_file: self.password_file.clone(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct PublishArgs {
    /// The central configuration: the group's rules (`interfaces` may be left out).
    #[arg(long, short)]
    config: PathBuf,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Compile and show the difference; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Publish even if more of the allow list goes than --max-allow-removal allows.
    #[arg(long)]
    force: bool,
    /// The largest share of the group's allow prefixes one publish may remove (0 to 1).
    #[arg(long, value_name = "SHARE", default_value_t = 0.5)]
    max_allow_removal: f64,
    /// The largest request the cluster takes (etcd's --max-request-bytes).
    #[arg(long, value_name = "BYTES", default_value_t = 1_572_864)]
    max_request_bytes: usize,
    /// Wait this long between reading the group and writing it: reproduces a race with
    /// another publisher (tests).
    #[arg(long, value_name = "MS", default_value_t = 0, hide = true)]
    pause_before_write_ms: u64,
}

#[derive(Subcommand)]
pub enum FleetCommand {
    /// The group's published revision and, per host, what it applied and when. Hosts behind
    /// the published revision, refusing it, or silent (report expired) are flagged. Exit
    /// status 0 when every host is in step, 2 when not, 1 on error.
    Status {
        #[command(flatten)]
        etcd: EtcdArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `smtpguard publish`.
pub fn publish(args: &PublishArgs, instance: &Instance) -> anyhow::Result<ExitCode> {
    fleet::check_group(&args.etcd.group)?;
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.max_allow_removal),
        "--max-allow-removal: a share from 0 to 1"
    );
    let started = std::time::Instant::now();
    let config = Config::load_central(&args.config)?;
    let policy = crate::build(&config, instance)?;
    let compiled = started.elapsed();
    let publisher = format!(
        "{}@{}",
        std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "root".to_owned()),
        fleet::system_host_name()
    );
    let encoded = snapshot::encode(
        &policy,
        &publisher,
        &args.config.display().to_string(),
        fleet::unix_now(),
    )?;
    let connection = args.etcd.connection();
    let endpoints = connection.endpoints.join(",");
    let keys = Keys::new(&args.etcd.group);
    let limits = Limits {
        max_allow_removal: args.max_allow_removal,
        force: args.force,
        max_request_bytes: args.max_request_bytes,
    };
    runtime()?.block_on(async {
        let mut client = fleet::connect(&connection).await?;
        let (published, _) = fleet::read_published(&mut client, &keys, &endpoints).await?;
        let current = Current::from_published(published, &args.etcd.group);
        let group = &args.etcd.group;
        match (&current.manifest, &current.unreadable) {
            (Some(manifest), _) => println!(
                "group {group:?}: revision {} (sha256 {}), {} allow and {} deny prefixes",
                current.revision,
                manifest.short_hash(),
                manifest.allow,
                manifest.deny
            ),
            (None, Some(problem)) => println!(
                "group {group:?}: revision {} does not validate ({problem}); showing the difference to nothing",
                current.revision
            ),
            (None, None) => println!("group {group:?}: nothing published yet"),
        }
        println!(
            "compiled {}: {} allow and {} deny prefixes in {} scopes (sha256 {}), {} bytes compressed, in {:.0} ms",
            args.config.display(),
            encoded.manifest.allow,
            encoded.manifest.deny,
            encoded.manifest.scopes,
            encoded.manifest.short_hash(),
            encoded.compressed.len(),
            compiled.as_secs_f64() * 1e3
        );
        let diff = Diff::between(current.policy.as_ref(), &policy);
        let same = current
            .manifest
            .as_ref()
            .is_some_and(|manifest| manifest.hash == encoded.manifest.hash);
        if same || (current.policy.is_some() && diff.is_empty()) {
            println!("no change: revision {} already holds this policy; nothing written", current.revision);
            return Ok(ExitCode::SUCCESS);
        }
        print!("{}", diff.to_text(10));
        publishing::check_removal(&diff, &limits, group)?;
        if args.dry_run {
            println!("dry run: nothing written");
            return Ok(ExitCode::SUCCESS);
        }
        if args.pause_before_write_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(args.pause_before_write_ms)).await;
        }
        let written = std::time::Instant::now();
        let revision = publishing::write(
            &mut client,
            &keys,
            &endpoints,
            &encoded,
            current.revision,
            &limits,
        )
        .await?;
        println!(
            "published group {group:?} revision {revision} (sha256 {}) in one transaction in {:.0} ms",
            encoded.manifest.short_hash(),
            written.elapsed().as_secs_f64() * 1e3
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `smtpguard fleet ...`.
pub fn dispatch(command: FleetCommand) -> anyhow::Result<ExitCode> {
    match command {
        FleetCommand::Status { etcd, json } => {
            fleet::check_group(&etcd.group)?;
            let connection = etcd.connection();
            let endpoints = connection.endpoints.join(",");
            let keys = Keys::new(&etcd.group);
            let now = fleet::unix_now();
            let status = runtime()?.block_on(async {
                let mut client = fleet::connect(&connection).await?;
                fleet::status::read(&mut client, &keys, &endpoints, now).await
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.to_text(now));
            }
            Ok(if status.in_step {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}

/// The fleet lines of `stats`.
pub fn state_text(state: &FleetState) -> String {
    let mut text = format!(
        "fleet: group {:?} as host {:?} through {}: {}; revision {} (sha256 {}) in force",
        state.group,
        state.host,
        state.endpoints.join(","),
        if state.connected {
            "connected"
        } else {
            "DISCONNECTED (enforcing the last applied policy, retrying)"
        },
        state.revision,
        snapshot::short_hash(&state.hash)
    );
    if state.applied_at_unix > 0 {
        text.push_str(&format!(
            ", applied {} s ago",
            fleet::unix_now().saturating_sub(state.applied_at_unix)
        ));
    }
    text.push('\n');
    if let Some(refused) = &state.refused {
        text.push_str(&format!("fleet: refused {refused}\n"));
    }
    text
}
