//! Modbus transports: an RTU line opened through tokio-serial (8 data bits, the configured
//! parity and stop bits), and `sim`, an in-process RTU slave on an in-memory pipe that serves
//! the configured points' `sim_value`s (so `config/dev.yaml` shows a meter without hardware,
//! through the same RTU framing and timing code as a real line). Modbus TCP needs nothing more
//! than `tokio::net::TcpStream`.

use std::collections::HashMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::SerialPortBuilderExt;

use super::serial::SerialPort;
use super::HwError;
use crate::codec::modbus::{self as mb, Exception, Request, Response, Table, ValueType};
use crate::config::modbus::{ModbusBusConfig, ModbusPointConfig, SimValue};
use crate::config::Parity;

/// Opens the bus's serial line, or starts its simulated slave. Must run inside the runtime.
pub fn open_rtu(cfg: &ModbusBusConfig) -> Result<Box<dyn SerialPort>, HwError> {
    if cfg.sim.is_some() {
        return Ok(Box::new(open_sim(cfg)));
    }
    let path = cfg
        .path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let parity = match cfg.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Odd => tokio_serial::Parity::Odd,
        Parity::Even => tokio_serial::Parity::Even,
    };
    let stop_bits = match cfg.stop_bits {
        2 => tokio_serial::StopBits::Two,
        _ => tokio_serial::StopBits::One,
    };
    let port = tokio_serial::new(path.clone(), cfg.baud)
        .data_bits(tokio_serial::DataBits::Eight)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(tokio_serial::FlowControl::None)
        .open_native_async()
        .map_err(|e| HwError::Serial {
            path,
            reason: e.to_string(),
        })?;
    Ok(Box::new(port))
}

/// One simulated point: where it lives, how it is encoded, and its value.
struct SimPoint {
    table: Table,
    address: u16,
    ty: ValueType,
    order: mb::Order,
    scale: f64,
    offset: f64,
    count: u16,
    value: SimValue,
    /// Writable, or written by a command: keeps its value instead of wandering.
    written: bool,
}

/// The data of one simulated slave.
#[derive(Default)]
struct SimSlave {
    regs: HashMap<(Table, u16), u16>,
    bits: HashMap<(Table, u16), bool>,
    points: Vec<SimPoint>,
}

impl SimSlave {
    fn store(&mut self, p: &SimPoint, jitter: f64) {
        match (&p.value, p.ty) {
            (SimValue::Bool(b), _) if p.table.is_bits() => {
                self.bits.insert((p.table, p.address), *b);
            }
            (SimValue::Bool(b), _) => {
                self.regs.insert((p.table, p.address), u16::from(*b));
            }
            (SimValue::Text(t), _) => {
                let mut bytes = t.as_bytes().to_vec();
                bytes.resize(usize::from(p.count) * 2, 0);
                for (i, c) in bytes.chunks(2).enumerate() {
                    let w = u16::from_be_bytes([c[0], c[1]]);
                    let w = if matches!(p.order, mb::Order::Badc | mb::Order::Dcba) {
                        w.swap_bytes()
                    } else {
                        w
                    };
                    self.regs.insert((p.table, p.address + i as u16), w);
                }
            }
            (SimValue::Number(n), ty) => {
                let wander = if p.written || jitter == 0.0 {
                    0.0
                } else {
                    (fastrand::f64() * 2.0 - 1.0) * jitter * n.abs()
                };
                let v = n + wander;
                let regs = mb::encode(v, ty, p.order, p.scale, p.offset, None, None)
                    .or_else(|_| mb::encode(*n, ty, p.order, p.scale, p.offset, None, None))
                    .unwrap_or_else(|_| vec![0; usize::from(ty.registers(1))]);
                for (i, r) in regs.into_iter().enumerate() {
                    self.regs.insert((p.table, p.address + i as u16), r);
                }
            }
        }
    }

    fn refresh(&mut self, jitter: f64) {
        let points = std::mem::take(&mut self.points);
        for p in &points {
            self.store(p, jitter);
        }
        self.points = points;
    }

    fn serve(&mut self, req: &Request, jitter: f64) -> Result<Response, Exception> {
        let missing = Exception::IllegalDataAddress;
        match req {
            Request::Read {
                table,
                address,
                count,
            } => {
                self.refresh(jitter);
                let addrs = (0..*count).map(|i| address.wrapping_add(i));
                if table.is_bits() {
                    addrs
                        .map(|a| self.bits.get(&(*table, a)).copied().ok_or(missing))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Response::Bits)
                } else {
                    addrs
                        .map(|a| self.regs.get(&(*table, a)).copied().ok_or(missing))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Response::Registers)
                }
            }
            Request::WriteCoil { address, on } => {
                self.write_bits(*address, &[*on])?;
                Ok(Response::Written)
            }
            Request::WriteCoils { address, values } => {
                self.write_bits(*address, values)?;
                Ok(Response::Written)
            }
            Request::WriteRegister { address, value } => {
                self.write_regs(*address, &[*value])?;
                Ok(Response::Written)
            }
            Request::WriteRegisters { address, values } => {
                self.write_regs(*address, values)?;
                Ok(Response::Written)
            }
        }
    }

    fn write_bits(&mut self, address: u16, values: &[bool]) -> Result<(), Exception> {
        let t = Table::Coil;
        for (i, v) in values.iter().enumerate() {
            let a = address.wrapping_add(i as u16);
            if !self.bits.contains_key(&(t, a)) {
                return Err(Exception::IllegalDataAddress);
            }
            self.bits.insert((t, a), *v);
            for p in self
                .points
                .iter_mut()
                .filter(|p| p.table == t && p.address == a)
            {
                p.value = SimValue::Bool(*v);
                p.written = true;
            }
        }
        Ok(())
    }

    fn write_regs(&mut self, address: u16, values: &[u16]) -> Result<(), Exception> {
        let t = Table::HoldingRegister;
        let end = u32::from(address) + values.len() as u32;
        if (0..values.len()).any(|i| !self.regs.contains_key(&(t, address.wrapping_add(i as u16))))
        {
            return Err(Exception::IllegalDataAddress);
        }
        for (i, v) in values.iter().enumerate() {
            self.regs.insert((t, address.wrapping_add(i as u16)), *v);
        }
        // A point that was written keeps the new registers' value (decoded back).
        for p in self.points.iter_mut().filter(|p| {
            p.table == t
                && u32::from(p.address) < end
                && u32::from(address) < u32::from(p.address) + u32::from(p.count)
        }) {
            let regs: Vec<u16> = (0..p.count)
                .map(|i| self.regs.get(&(t, p.address + i)).copied().unwrap_or(0))
                .collect();
            if let Ok(raw) = mb::decode(&regs, p.ty, p.order) {
                p.value = match mb::scale(raw, p.scale, p.offset) {
                    Ok(mb::Value::Bool(b)) => SimValue::Bool(b),
                    Ok(mb::Value::Unsigned(u)) => SimValue::Number(u as f64),
                    Ok(mb::Value::Signed(i)) => SimValue::Number(i as f64),
                    Ok(mb::Value::Float(f)) => SimValue::Number(f),
                    Ok(mb::Value::Text(s)) => SimValue::Text(s),
                    Err(_) => continue,
                };
                p.written = true;
            }
        }
        Ok(())
    }
}

fn sim_point(p: &ModbusPointConfig, order: mb::Order) -> Option<SimPoint> {
    let ty = p.value_type();
    let value = p.sim_value.clone().unwrap_or(match ty {
        ValueType::Bool => SimValue::Bool(false),
        ValueType::String => SimValue::Text(String::new()),
        _ => SimValue::Number(0.0),
    });
    Some(SimPoint {
        table: p.function.table(),
        address: p.address,
        ty,
        order,
        scale: p.scale,
        offset: p.offset,
        count: p.span_count(),
        value,
        // A set point holds its value (no jitter) until a command changes it.
        written: p.writable,
    })
}

/// The simulated line: every configured slave answers its unit id (others are silent, as on a
/// real line); a read of an address no point covers answers exception 2.
fn open_sim(cfg: &ModbusBusConfig) -> tokio::io::DuplexStream {
    let (ours, mut line) = tokio::io::duplex(4096);
    let sim = cfg.sim.clone().unwrap_or_default();
    let delay = sim
        .delay
        .map(|d| d.get())
        .unwrap_or(Duration::from_millis(5));
    let mut slaves: HashMap<u8, SimSlave> = HashMap::new();
    for s in &cfg.slaves {
        let mut slave = SimSlave::default();
        for p in &s.points {
            if let Some(sp) = sim_point(p, p.order_or(s)) {
                slave.store(&sp, 0.0);
                slave.points.push(sp);
            }
        }
        slaves.insert(s.unit, slave);
    }
    tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            let n = match line.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            // Requests arrive whole (one write each); anything unframeable is dropped.
            while let Some(len) = mb::rtu_request_len(&buf) {
                if buf.len() < len {
                    break;
                }
                let frame: Vec<u8> = buf.drain(..len).collect();
                let Ok((unit, pdu)) = mb::rtu_split(&frame) else {
                    continue;
                };
                let req = match Request::parse(pdu) {
                    Ok(r) => r,
                    Err(e) => {
                        if let Some(_s) = slaves.get(&unit) {
                            let reply = vec![
                                pdu.first().copied().unwrap_or(0) | 0x80,
                                e.exception().code(),
                            ];
                            tokio::time::sleep(delay).await;
                            if line.write_all(&mb::rtu_frame(unit, &reply)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                };
                if unit == 0 {
                    for s in slaves.values_mut() {
                        let _ = s.serve(&req, sim.jitter);
                    }
                    continue;
                }
                let Some(slave) = slaves.get_mut(&unit) else {
                    continue;
                };
                let result = slave.serve(&req, sim.jitter);
                let reply = mb::reply_pdu(&req, result.as_ref().map_err(|e| *e));
                tokio::time::sleep(delay).await;
                if line.write_all(&mb::rtu_frame(unit, &reply)).await.is_err() {
                    return;
                }
            }
            if buf.len() >= 2 && mb::rtu_request_len(&buf).is_none() {
                buf.clear();
            }
        }
    });
    ours
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn bus(yaml: &str) -> ModbusBusConfig {
        let cfg: Config = serde_yaml::from_str(&format!(
            "gateway: {{id: t}}\nmodbus:\n  buses:\n    - name: sim\n      sim: {{jitter: 0}}\n      slaves:\n{yaml}"
        ))
        .expect("test config");
        cfg.modbus.buses[0].clone()
    }

    async fn ask(port: &mut tokio::io::DuplexStream, unit: u8, req: &Request) -> Vec<u8> {
        port.write_all(&mb::rtu_request(unit, req))
            .await
            .expect("write");
        let mut d = mb::RtuDecoder::new(unit, req);
        let mut b = [0u8; 300];
        loop {
            let n = port.read(&mut b).await.expect("read");
            if d.push(&b[..n]).is_some() {
                return b[..n].to_vec();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_simulated_slave_serves_its_points_and_keeps_what_is_written() {
        let cfg = bus("        - name: meter\n          unit: 3\n          points:\n            - {name: v, function: input_register, address: 0, type: f32, sim_value: 230.5}\n            - {name: sp, function: holding_register, address: 10, type: i16, scale: 0.1, sim_value: 21.5}\n            - {name: relay, function: coil, address: 0, sim_value: true}\n");
        let mut port = open_sim(&cfg);
        let read = Request::Read {
            table: Table::InputRegister,
            address: 0,
            count: 2,
        };
        let frame = ask(&mut port, 3, &read).await;
        let (_, pdu) = mb::rtu_split(&frame).expect("crc");
        let Ok(Response::Registers(r)) = mb::parse_response(&read, pdu) else {
            panic!("{pdu:?}")
        };
        assert_eq!(
            mb::decode(&r, ValueType::F32, mb::Order::Abcd),
            Ok(mb::Raw::Float(230.5))
        );
        let w = Request::WriteRegister {
            address: 10,
            value: 250,
        };
        let frame = ask(&mut port, 3, &w).await;
        assert_eq!(
            mb::parse_response(&w, mb::rtu_split(&frame).expect("crc").1),
            Ok(Response::Written)
        );
        let back = Request::Read {
            table: Table::HoldingRegister,
            address: 10,
            count: 1,
        };
        let frame = ask(&mut port, 3, &back).await;
        assert_eq!(
            mb::parse_response(&back, mb::rtu_split(&frame).expect("crc").1),
            Ok(Response::Registers(vec![250]))
        );
        let missing = Request::Read {
            table: Table::HoldingRegister,
            address: 99,
            count: 1,
        };
        let frame = ask(&mut port, 3, &missing).await;
        assert_eq!(
            mb::parse_response(&missing, mb::rtu_split(&frame).expect("crc").1),
            Err(mb::FrameError::Exception(Exception::IllegalDataAddress))
        );
    }
}
