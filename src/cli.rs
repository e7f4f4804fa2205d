//! Command line: `run`, `check-config`, `buffer stats|export`, `version`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError, EXIT_CONFIG};
use crate::store::ReadOnlyStore;

pub const DEFAULT_CONFIG: &str = "/etc/edgegate/edgegate.yaml";
/// EX_SOFTWARE: an internal error, or the gateway could not start.
pub const EXIT_SOFTWARE: u8 = 70;

#[derive(Debug, Parser)]
#[command(
    name = "edgegate",
    version,
    about = "IoT edge gateway: local MQTT broker, hardware adapters and a store-and-forward bridge"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground (what the systemd unit does).
    Run {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a configuration file: prints "configuration OK" or every problem (exit 78).
    CheckConfig {
        /// The file to check (or use --config).
        file: Option<PathBuf>,
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Inspect the store-and-forward buffer (works while the gateway runs).
    Buffer {
        #[command(subcommand)]
        command: BufferCommand,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum BufferCommand {
    /// Rows, bytes, oldest message and drops per reason.
    Stats {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Every queued message as one JSON object per line, oldest first.
    Export {
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// At most this many rows.
        #[arg(long)]
        limit: Option<u64>,
    },
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_CONFIG as u8)
}

pub fn check_config(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(_) => {
            println!("configuration OK: {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

pub fn run_gateway(path: &Path) -> ExitCode {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            // Logging is not set up yet: the config names its level. Plain stderr it is.
            return config_error(&e);
        }
    };
    crate::logging::init(&cfg.log.level, cfg.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("edgegate")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgegate: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    let result = runtime.block_on(crate::app::run(cfg));
    // rumqttd's router thread cannot be stopped; do not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "edgegate stopped with an error");
            eprintln!("edgegate: {e}");
            ExitCode::from(EXIT_SOFTWARE)
        }
    }
}

pub fn buffer(cmd: BufferCommand) -> ExitCode {
    let (config_path, action) = match &cmd {
        BufferCommand::Stats { config, .. } | BufferCommand::Export { config, .. } => {
            (config, &cmd)
        }
    };
    let cfg = match config::load(config_path) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let store = match ReadOnlyStore::open(&cfg.store.path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "edgegate: cannot open the store {}: {e}",
                cfg.store.path.display()
            );
            return ExitCode::from(EXIT_SOFTWARE);
        }
    };
    match action {
        BufferCommand::Stats { json, .. } => match store.stats() {
            Ok(st) => {
                let now = crate::sources::local::now_ms();
                let oldest_age_s = st
                    .oldest_created_ms
                    .map(|c| (now - c).max(0) as f64 / 1000.0);
                if *json {
                    let per_priority: Vec<_> = st
                        .per_priority
                        .iter()
                        .map(|p| serde_json::json!({"priority": p.priority, "rows": p.rows, "bytes": p.bytes}))
                        .collect();
                    let dropped: serde_json::Map<String, serde_json::Value> = st
                        .dropped
                        .iter()
                        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
                        .collect();
                    let v = serde_json::json!({
                        "path": cfg.store.path,
                        "rows": st.rows,
                        "bytes": st.bytes,
                        "oldest_age_seconds": oldest_age_s,
                        "per_priority": per_priority,
                        "file_bytes": st.file_bytes,
                        "free_disk_bytes": st.free_disk_bytes,
                        "max_bytes": cfg.store.max_bytes.get(),
                        "dropped": dropped,
                    });
                    println!("{v}");
                } else {
                    println!("store      {}", cfg.store.path.display());
                    println!(
                        "queued     {} rows, {} (budget {})",
                        crate::app::group_thousands(st.rows),
                        config::ByteSize(st.bytes),
                        cfg.store.max_bytes
                    );
                    match oldest_age_s {
                        Some(a) => println!(
                            "oldest     {}",
                            crate::forward::human_age(std::time::Duration::from_secs_f64(a))
                        ),
                        None => println!("oldest     -"),
                    }
                    for p in &st.per_priority {
                        println!(
                            "priority {:>3}: {} rows, {}",
                            p.priority,
                            crate::app::group_thousands(p.rows),
                            config::ByteSize(p.bytes)
                        );
                    }
                    println!("file       {}", config::ByteSize(st.file_bytes));
                    if let Some(f) = st.free_disk_bytes {
                        println!("free disk  {}", config::ByteSize(f));
                    }
                    println!("(drop counters are kept by the running gateway; see its log)");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edgegate: {e}");
                ExitCode::from(EXIT_SOFTWARE)
            }
        },
        BufferCommand::Export { limit, .. } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match store.export(&mut out, *limit) {
                Ok(n) => {
                    eprintln!("exported {n} rows");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edgegate: {e}");
                    ExitCode::from(EXIT_SOFTWARE)
                }
            }
        }
    }
}

pub fn main_with(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run { config } => run_gateway(&config),
        Command::CheckConfig { file, config } => {
            let path = file
                .or(config)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
            check_config(&path)
        }
        Command::Buffer { command } => buffer(command),
        Command::Version => {
            println!("edgegate {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
