//! The `smtpguard` command: parse the command line, set up logging, dispatch.

use std::{path::PathBuf, process::ExitCode};

mod fleet_cli;
use fleet_cli as fleet;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use smtpguard::{
    command::{
        canary::{self, CanaryReport},
        check, explain,
        report::Report,
        stats::Stats,
        top,
    },
    instance::Instance,
    kernel::maps::{generation_in_force, open_counters},
    policy::Policy,
    service::{
        control::{self, Request},
        daemon,
    },
    source::{
        config::Config,
        dns::Dns,
        fetch::{self as sources, Fetched, Previous},
        store::Store,
        url::Web,
    },
};

const DEFAULT_CONFIG: &str = "/etc/smtpguard/smtpguard.toml";

/// Lock inbound SMTP down to your filtering provider and trusted hosts, at XDP.
///
/// smtpguard attaches an XDP program to the mail server's interfaces. Every new inbound TCP
/// connection (a SYN) to a guarded port is decided by its source address: the longest
/// matching prefix of the allow and deny lists decides; unlisted sources are dropped (or
/// rejected with a TCP reset). Established connections, outbound mail, other ports and other
/// protocols pass untouched. In audit mode nothing is blocked and `report` lists who would be.
#[derive(Parser)]
#[command(
    version,
    propagate_version = true,
    after_long_help = "\
LOCK-DOWN WORKFLOW:
  1. mode = \"audit\": smtpguard run; every SYN enforce would stop is counted per source.
  2. smtpguard report: who would be blocked. Allow the legitimate ones; explain ADDR checks.
  3. mode = \"enforce\", then reload (SIGHUP, systemctl reload smtpguard).

SIGNALS:
  SIGHUP   re-read the configuration, its list files and DNS names; apply atomically, or
           keep the running policy and log why not.
  SIGTERM, SIGINT
           exit. With on_exit = \"keep\" (the default) the filter stays in force, pinned in
           bpffs; the next start takes it over without a gap. `smtpguard detach` removes it.

FILES:
  /etc/smtpguard/smtpguard.toml   configuration (see README: interfaces, ports, mode, action,
                                  xdp_mode, on_exit, [metrics], [dns], [safety], [[allow]],
                                  [[deny]])
  /sys/fs/bpf/smtpguard/NAME/     pinned maps and links of instance NAME
  /run/smtpguard/NAME/state.json  what the running (or last) daemon applied
  /var/lib/smtpguard/NAME/        last good DNS answers and list files of instance NAME, used
                                  when they cannot be had at start or reload

EXIT STATUS:
  0 on success; 1 with a message naming the file, line and value on any error."
)]
struct Cli {
    /// Name of the instance: its pins live in /sys/fs/bpf/smtpguard/NAME and its state in
    /// /run/smtpguard/NAME. Run one instance per set of interfaces.
    #[arg(
        long,
        global = true,
        env = "SMTPGUARD_INSTANCE",
        default_value = "default"
    )]
    instance: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the filter, apply the configuration and enforce it until SIGTERM or SIGINT.
    /// SIGHUP re-reads the configuration and applies it atomically; a configuration that
    /// does not validate is logged and the running policy stays.
    Run {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration and print the normalised policy; exits non-zero on error.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the counters of the running instance: guarded SYNs by class and per prefix.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also list the N sources stopped most often (see `report`).
        #[arg(long, value_name = "N", default_value_t = 0)]
        top: usize,
    },
    /// List the sources the running instance stopped (in audit mode: would have stopped),
    /// most frequent first, with first and last sighting and the rule that decides them.
    /// Read it in audit mode before switching to enforce.
    Report {
        /// Show the N most frequent sources; 0 shows all the table holds.
        #[arg(long, value_name = "N", default_value_t = 20)]
        top: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// List the sources whose verdict the canary's candidate policy would change
        /// (`smtpguard try`) instead, with the rule on each side.
        #[arg(long)]
        canary: bool,
    },
    /// Try a candidate configuration on live traffic before it decides anything (a canary):
    /// every SYN is also decided by the candidate, and the sources whose verdict would
    /// change (newly blocked, newly allowed) are recorded; no verdict changes. Read them
    /// with `report --canary`; `--commit` makes the candidate the configuration (the old
    /// file is kept as NAME.prev) and applies it atomically; `--abort` ends the canary.
    Try {
        /// The candidate configuration file.
        #[arg(long, short, required_unless_present_any = ["commit", "abort"], conflicts_with_all = ["commit", "abort"])]
        config: Option<PathBuf>,
        /// End the canary by itself after this long (30m, 2h, 1d).
        #[arg(long = "for", value_name = "DURATION", value_parser = canary_duration, requires = "config")]
        duration: Option<std::time::Duration>,
        /// Make the candidate the configuration and apply it.
        #[arg(long, conflicts_with = "abort")]
        commit: bool,
        /// End the canary; the running policy stays.
        #[arg(long)]
        abort: bool,
    },
    /// A live view of the running instance, refreshed like top(1): guarded SYNs per second
    /// by class, the busiest rules and the busiest stopped sources. `q` quits. Prints one
    /// view (over one interval) when standard output is not a terminal.
    Top {
        /// Seconds between refreshes.
        #[arg(long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Rows of rules and of sources shown.
        #[arg(long, value_name = "N", default_value_t = 10)]
        top: usize,
    },
    /// Remove a filter left in place by a daemon that exited with on_exit = "keep" (or was
    /// killed): detach the program from every interface, remove the pinned links and maps and
    /// the state file. Port 25 is open afterwards. Refused while a daemon runs the instance.
    Detach,
    /// Compile a central configuration once (list files, host names, SPF records and URLs
    /// resolved to prefixes) and publish it to a group of gateways through etcd: prints the
    /// difference to what the group has, then writes it in one transaction that fails if
    /// anyone else published since it read. Each daemon with `[fleet] group = NAME` applies it.
    Publish(fleet::PublishArgs),
    /// The fleet: what a group has published and what each of its hosts applied.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Print the manual page (roff) generated from this help, for packaging.
    #[command(hide = true)]
    Manpage,
    /// Explain the decision for a SYN from ADDR: guarded port, matching prefix and where it
    /// came from, mode and action, verdict. Uses the configuration file (with its list files
    /// and DNS names), not the running instance.
    Explain {
        /// Source address of the connection.
        addr: std::net::IpAddr,
        /// Destination port.
        #[arg(long, short, default_value_t = 25)]
        port: u16,
        /// Destination address: picks the `[[scope]]` that decides (default: the top level's
        /// rules).
        #[arg(long, value_name = "DEST")]
        to: Option<std::net::IpAddr>,
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

/// A `--for` duration: humantime's notation (30m, 2h, 1d), at most the daemon's limit.
fn canary_duration(text: &str) -> Result<std::time::Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    let most = daemon::MAX_CANARY_SECS;
    if duration.as_secs() > most {
        return Err(format!("at most {} days", most / 86400));
    }
    Ok(duration)
}

/// The error and its causes on one line, leaving out a cause whose text the layer above
/// already shows (most messages here name their cause).
fn explain_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for layer in error.chain() {
        let layer = layer.to_string();
        if !text.contains(&layer) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&layer);
        }
    }
    text
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("smtpguard: {}", explain_chain(&error));
            ExitCode::FAILURE
        }
    }
}

/// Reads the list files, fetches the URL lists and resolves the names `config` refers to, as a starting daemon of
/// `instance` would: with its last-good store to fall back on (read, never written) and
/// growth beyond `max_growth` held back. Builds the policy from them; prints the warnings.
fn build(config: &Config, instance: &Instance) -> anyhow::Result<Policy> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (store, problem) = Store::read_only(&instance.state_dir());
    if let Some(problem) = problem {
        eprintln!("warning: {problem}; going without it");
    }
    let previous = Previous {
        fetched: &Fetched::default(),
        store: Some(&store),
        hold_growth: true,
    };
    let (fetched, notes) = runtime.block_on(async {
        let dns = Dns::new(&config.dns)?;
        let web = Web::new(&config.urls)?;
        anyhow::Ok(sources::fetch(config, &dns, &web, &previous).await?)
    })?;
    let (policy, warnings) = Policy::build(config, &fetched)?;
    for warning in notes.warnings.iter().chain(&warnings) {
        eprintln!("warning: {warning}");
    }
    Ok(policy)
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let instance = Instance::new(&cli.instance)?;
    match cli.command {
        Command::Publish(args) => return fleet::publish(&args, &instance),
        Command::Fleet(command) => return fleet::dispatch(command),
        command => dispatch_local(command, &instance)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn dispatch_local(command: Command, instance: &Instance) -> anyhow::Result<()> {
    let instance = instance.clone();
    match command {
        Command::Publish(_) | Command::Fleet(_) => unreachable!("dispatched above"),
        Command::Run { config } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(&config, &instance, std::future::pending()))?;
            Ok(())
        }
        Command::Check { config } => {
            let config = Config::load(&config)?;
            let policy = build(&config, &instance)?;
            print!("{}", check::render(&config, &policy));
            Ok(())
        }
        Command::Stats { json, top } => {
            let state = instance.read_state()?;
            let maps = open_counters(&instance.maps_dir_of(&state), state.counter_map_ids)
                .with_context(|| format!("instance {:?}", instance.name()))?;
            let counters = maps.read()?;
            let canary = instance.read_canary().ok().flatten();
            let stats = Stats::new(instance.name(), &state, &counters)
                .with_canary(canary.as_ref(), &counters)
                .with_generation_in_force(generation_in_force(&instance.maps_dir_of(&state)));
            let report = (top > 0)
                .then(|| {
                    anyhow::Ok(Report::new(
                        instance.name(),
                        &state,
                        &maps.offenders()?,
                        top,
                    ))
                })
                .transpose()?;
            let fleet_state = daemon::read_fleet_state(&instance.run_dir());
            if json {
                let mut value = serde_json::to_value(&stats)?;
                if let Some(report) = report {
                    value["top"] = serde_json::to_value(&report.rows)?;
                }
                if let Some(fleet_state) = &fleet_state {
                    value["fleet"] = serde_json::to_value(fleet_state)?;
                }
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                print!("{}", stats.to_text());
                if let Some(fleet_state) = &fleet_state {
                    print!("{}", fleet::state_text(fleet_state));
                }
                if let Some(report) = report {
                    print!("\n{}", report.to_text());
                }
            }
            Ok(())
        }
        Command::Report {
            top,
            json,
            canary: true,
        } => {
            let state = instance.read_state()?;
            let canary = instance.read_canary()?.with_context(|| {
                format!(
                    "instance {:?}: no canary since the daemon started; `smtpguard try --config FILE` starts one",
                    instance.name()
                )
            })?;
            let dir = instance.maps_dir_of(&state);
            let counters = open_counters(&dir, state.counter_map_ids)
                .with_context(|| format!("instance {:?}", instance.name()))?;
            let sightings = smtpguard::kernel::maps::read_canary(
                &smtpguard::kernel::maps::open_canary(&dir)
                    .with_context(|| format!("instance {:?}", instance.name()))?,
            )?;
            let report = CanaryReport::new(
                instance.name(),
                &state,
                &canary,
                &counters.read()?,
                &sightings,
                top,
            );
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Try {
            config,
            duration,
            commit,
            abort,
        } => {
            let socket = instance.control_path();
            let call = |request: &Request| {
                control::call(&socket, request, std::time::Duration::from_secs(300))
            };
            let response = match (config, commit, abort) {
                (Some(config), _, _) => {
                    // Read here: the daemon's sandbox may not see the admin's directories.
                    let text = smtpguard::source::config::read_text(
                        &config,
                        smtpguard::source::config::MAX_CONFIG_BYTES,
                    )?;
                    call(&Request::Try {
                        config: std::path::absolute(&config)
                            .with_context(|| format!("{}", config.display()))?,
                        text,
                        for_secs: duration.map(|duration| duration.as_secs().max(1)),
                    })?
                }
                (None, true, _) => {
                    // The file is replaced here, by the admin's root shell, not by the
                    // sandboxed daemon; the daemon then applies it as on SIGHUP.
                    let state = instance.read_state()?;
                    let canary = instance
                        .read_canary()?
                        .filter(|canary| canary.ended.is_none());
                    if canary.is_none() {
                        anyhow::bail!(
                            "instance {:?}: no canary runs: `smtpguard try --config FILE` starts one",
                            instance.name()
                        );
                    }
                    let candidate = instance.candidate_path();
                    let text = std::fs::read_to_string(&candidate)
                        .with_context(|| format!("{}", candidate.display()))?;
                    let installed = canary::install_candidate(&state.config, &text)
                        .with_context(|| format!("replacing {}", state.config.display()))?;
                    let response = call(&Request::Commit)?;
                    if !response.ok {
                        installed.restore().with_context(|| {
                            format!(
                                "putting {} back from {} after the refusal: {}",
                                installed.target.display(),
                                installed.previous.display(),
                                response.message
                            )
                        })?;
                        anyhow::bail!(
                            "{}; {} is back as it was",
                            response.message,
                            installed.target.display()
                        );
                    }
                    println!(
                        "{} now holds the candidate; the previous configuration is {}",
                        installed.target.display(),
                        installed.previous.display()
                    );
                    response
                }
                _ => call(&Request::Abort)?,
            };
            if !response.ok {
                anyhow::bail!("{}", response.message);
            }
            println!("{}", response.message);
            Ok(())
        }
        Command::Report {
            top,
            json,
            canary: false,
        } => {
            let state = instance.read_state()?;
            let maps = open_counters(&instance.maps_dir_of(&state), state.counter_map_ids)
                .with_context(|| format!("instance {:?}", instance.name()))?;
            let report = Report::new(instance.name(), &state, &maps.offenders()?, top);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            Ok(())
        }
        Command::Top { interval, top } => {
            let interval = std::time::Duration::try_from_secs_f64(interval)
                .ok()
                .filter(|interval| *interval >= std::time::Duration::from_millis(100))
                .context("--interval: a number of seconds, at least 0.1")?;
            top::run(&instance, interval, top)
                .with_context(|| format!("instance {:?}", instance.name()))?;
            Ok(())
        }
        Command::Manpage => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).section("8");
            page.render(&mut std::io::stdout().lock())
                .context("writing the manual page")?;
            Ok(())
        }
        Command::Detach => {
            let detached = instance.detach()?;
            if detached.is_empty() {
                println!(
                    "instance {:?}: no pinned links; pins and state removed",
                    instance.name()
                );
            } else {
                println!(
                    "instance {:?}: detached from {}; pins and state removed",
                    instance.name(),
                    detached.join(", ")
                );
            }
            Ok(())
        }
        Command::Explain {
            addr,
            port,
            to,
            config,
        } => {
            let config = Config::load(&config)?;
            let policy = build(&config, &instance)?;
            print!("{}", explain::explain(&policy, addr, to, port));
            Ok(())
        }
    }
}
