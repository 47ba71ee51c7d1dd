//! The `smtpguard` command: parse the command line, set up logging, dispatch.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use smtpguard::{
    check,
    config::Config,
    daemon,
    instance::Instance,
    maps::{open_counters, read_counters},
    policy::Policy,
    stats::Stats,
};

const DEFAULT_CONFIG: &str = "/etc/smtpguard/smtpguard.toml";

/// Lock inbound SMTP down to your filtering provider and trusted hosts, at XDP.
///
/// smtpguard attaches an XDP program to the mail server's interfaces. Every new inbound TCP
/// connection (a SYN) to a guarded port is decided by its source address: the longest
/// matching prefix of the allow and deny lists decides; unlisted sources are dropped.
/// Established connections, outbound mail, other ports and other protocols pass untouched.
#[derive(Parser)]
#[command(version, propagate_version = true)]
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
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("smtpguard: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let instance = Instance::new(&cli.instance)?;
    match cli.command {
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
            let (policy, warnings) = Policy::build(&config)?;
            for warning in warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", check::render(&config, &policy));
            Ok(())
        }
        Command::Stats { json } => {
            let state = instance.read_state()?;
            let (global, prefix_hits) =
                open_counters(&instance.pin_dir(), state.counter_map_ids)
                    .with_context(|| format!("instance {:?}", instance.name()))?;
            let counters = read_counters(&global, &prefix_hits)?;
            let stats = Stats::new(instance.name(), &state, &counters);
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                print!("{}", stats.to_text());
            }
            Ok(())
        }
    }
}
