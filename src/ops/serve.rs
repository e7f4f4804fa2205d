//! The two ways to ask the running daemon: the status socket (`edgegate status`) and the
//! Prometheus endpoint. Both serve a fresh [`Snapshot`]; both bound every connection in time and
//! count, since anyone who can reach them may be slow or hostile.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::snapshot::{Snapshot, Telemetry};

/// At most this many status or metrics requests are answered at once; more are closed.
const MAX_CLIENTS: usize = 8;
/// A client must send its request within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create the status socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Metrics { addr: SocketAddr, source: io::Error },
}

/// Binds the status socket (replacing a stale one) with mode 0660.
pub fn bind_status(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Socket {
        path: path.to_path_buf(),
        source,
    };
    // A socket file left by a killed daemon refuses connections; ours replaces it. One that
    // answers belongs to another running gateway (with other ports), and stays its own.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another running edgegate answers on it; give this one its own status.socket",
        )));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    Ok(listener)
}

/// Answers `edgegate status` until cancelled: any line in, one JSON snapshot out.
pub async fn serve_status(
    listener: UnixListener,
    path: PathBuf,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "status socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // dropped: too many at once
        };
        let t = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = answer_status(stream, &t).await;
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer_status(mut stream: UnixStream, t: &Telemetry) -> io::Result<()> {
    let mut buf = [0u8; 64];
    // The request is one short line; its content is not needed yet (room for commands later).
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.read(&mut buf)).await;
    let snap = t.snapshot().await;
    let mut json = serde_json::to_vec(&snap).map_err(io::Error::other)?;
    json.push(b'\n');
    tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(&json))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.shutdown().await
}

/// Binds the metrics address (so a taken port fails the start with a clear error).
pub async fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Metrics { addr, source })
}

/// Serves `GET /metrics` (Prometheus text format) until cancelled. Anything else is 404 or 405.
pub async fn serve_metrics(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let mut stream = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let t = telemetry.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
                Ok(Ok(h)) => h,
                _ => return,
            };
            let response = match request_line(&head) {
                Some(("GET", path)) if path == "/metrics" || path.starts_with("/metrics?") => {
                    let body = t.snapshot().await.render_prometheus();
                    http_response("200 OK", "text/plain; version=0.0.4; charset=utf-8", &body)
                }
                Some(("GET", "/")) => http_response(
                    "200 OK",
                    "text/plain; charset=utf-8",
                    "edgegate: metrics at /metrics\n",
                ),
                Some(("GET", _)) => http_response("404 Not Found", "text/plain", "not found\n"),
                Some(_) => http_response("405 Method Not Allowed", "text/plain", "GET only\n"),
                None => http_response("400 Bad Request", "text/plain", "bad request\n"),
            };
            let _ =
                tokio::time::timeout(REQUEST_TIMEOUT, stream.write_all(response.as_bytes())).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// Reads up to the end of the request head (blank line), at most 8 KiB.
async fn read_head(stream: &mut tokio::net::TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            break;
        }
    }
    Ok(head)
}

fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(head).ok()?;
    let first = text.lines().next()?;
    let mut parts = first.split(' ');
    let method = parts.next()?;
    let path = parts.next()?;
    parts.next()?.starts_with("HTTP/").then_some((method, path))
}

fn http_response(status: &str, content_type: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// What `edgegate status` reports when it cannot get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("edgegate is not running (no status socket at {0})")]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: run as root or as a member of the edgegate group")]
    Permission(PathBuf),
    #[error("asking the daemon at {path} failed: {reason}")]
    Failed { path: PathBuf, reason: String },
}

/// Asks the daemon behind `path` for a snapshot.
pub async fn ask(path: &Path) -> Result<Snapshot, AskError> {
    let failed = |reason: String| AskError::Failed {
        path: path.to_path_buf(),
        reason,
    };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) => {
            return Err(match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    AskError::NotRunning(path.to_path_buf())
                }
                io::ErrorKind::PermissionDenied => AskError::Permission(path.to_path_buf()),
                _ => failed(e.to_string()),
            })
        }
    };
    let mut body = Vec::new();
    let exchange = async {
        stream.write_all(b"status\n").await?;
        stream.read_to_end(&mut body).await
    };
    match tokio::time::timeout(Duration::from_secs(10), exchange).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => return Err(failed("no answer within 10 s".into())),
    }
    serde_json::from_slice(&body).map_err(|e| failed(format!("unreadable answer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_line_needs_a_method_a_path_and_an_http_version() {
        assert_eq!(
            request_line(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_line(b"GET /metrics\r\n\r\n"), None);
        assert_eq!(request_line(b"\xff\xfe"), None);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_a_live_one_is_left_to_its_owner() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("status.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        let live = bind_status(&path).expect("a stale socket file is replaced");
        let err = bind_status(&path).expect_err("a live socket is not taken over");
        assert!(
            err.to_string().contains("another running edgegate"),
            "{err}"
        );
        drop(live);
    }

    #[tokio::test]
    async fn asking_a_socket_nobody_listens_on_says_the_daemon_is_not_running() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("status.sock");
        assert!(matches!(ask(&path).await, Err(AskError::NotRunning(_))));
        // A stale socket file (daemon killed) is also "not running".
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(matches!(ask(&path).await, Err(AskError::NotRunning(_))));
    }
}
