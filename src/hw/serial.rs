//! Serial ports as `AsyncRead + AsyncWrite`, opened from their settings: a device path through
//! tokio-serial (termios; PTYs work the same, which is how the tests drive it), or `sim`, an
//! in-memory device that plays configured lines (and answers polls) so `config/dev.yaml` shows a
//! live sensor without hardware.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;

use super::HwError;
use crate::config::{FlowControl, Parity, SerialPortConfig, SerialSimConfig};

/// An open port.
pub trait SerialPort: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> SerialPort for T {}

/// Opens the port `cfg` describes. Must run inside the tokio runtime (the port registers with it).
pub fn open(cfg: &SerialPortConfig, delimiter: &[u8]) -> Result<Box<dyn SerialPort>, HwError> {
    if let Some(sim) = &cfg.sim {
        return Ok(Box::new(open_sim(sim, delimiter)));
    }
    let path = cfg
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let e = |reason: String| HwError::Serial {
        path: path.clone(),
        reason,
    };
    let data_bits = match cfg.data_bits {
        5 => tokio_serial::DataBits::Five,
        6 => tokio_serial::DataBits::Six,
        7 => tokio_serial::DataBits::Seven,
        _ => tokio_serial::DataBits::Eight,
    };
    let stop_bits = match cfg.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let parity = match cfg.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let flow = match cfg.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    let port = tokio_serial::new(path.clone(), cfg.baud)
        .data_bits(data_bits)
        .stop_bits(stop_bits)
        .parity(parity)
        .flow_control(flow)
        .open_native_async()
        .map_err(|err| e(err.to_string()))?;
    Ok(Box::new(port))
}

/// The simulated device: one end of an in-memory pipe; a task on the other end writes the next
/// line every `interval`, and immediately after each request it receives. It ends when the
/// adapter drops its end.
fn open_sim(sim: &SerialSimConfig, delimiter: &[u8]) -> tokio::io::DuplexStream {
    let (ours, mut device) = tokio::io::duplex(16 * 1024);
    let lines: Vec<Vec<u8>> = sim
        .lines
        .iter()
        .map(|l| {
            let mut b = l.as_bytes().to_vec();
            b.extend_from_slice(delimiter);
            b
        })
        .collect();
    let interval = sim.interval.get().max(Duration::from_millis(1));
    tokio::spawn(async move {
        if lines.is_empty() {
            return;
        }
        let mut next = 0usize;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut req = [0u8; 256];
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                n = device.read(&mut req) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
            }
            if device.write_all(&lines[next % lines.len()]).await.is_err() {
                return;
            }
            next = next.wrapping_add(1);
        }
    });
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_simulated_device_plays_its_lines_in_a_loop() {
        let sim = SerialSimConfig {
            lines: vec!["a".into(), "b".into()],
            interval: crate::config::HumanDuration::from_secs(1),
        };
        let mut port = open_sim(&sim, b"\n");
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        while got.len() < 6 {
            let n = port.read(&mut buf).await.expect("sim read");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(&got[..6], b"a\nb\na\n");
    }

    #[tokio::test]
    async fn a_missing_device_is_an_error_naming_the_path() {
        let cfg: SerialPortConfig =
            serde_yaml::from_str("name: x\npath: /dev/does-not-exist-edgegate").expect("parses");
        let err = open(&cfg, b"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/dev/does-not-exist-edgegate"), "{err}");
    }
}
