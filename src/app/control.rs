//! What tells a running gateway to stop or reload. The daemon maps signals to it ([`signals`]);
//! anything else holding a sender can do the same.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::AppError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop in order; the text names why in the journal ("SIGTERM").
    Stop(&'static str),
    /// Re-read the configuration file.
    Reload,
}

/// SIGTERM and SIGINT → [`Control::Stop`], SIGHUP → [`Control::Reload`]. Installed at once, so
/// call it before anything slow: a SIGTERM during start-up is then not the default "die at once".
pub fn signals() -> Result<mpsc::Receiver<Control>, AppError> {
    let start = |e: std::io::Error| AppError::Start(format!("cannot install signal handlers: {e}"));
    let mut sigterm = signal(SignalKind::terminate()).map_err(start)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(start)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(start)?;
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = sigterm.recv() => Control::Stop("SIGTERM"),
                _ = sigint.recv() => Control::Stop("SIGINT"),
                _ = sighup.recv() => Control::Reload,
            };
            if tx.send(c).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
