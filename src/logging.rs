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

/// rumqttd 0.20 logs routine events at ERROR: a client's EOF or CONNECT timeout (our readiness
/// probe too), a dropped connection, a router message for a client that just left. On a gateway
/// battery devices come and go all day, so these call sites are shown only when rumqttd's level
/// is debug. They are matched by source line, which is why Cargo.toml pins rumqttd to `=0.20.0`:
/// re-check this list when upgrading. Errors that matter (TLS handshake failures, accept errors,
/// a refused link) are not in it.
const ROUTINE_RUMQTTD_ERRORS: &[(&str, u32)] = &[
    ("server/broker.rs", 512), // Error while handling MQTT connect packet (EOF, timeout)
    ("server/broker.rs", 577), // connection-stop
    ("server/broker.rs", 581), // router-drop
    ("server/broker.rs", 592), // disconnected
    ("router/routing.rs", 416), // no-connection id … is already gone
    ("router/routing.rs", 436),
    ("router/routing.rs", 539),
];

fn is_routine_rumqttd_noise(meta: &tracing::Metadata<'_>) -> bool {
    *meta.level() == Level::ERROR
        && meta.target().starts_with("rumqttd")
        && meta.file().zip(meta.line()).is_some_and(|(file, line)| {
            ROUTINE_RUMQTTD_ERRORS
                .iter()
                .any(|(f, l)| *l == line && file.ends_with(f))
        })
}

type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// The running filter, replaceable at SIGHUP.
static FILTER: std::sync::OnceLock<FilterHandle> = std::sync::OnceLock::new();

/// `level` as filter directives: rumqttd stays at WARN unless named.
fn directives(level: &str) -> String {
    if level.contains("rumqttd") {
        level.to_string()
    } else {
        format!("{level},rumqttd=warn")
    }
}

/// Replaces the log filter of the running process (SIGHUP). `RUST_LOG`, when set, still wins.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and overrides log.level".into());
    }
    let filter = EnvFilter::try_new(directives(level)).map_err(|e| e.to_string())?;
    match FILTER.get() {
        Some(h) => h.reload(filter).map_err(|e| e.to_string()),
        None => Err("logging is not initialised".into()),
    }
}

/// Installs the global subscriber. `level` is a tracing filter such as `info` or
/// `info,edgegate::forward=debug`; `RUST_LOG` overrides it when set.
pub fn init(level: &str, format: LogFormat) {
    let wanted = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    // rumqttd logs every connection at INFO; on a gateway with hundreds of devices that drowns
    // everything else. Keep it at WARN unless the level names rumqttd explicitly.
    let directives = directives(&wanted);
    let filter =
        EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,rumqttd=warn"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let _ = FILTER.set(handle);
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
                    .with(filter)
                    .with(layer.with_filter(quiet))
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
    // The level filter is global, not per layer: then a disabled callsite (rumqttd instruments
    // its hot paths with INFO spans) costs nothing at all instead of a check per span.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(quiet))
        .try_init();
}
