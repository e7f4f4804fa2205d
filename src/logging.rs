//! Logging: journald with structured fields when started by systemd, readable stderr otherwise.
//!
//! rumqttd logs every ordinary client disconnect (and our own readiness probe) at ERROR; those
//! call sites are filtered out here unless the level for `rumqttd` is debug or lower.

use tracing::Level;
use tracing_subscriber::filter::{EnvFilter, FilterFn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::LogFormat;

/// rumqttd 0.20's `server/broker.rs` reports a client's EOF, a connect timeout or a dropped
/// connection as ERROR. These are routine on a gateway (battery devices come and go), so they are
/// shown only when rumqttd's level is debug.
fn is_routine_rumqttd_noise(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == Level::ERROR
        && meta.target().starts_with("rumqttd::server")
        && meta
            .file()
            .is_some_and(|f| f.ends_with("server/broker.rs") || f.ends_with("link/remote.rs"))
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `info,edgegate::forward=debug`; `RUST_LOG` overrides it when set.
pub fn init(level: &str, format: LogFormat) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    // rumqttd logs every connection at INFO; on a gateway with hundreds of devices that drowns
    // everything else. Keep it at WARN unless the level names rumqttd explicitly.
    let directives = if wanted.contains("rumqttd") {
        wanted
    } else {
        format!("{wanted},rumqttd=warn")
    };
    let filter =
        EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    let verbose_rumqttd =
        directives.contains("rumqttd=debug") || directives.contains("rumqttd=trace");
    let quiet = FilterFn::new(move |meta| verbose_rumqttd || !is_routine_rumqttd_noise(meta));

    let use_journald = match format {
        LogFormat::Journald => true,
        LogFormat::Stderr => false,
        // systemd sets JOURNAL_STREAM when stderr is connected to the journal.
        LogFormat::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    if use_journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier("edgegate".to_string());
                let _ = tracing_subscriber::registry()
                    .with(layer.with_filter(quiet).with_filter(filter))
                    .try_init();
                return;
            }
            Err(e) => eprintln!("edgegate: journald unavailable ({e}); logging to stderr"),
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(quiet).with_filter(filter))
        .try_init();
}
