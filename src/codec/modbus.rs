//! Modbus without I/O: the application protocol (request and response PDUs, exceptions), its two
//! transports (RTU: unit id + PDU + CRC-16; TCP: the MBAP header), request planning, register
//! values, and RTU line timing. `sources::modbus` owns the ports and the clock; everything that
//! can be decided from bytes and numbers is decided here, so it is unit-tested and fuzzed.
//!
//! References: *MODBUS Application Protocol Specification V1.1b3* (functions, exceptions,
//! limits) and *MODBUS over Serial Line Specification and Implementation Guide V1.02* (RTU
//! framing, CRC, t1.5/t3.5 and the fixed values above 19200 baud).
//!
//! - [`crc16`]: CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF, low byte first).
//! - [`Request`]: functions 1, 2, 3, 4 (reads), 5, 6, 15, 16 (writes): PDU encode and parse.
//! - [`parse_response`]: a response PDU checked against its request (function, byte count,
//!   echo) → [`Response`] or a [`FrameError`] with a stable [`FrameError::reason`].
//! - [`rtu_request`] / [`RtuDecoder`]: the RTU ADU; the decoder knows the response's length from
//!   the request (reads: from the byte count; writes: 8 bytes; exceptions: 5 bytes) and rejects a
//!   wrong unit id, function, byte count or CRC as soon as the bytes show it.
//! - [`tcp_request`] / [`Mbap`]: the MBAP header (transaction id, protocol 0, length, unit id).
//! - [`plan`]: points → one read per block of nearby addresses (`max_gap`, `max_count`, and the
//!   specification's 125 registers / 2000 bits per read).
//! - [`decode`] / [`encode`]: registers ↔ values for every [`ValueType`] in every [`Order`],
//!   with `scale`/`offset` and range checks for writes.
//! - [`RtuTiming`] / [`Silence`]: the character time at a baud rate (11 bits per character), t1.5,
//!   t3.5, and the silence a master keeps before each request.

use std::ops::Add;
use std::time::Duration;

/// Most registers one read (function 3 or 4) may ask for.
pub const MAX_READ_REGISTERS: u16 = 125;
/// Most coils or discrete inputs one read (function 1 or 2) may ask for.
pub const MAX_READ_BITS: u16 = 2000;
/// Most registers one write multiple (function 16) may carry.
pub const MAX_WRITE_REGISTERS: u16 = 123;
/// Most coils one write multiple (function 15) may carry.
pub const MAX_WRITE_COILS: u16 = 1968;
/// Largest RTU ADU: unit id + 253-byte PDU + CRC.
pub const MAX_RTU_ADU: usize = 256;
/// Largest PDU (both transports).
pub const MAX_PDU: usize = 253;

/// CRC-16/MODBUS of `data`. In a frame it is sent low byte first.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// The four data tables of the Modbus data model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Coil,
    DiscreteInput,
    HoldingRegister,
    InputRegister,
}

impl Table {
    /// The read function: 1, 2, 3 or 4.
    pub fn read_function(self) -> u8 {
        match self {
            Table::Coil => 1,
            Table::DiscreteInput => 2,
            Table::HoldingRegister => 3,
            Table::InputRegister => 4,
        }
    }
    /// Single-bit tables (coils and discrete inputs).
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }
    /// Whether a master may write it (coils and holding registers).
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coil | Table::HoldingRegister)
    }
    /// Most items one read may ask for.
    pub fn max_read(self) -> u16 {
        if self.is_bits() {
            MAX_READ_BITS
        } else {
            MAX_READ_REGISTERS
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::HoldingRegister => "holding_register",
            Table::InputRegister => "input_register",
        }
    }
}

/// One request of a master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Functions 1–4: `count` bits or registers from `address`.
    Read {
        table: Table,
        address: u16,
        count: u16,
    },
    /// Function 5.
    WriteCoil { address: u16, on: bool },
    /// Function 6.
    WriteRegister { address: u16, value: u16 },
    /// Function 15.
    WriteCoils { address: u16, values: Vec<bool> },
    /// Function 16.
    WriteRegisters { address: u16, values: Vec<u16> },
}

/// Why bytes are not a valid request (a slave's view: the simulator and the fuzzer use it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("empty PDU")]
    Empty,
    #[error("function {0} is not supported")]
    Function(u8),
    #[error("the PDU has the wrong length for its function")]
    Length,
    #[error("quantity {0} is out of the specification's range")]
    Quantity(u16),
    #[error("coil value {0:#06x} is neither 0xFF00 nor 0x0000")]
    CoilValue(u16),
    #[error("the range runs past address 65535")]
    Range,
}

impl RequestError {
    /// The exception a slave answers with (illegal function, illegal data value).
    pub fn exception(&self) -> Exception {
        match self {
            RequestError::Function(_) => Exception::IllegalFunction,
            RequestError::Range => Exception::IllegalDataAddress,
            _ => Exception::IllegalDataValue,
        }
    }
}

fn be(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

impl Request {
    /// The function code.
    pub fn function(&self) -> u8 {
        match self {
            Request::Read { table, .. } => table.read_function(),
            Request::WriteCoil { .. } => 5,
            Request::WriteRegister { .. } => 6,
            Request::WriteCoils { .. } => 15,
            Request::WriteRegisters { .. } => 16,
        }
    }

    /// The PDU: function code and data.
    pub fn pdu(&self) -> Vec<u8> {
        let mut p = vec![self.function()];
        match self {
            Request::Read { address, count, .. } => {
                p.extend_from_slice(&address.to_be_bytes());
                p.extend_from_slice(&count.to_be_bytes());
            }
            Request::WriteCoil { address, on } => {
                p.extend_from_slice(&address.to_be_bytes());
                p.extend_from_slice(&(if *on { 0xFF00u16 } else { 0 }).to_be_bytes());
            }
            Request::WriteRegister { address, value } => {
                p.extend_from_slice(&address.to_be_bytes());
                p.extend_from_slice(&value.to_be_bytes());
            }
            Request::WriteCoils { address, values } => {
                p.extend_from_slice(&address.to_be_bytes());
                p.extend_from_slice(&(values.len() as u16).to_be_bytes());
                let bytes = pack_bits(values);
                p.push(bytes.len() as u8);
                p.extend_from_slice(&bytes);
            }
            Request::WriteRegisters { address, values } => {
                p.extend_from_slice(&address.to_be_bytes());
                p.extend_from_slice(&(values.len() as u16).to_be_bytes());
                p.push((values.len() * 2) as u8);
                for v in values {
                    p.extend_from_slice(&v.to_be_bytes());
                }
            }
        }
        p
    }

    /// Parses a request PDU (what a slave receives), checking the specification's quantity
    /// limits and that the range fits the 16-bit address space.
    pub fn parse(pdu: &[u8]) -> Result<Request, RequestError> {
        let (&f, _) = pdu.split_first().ok_or(RequestError::Empty)?;
        let fixed = |n: usize| {
            if pdu.len() == n {
                Ok(())
            } else {
                Err(RequestError::Length)
            }
        };
        let range = |address: u16, count: u16| {
            if u32::from(address) + u32::from(count) > 0x1_0000 {
                Err(RequestError::Range)
            } else {
                Ok(())
            }
        };
        match f {
            1..=4 => {
                fixed(5)?;
                let table = match f {
                    1 => Table::Coil,
                    2 => Table::DiscreteInput,
                    3 => Table::HoldingRegister,
                    _ => Table::InputRegister,
                };
                let (address, count) = (be(pdu, 1), be(pdu, 3));
                if count == 0 || count > table.max_read() {
                    return Err(RequestError::Quantity(count));
                }
                range(address, count)?;
                Ok(Request::Read {
                    table,
                    address,
                    count,
                })
            }
            5 => {
                fixed(5)?;
                let on = match be(pdu, 3) {
                    0xFF00 => true,
                    0x0000 => false,
                    v => return Err(RequestError::CoilValue(v)),
                };
                Ok(Request::WriteCoil {
                    address: be(pdu, 1),
                    on,
                })
            }
            6 => {
                fixed(5)?;
                Ok(Request::WriteRegister {
                    address: be(pdu, 1),
                    value: be(pdu, 3),
                })
            }
            15 | 16 => {
                if pdu.len() < 6 {
                    return Err(RequestError::Length);
                }
                let (address, qty, bc) = (be(pdu, 1), be(pdu, 3), usize::from(pdu[5]));
                let (max, want_bc) = if f == 15 {
                    (MAX_WRITE_COILS, usize::from(qty).div_ceil(8))
                } else {
                    (MAX_WRITE_REGISTERS, usize::from(qty) * 2)
                };
                if qty == 0 || qty > max {
                    return Err(RequestError::Quantity(qty));
                }
                if bc != want_bc || pdu.len() != 6 + bc {
                    return Err(RequestError::Length);
                }
                range(address, qty)?;
                let data = &pdu[6..];
                if f == 15 {
                    Ok(Request::WriteCoils {
                        address,
                        values: unpack_bits(data, usize::from(qty)),
                    })
                } else {
                    Ok(Request::WriteRegisters {
                        address,
                        values: data.chunks(2).map(|c| be(c, 0)).collect(),
                    })
                }
            }
            other => Err(RequestError::Function(other)),
        }
    }

    /// Length of the normal response PDU (function code included).
    pub fn response_pdu_len(&self) -> usize {
        match self {
            Request::Read { table, count, .. } => 2 + data_bytes(*table, *count),
            _ => 5,
        }
    }
}

/// Data bytes a read of `count` items of `table` returns.
fn data_bytes(table: Table, count: u16) -> usize {
    if table.is_bits() {
        usize::from(count).div_ceil(8)
    } else {
        usize::from(count) * 2
    }
}

/// Bits → bytes, the first bit in the least significant bit of the first byte.
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; bits.len().div_ceil(8)];
    for (i, b) in bits.iter().enumerate() {
        if *b {
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// The first `n` bits of `bytes`, least significant bit first.
pub fn unpack_bits(bytes: &[u8], n: usize) -> Vec<bool> {
    (0..n)
        .map(|i| bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1))
        .collect()
}

/// The exception codes of the application protocol specification (§7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exception {
    IllegalFunction,
    IllegalDataAddress,
    IllegalDataValue,
    ServerDeviceFailure,
    Acknowledge,
    ServerDeviceBusy,
    MemoryParityError,
    GatewayPathUnavailable,
    GatewayTargetFailedToRespond,
    Other(u8),
}

impl Exception {
    pub fn from_code(c: u8) -> Exception {
        match c {
            1 => Exception::IllegalFunction,
            2 => Exception::IllegalDataAddress,
            3 => Exception::IllegalDataValue,
            4 => Exception::ServerDeviceFailure,
            5 => Exception::Acknowledge,
            6 => Exception::ServerDeviceBusy,
            8 => Exception::MemoryParityError,
            0x0A => Exception::GatewayPathUnavailable,
            0x0B => Exception::GatewayTargetFailedToRespond,
            c => Exception::Other(c),
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Exception::IllegalFunction => 1,
            Exception::IllegalDataAddress => 2,
            Exception::IllegalDataValue => 3,
            Exception::ServerDeviceFailure => 4,
            Exception::Acknowledge => 5,
            Exception::ServerDeviceBusy => 6,
            Exception::MemoryParityError => 8,
            Exception::GatewayPathUnavailable => 0x0A,
            Exception::GatewayTargetFailedToRespond => 0x0B,
            Exception::Other(c) => c,
        }
    }
    /// A stable name for counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Exception::IllegalFunction => "illegal_function",
            Exception::IllegalDataAddress => "illegal_data_address",
            Exception::IllegalDataValue => "illegal_data_value",
            Exception::ServerDeviceFailure => "server_device_failure",
            Exception::Acknowledge => "acknowledge",
            Exception::ServerDeviceBusy => "server_device_busy",
            Exception::MemoryParityError => "memory_parity_error",
            Exception::GatewayPathUnavailable => "gateway_path_unavailable",
            Exception::GatewayTargetFailedToRespond => "gateway_target_failed_to_respond",
            Exception::Other(_) => "exception_other",
        }
    }
}

/// A checked normal response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Functions 1 and 2: exactly the bits asked for.
    Bits(Vec<bool>),
    /// Functions 3 and 4: exactly the registers asked for.
    Registers(Vec<u16>),
    /// Functions 5, 6, 15, 16: the echo matched the request.
    Written,
}

/// Why a response was not accepted. Each has a stable [`FrameError::reason`] for counters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("CRC {got:#06x} where the bytes give {want:#06x}")]
    Crc { got: u16, want: u16 },
    #[error("answer from unit {got}, asked unit {want}")]
    WrongUnit { got: u8, want: u8 },
    #[error("answer with function {got}, asked function {want}")]
    WrongFunction { got: u8, want: u8 },
    #[error("byte count {got} where the request needs {want}")]
    ByteCount { got: usize, want: usize },
    #[error("the PDU is {got} bytes where {want} were expected")]
    Length { got: usize, want: usize },
    #[error("the write's echo does not match the request")]
    Echo,
    #[error("exception {} ({})", .0.code(), .0.name())]
    Exception(Exception),
    #[error("MBAP protocol id {0} (Modbus is 0)")]
    Protocol(u16),
    #[error("MBAP length {0} is out of range (2 to 254)")]
    MbapLength(u16),
    #[error("transaction id {got} where {want} was sent")]
    Transaction { got: u16, want: u16 },
}

impl FrameError {
    /// Counter label: `crc`, `wrong_unit`, `wrong_function`, `byte_count`, `length`, `echo`,
    /// the exception's name, `protocol`, `mbap_length`, `transaction`.
    pub fn reason(&self) -> &'static str {
        match self {
            FrameError::Crc { .. } => "crc",
            FrameError::WrongUnit { .. } => "wrong_unit",
            FrameError::WrongFunction { .. } => "wrong_function",
            FrameError::ByteCount { .. } => "byte_count",
            FrameError::Length { .. } => "length",
            FrameError::Echo => "echo",
            FrameError::Exception(e) => e.name(),
            FrameError::Protocol(_) => "protocol",
            FrameError::MbapLength(_) => "mbap_length",
            FrameError::Transaction { .. } => "transaction",
        }
    }
}

/// Checks a response PDU against the request it answers.
pub fn parse_response(req: &Request, pdu: &[u8]) -> Result<Response, FrameError> {
    let f = req.function();
    let got_f = *pdu.first().ok_or(FrameError::Length { got: 0, want: 2 })?;
    if got_f == f | 0x80 {
        if pdu.len() != 2 {
            return Err(FrameError::Length {
                got: pdu.len(),
                want: 2,
            });
        }
        return Err(FrameError::Exception(Exception::from_code(pdu[1])));
    }
    if got_f != f {
        return Err(FrameError::WrongFunction {
            got: got_f,
            want: f,
        });
    }
    match req {
        Request::Read { table, count, .. } => {
            let want = data_bytes(*table, *count);
            let got = usize::from(*pdu.get(1).ok_or(FrameError::Length { got: 1, want: 2 })?);
            if got != want {
                return Err(FrameError::ByteCount { got, want });
            }
            if pdu.len() != 2 + want {
                return Err(FrameError::Length {
                    got: pdu.len(),
                    want: 2 + want,
                });
            }
            let data = &pdu[2..];
            Ok(if table.is_bits() {
                Response::Bits(unpack_bits(data, usize::from(*count)))
            } else {
                Response::Registers(data.chunks(2).map(|c| be(c, 0)).collect())
            })
        }
        _ => {
            if pdu.len() != 5 {
                return Err(FrameError::Length {
                    got: pdu.len(),
                    want: 5,
                });
            }
            // 5 and 6 echo address and value; 15 and 16 echo address and quantity.
            let want = &req.pdu()[..5];
            if pdu != want {
                return Err(FrameError::Echo);
            }
            Ok(Response::Written)
        }
    }
}

/// A slave's answer PDU to `req`: the data for a read, the echo for a write, or an exception.
/// (Used by the simulated slave; a gateway only reads responses.)
pub fn reply_pdu(req: &Request, result: Result<&Response, Exception>) -> Vec<u8> {
    let f = req.function();
    match result {
        Err(e) => vec![f | 0x80, e.code()],
        Ok(Response::Bits(bits)) => {
            let bytes = pack_bits(bits);
            let mut p = vec![f, bytes.len() as u8];
            p.extend_from_slice(&bytes);
            p
        }
        Ok(Response::Registers(regs)) => {
            let mut p = vec![f, (regs.len() * 2) as u8];
            for r in regs {
                p.extend_from_slice(&r.to_be_bytes());
            }
            p
        }
        Ok(Response::Written) => req.pdu()[..5].to_vec(),
    }
}

// ─── RTU ──────────────────────────────────────────────────────────────────────────────────────────

/// An RTU ADU: unit id, PDU, CRC (low byte first).
pub fn rtu_frame(unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(pdu.len() + 3);
    f.push(unit);
    f.extend_from_slice(pdu);
    let crc = crc16(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

/// The RTU ADU of a request.
pub fn rtu_request(unit: u8, req: &Request) -> Vec<u8> {
    rtu_frame(unit, &req.pdu())
}

/// Length of a request ADU from its first bytes (a slave's framing): `None` while unknown.
pub fn rtu_request_len(prefix: &[u8]) -> Option<usize> {
    match *prefix.get(1)? {
        1..=6 => Some(8),
        15 | 16 => prefix.get(6).map(|bc| 9 + usize::from(*bc)),
        // Unknown function: the frame's end is only known from the line's silence.
        _ => None,
    }
}

/// Checks a complete RTU frame's CRC and splits it into unit id and PDU.
pub fn rtu_split(frame: &[u8]) -> Result<(u8, &[u8]), FrameError> {
    if frame.len() < 4 {
        return Err(FrameError::Length {
            got: frame.len(),
            want: 4,
        });
    }
    let (body, crc) = frame.split_at(frame.len() - 2);
    let got = u16::from_le_bytes([crc[0], crc[1]]);
    let want = crc16(body);
    if got != want {
        return Err(FrameError::Crc { got, want });
    }
    Ok((body[0], &body[1..]))
}

/// Incremental decoder of the RTU response to one request.
///
/// Feed bytes as they arrive; it answers as soon as the bytes decide: `Some(Ok)` once a whole,
/// valid frame is in, `Some(Err)` as soon as the unit id, the function, the byte count or
/// finally the CRC is wrong. The expected length follows from the request: a read's byte count
/// is checked against the quantity asked for (so a corrupted count cannot make it wait for 255
/// bytes), writes answer 8 bytes, exceptions 5. Bytes after the frame are counted in
/// [`RtuDecoder::trailing`] (the line was not silent: the caller waits for silence and
/// discards them).
#[derive(Debug, Clone)]
pub struct RtuDecoder {
    unit: u8,
    req: Request,
    buf: Vec<u8>,
    done: bool,
    trailing: usize,
}

impl RtuDecoder {
    pub fn new(unit: u8, req: &Request) -> RtuDecoder {
        RtuDecoder {
            unit,
            req: req.clone(),
            buf: Vec::with_capacity(req.response_pdu_len() + 3),
            done: false,
            trailing: 0,
        }
    }

    /// Total frame length, once the bytes so far tell it.
    fn want(&self) -> Result<Option<usize>, FrameError> {
        let Some(&unit) = self.buf.first() else {
            return Ok(None);
        };
        if unit != self.unit {
            return Err(FrameError::WrongUnit {
                got: unit,
                want: self.unit,
            });
        }
        let Some(&f) = self.buf.get(1) else {
            return Ok(None);
        };
        let want_f = self.req.function();
        if f == want_f | 0x80 {
            return Ok(Some(5));
        }
        if f != want_f {
            return Err(FrameError::WrongFunction {
                got: f,
                want: want_f,
            });
        }
        match &self.req {
            Request::Read { table, count, .. } => {
                let Some(&bc) = self.buf.get(2) else {
                    return Ok(None);
                };
                let want = data_bytes(*table, *count);
                if usize::from(bc) != want {
                    return Err(FrameError::ByteCount {
                        got: usize::from(bc),
                        want,
                    });
                }
                Ok(Some(3 + want + 2))
            }
            _ => Ok(Some(8)),
        }
    }

    /// Adds bytes; `Some` once the answer is decided (later bytes only count as trailing).
    pub fn push(&mut self, bytes: &[u8]) -> Option<Result<Response, FrameError>> {
        if self.done {
            self.trailing += bytes.len();
            return None;
        }
        for (i, &b) in bytes.iter().enumerate() {
            self.buf.push(b);
            match self.want() {
                Err(e) => {
                    self.done = true;
                    self.trailing = bytes.len() - i - 1;
                    return Some(Err(e));
                }
                Ok(Some(n)) if self.buf.len() == n => {
                    self.done = true;
                    self.trailing = bytes.len() - i - 1;
                    return Some(
                        rtu_split(&self.buf).and_then(|(_, pdu)| parse_response(&self.req, pdu)),
                    );
                }
                Ok(_) => {}
            }
        }
        None
    }

    /// Bytes received so far for this frame.
    pub fn received(&self) -> usize {
        self.buf.len()
    }

    /// Bytes that arrived after the answer was decided.
    pub fn trailing(&self) -> usize {
        self.trailing
    }
}

// ─── TCP ──────────────────────────────────────────────────────────────────────────────────────────

/// The MBAP header of Modbus TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mbap {
    pub transaction: u16,
    pub protocol: u16,
    /// Bytes that follow the length field: the unit id and the PDU.
    pub length: u16,
    pub unit: u8,
}

/// Bytes of the MBAP header.
pub const MBAP_LEN: usize = 7;

impl Mbap {
    /// Parses and checks a header (protocol 0, length 2 to 254).
    pub fn parse(b: &[u8; MBAP_LEN]) -> Result<Mbap, FrameError> {
        let h = Mbap {
            transaction: be(b, 0),
            protocol: be(b, 2),
            length: be(b, 4),
            unit: b[6],
        };
        if h.protocol != 0 {
            return Err(FrameError::Protocol(h.protocol));
        }
        if !(2..=254).contains(&h.length) {
            return Err(FrameError::MbapLength(h.length));
        }
        Ok(h)
    }
    /// PDU bytes after the header.
    pub fn pdu_len(&self) -> usize {
        usize::from(self.length) - 1
    }
}

/// A Modbus TCP ADU: MBAP header and PDU.
pub fn tcp_frame(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(MBAP_LEN + pdu.len());
    f.extend_from_slice(&transaction.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&((pdu.len() + 1) as u16).to_be_bytes());
    f.push(unit);
    f.extend_from_slice(pdu);
    f
}

pub fn tcp_request(transaction: u16, unit: u8, req: &Request) -> Vec<u8> {
    tcp_frame(transaction, unit, &req.pdu())
}

/// Checks a TCP response (its header already parsed) against the request.
pub fn tcp_response(
    header: &Mbap,
    pdu: &[u8],
    transaction: u16,
    unit: u8,
    req: &Request,
) -> Result<Response, FrameError> {
    if header.transaction != transaction {
        return Err(FrameError::Transaction {
            got: header.transaction,
            want: transaction,
        });
    }
    if header.unit != unit {
        return Err(FrameError::WrongUnit {
            got: header.unit,
            want: unit,
        });
    }
    parse_response(req, pdu)
}

// ─── Planning ─────────────────────────────────────────────────────────────────────────────────────

/// What planning needs of a point: where it lives and how many bits or registers it spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub table: Table,
    pub address: u16,
    pub count: u16,
}

/// One read covering some points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub table: Table,
    pub address: u16,
    pub count: u16,
    /// Indexes into the planned spans, in address order.
    pub points: Vec<usize>,
}

impl Block {
    pub fn request(&self) -> Request {
        Request::Read {
            table: self.table,
            address: self.address,
            count: self.count,
        }
    }
    /// The slice of a block's data that belongs to `span` (same table, inside the block).
    pub fn offset_of(&self, span: &Span) -> usize {
        usize::from(span.address - self.address)
    }
}

/// Groups spans into reads: per table, in address order, a span joins the current block when
/// the gap to it is at most `max_gap` items and the block stays within `max_count` items (and
/// the specification's 125 registers / 2000 bits). Overlapping spans share a block. A span
/// longer than the limit gets a block of its own (validation refuses such spans first).
pub fn plan(spans: &[Span], max_gap: u16, max_count: u16) -> Vec<Block> {
    let mut order: Vec<usize> = (0..spans.len()).collect();
    order.sort_by_key(|&i| (spans[i].table, spans[i].address, spans[i].count));
    let mut blocks: Vec<Block> = Vec::new();
    for i in order {
        let s = spans[i];
        let end = u32::from(s.address) + u32::from(s.count);
        let limit = u32::from(max_count.clamp(1, s.table.max_read()));
        if let Some(b) = blocks.last_mut() {
            let b_end = u32::from(b.address) + u32::from(b.count);
            let new_end = b_end.max(end);
            if b.table == s.table
                && u32::from(s.address) <= b_end + u32::from(max_gap)
                && new_end - u32::from(b.address) <= limit
            {
                b.count = (new_end - u32::from(b.address)) as u16;
                b.points.push(i);
                continue;
            }
        }
        blocks.push(Block {
            table: s.table,
            address: s.address,
            count: s.count,
            points: vec![i],
        });
    }
    blocks
}

// ─── Values ───────────────────────────────────────────────────────────────────────────────────────

/// How a point's registers are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// A coil or discrete input; on a register: non-zero.
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// `count` registers of text, two bytes each; trailing NULs and spaces removed.
    String,
}

impl ValueType {
    /// Registers (or bits, for Bool on a bit table) the type spans; a string spans `count`.
    pub fn registers(self, count: u16) -> u16 {
        match self {
            ValueType::Bool | ValueType::U16 | ValueType::I16 => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::U64 | ValueType::I64 | ValueType::F64 => 4,
            ValueType::String => count,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ValueType::Bool => "bool",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F32 => "f32",
            ValueType::F64 => "f64",
            ValueType::String => "string",
        }
    }
    /// The raw integer range a write must fit (floats and strings: `None`).
    fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            ValueType::Bool => (0, 1),
            ValueType::U16 => (0, i128::from(u16::MAX)),
            ValueType::I16 => (i128::from(i16::MIN), i128::from(i16::MAX)),
            ValueType::U32 => (0, i128::from(u32::MAX)),
            ValueType::I32 => (i128::from(i32::MIN), i128::from(i32::MAX)),
            ValueType::U64 => (0, i128::from(u64::MAX)),
            ValueType::I64 => (i128::from(i64::MIN), i128::from(i64::MAX)),
            _ => return None,
        })
    }
}

/// Byte and word order of multi-register values, named by where the bytes of the big-endian
/// value `A B C D` (A most significant) arrive: `ABCD` big-endian (the Modbus default),
/// `CDAB` low word first ("word swap"), `BADC` bytes swapped in each register ("byte swap"),
/// `DCBA` little-endian. For 64-bit values the same rule applies to four registers (`CDAB`:
/// the registers in reverse order). 16-bit values only see the byte swap; strings keep their
/// register order and only see the byte swap.
///
/// Home Assistant's `swap:` is `none`/`word`/`byte`/`word_byte` = `ABCD`/`CDAB`/`BADC`/`DCBA`;
/// ThingsBoard's `byteOrder`/`wordOrder` `BIG`/`BIG` = `ABCD`, `BIG`/`LITTLE` = `CDAB`,
/// `LITTLE`/`BIG` = `BADC`, `LITTLE`/`LITTLE` = `DCBA`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    #[default]
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl Order {
    fn swap_bytes(self) -> bool {
        matches!(self, Order::Badc | Order::Dcba)
    }
    fn swap_words(self) -> bool {
        matches!(self, Order::Cdab | Order::Dcba)
    }
    pub fn name(self) -> &'static str {
        match self {
            Order::Abcd => "ABCD",
            Order::Cdab => "CDAB",
            Order::Badc => "BADC",
            Order::Dcba => "DCBA",
        }
    }
}

/// A decoded value before scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum Raw {
    Bool(bool),
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(String),
}

/// A value ready to publish.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    /// An integer left unscaled (scale 1, offset 0): exact even above 2^53.
    Unsigned(u64),
    Signed(i64),
    Float(f64),
    Text(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{got} registers where the type needs {want}")]
    Registers { got: usize, want: usize },
    #[error("the value is not a finite number (NaN or infinity)")]
    NotFinite,
    #[error("the text is not UTF-8")]
    NotUtf8,
    #[error("{0} is out of range for the point ({1})")]
    OutOfRange(String, String),
    #[error("this type cannot be written")]
    NotWritable,
}

impl ValueError {
    pub fn reason(&self) -> &'static str {
        match self {
            ValueError::Registers { .. } => "registers",
            ValueError::NotFinite => "not_finite",
            ValueError::NotUtf8 => "not_utf8",
            ValueError::OutOfRange(..) => "out_of_range",
            ValueError::NotWritable => "not_writable",
        }
    }
}

/// Registers → bytes in big-endian order of significance (A B C D …) under `order`.
fn ordered_bytes(regs: &[u16], order: Order, words: bool) -> Vec<u8> {
    let mut r: Vec<u16> = regs.to_vec();
    if words && order.swap_words() {
        r.reverse();
    }
    let mut out = Vec::with_capacity(r.len() * 2);
    for w in r {
        let [hi, lo] = w.to_be_bytes();
        if order.swap_bytes() {
            out.extend_from_slice(&[lo, hi]);
        } else {
            out.extend_from_slice(&[hi, lo]);
        }
    }
    out
}

/// The inverse of [`ordered_bytes`].
fn ordered_registers(bytes: &[u8], order: Order, words: bool) -> Vec<u16> {
    let mut r: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let (a, b) = (c[0], c.get(1).copied().unwrap_or(0));
            if order.swap_bytes() {
                u16::from_be_bytes([b, a])
            } else {
                u16::from_be_bytes([a, b])
            }
        })
        .collect();
    if words && order.swap_words() {
        r.reverse();
    }
    r
}

/// Decodes a point's registers (exactly `ty.registers(count)` of them).
pub fn decode(regs: &[u16], ty: ValueType, order: Order) -> Result<Raw, ValueError> {
    let want = usize::from(ty.registers(u16::try_from(regs.len()).unwrap_or(u16::MAX)));
    if regs.len() != want || regs.is_empty() {
        return Err(ValueError::Registers {
            got: regs.len(),
            want: want.max(1),
        });
    }
    if ty == ValueType::String {
        let bytes = ordered_bytes(regs, order, false);
        let end = bytes
            .iter()
            .rposition(|b| *b != 0 && *b != b' ')
            .map_or(0, |i| i + 1);
        // Text ends at the first NUL (C strings in fixed-size fields).
        let text = &bytes[..end];
        let text = &text[..text.iter().position(|b| *b == 0).unwrap_or(text.len())];
        return String::from_utf8(text.to_vec())
            .map(Raw::Text)
            .map_err(|_| ValueError::NotUtf8);
    }
    let b = ordered_bytes(regs, order, true);
    let mut wide = [0u8; 8];
    wide[8 - b.len()..].copy_from_slice(&b);
    let u = u64::from_be_bytes(wide);
    Ok(match ty {
        ValueType::Bool => Raw::Bool(u != 0),
        ValueType::U16 | ValueType::U32 | ValueType::U64 => Raw::Unsigned(u),
        ValueType::I16 => Raw::Signed(i64::from(u as u16 as i16)),
        ValueType::I32 => Raw::Signed(i64::from(u as u32 as i32)),
        ValueType::I64 => Raw::Signed(u as i64),
        ValueType::F32 => {
            let f = f32::from_bits(u as u32);
            if !f.is_finite() {
                return Err(ValueError::NotFinite);
            }
            // The f32's shortest decimal form (230.1, not 230.10000610351562): what the device
            // meant, and what a person reading the payload expects.
            Raw::Float(f.to_string().parse().unwrap_or(f64::from(f)))
        }
        ValueType::F64 => {
            let f = f64::from_bits(u);
            if !f.is_finite() {
                return Err(ValueError::NotFinite);
            }
            Raw::Float(f)
        }
        ValueType::String => unreachable!("handled above"),
    })
}

/// `raw × scale + offset`. Integers stay exact integers when scale is 1 and offset 0.
pub fn scale(raw: Raw, scale: f64, offset: f64) -> Result<Value, ValueError> {
    let identity = scale == 1.0 && offset == 0.0;
    let v = match raw {
        Raw::Bool(b) => return Ok(Value::Bool(b)),
        Raw::Text(t) => return Ok(Value::Text(t)),
        Raw::Unsigned(u) if identity => return Ok(Value::Unsigned(u)),
        Raw::Signed(i) if identity => return Ok(Value::Signed(i)),
        Raw::Unsigned(u) => u as f64,
        Raw::Signed(i) => i as f64,
        Raw::Float(f) => f,
    };
    let out = v * scale + offset;
    if !out.is_finite() {
        return Err(ValueError::NotFinite);
    }
    Ok(Value::Float(round_significant(out, 12)))
}

/// Rounds to `digits` significant digits: `2301 × 0.1` is 230.10000000000002 in binary
/// floating point; the reading is 230.1.
fn round_significant(x: f64, digits: i32) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    let magnitude = x.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).clamp(-300, 300);
    let factor = 10f64.powi(decimals);
    let r = (x * factor).round() / factor;
    if r.is_finite() {
        r
    } else {
        x
    }
}

/// A commanded value → the registers to write: `(value − offset) / scale`, rounded to the
/// nearest integer for integer types, checked against the type's range and `[min, max]`
/// (in the scaled unit) first.
pub fn encode(
    value: f64,
    ty: ValueType,
    order: Order,
    scale: f64,
    offset: f64,
    min: Option<f64>,
    max: Option<f64>,
) -> Result<Vec<u16>, ValueError> {
    if !value.is_finite() {
        return Err(ValueError::NotFinite);
    }
    let bounds = || {
        format!(
            "{} from {} to {}",
            ty.name(),
            min.map_or("-".into(), |m| m.to_string()),
            max.map_or("-".into(), |m| m.to_string())
        )
    };
    if min.is_some_and(|m| value < m) || max.is_some_and(|m| value > m) {
        return Err(ValueError::OutOfRange(value.to_string(), bounds()));
    }
    if scale == 0.0 || !scale.is_finite() {
        return Err(ValueError::NotWritable);
    }
    let raw = (value - offset) / scale;
    let bytes: Vec<u8> = match ty {
        ValueType::String => return Err(ValueError::NotWritable),
        ValueType::F32 => {
            let f = raw as f32;
            if !f.is_finite() {
                return Err(ValueError::OutOfRange(value.to_string(), bounds()));
            }
            f.to_bits().to_be_bytes().to_vec()
        }
        ValueType::F64 => raw.to_bits().to_be_bytes().to_vec(),
        _ => {
            let (lo, hi) = ty.int_range().ok_or(ValueError::NotWritable)?;
            let r = raw.round();
            // f64 → i128 saturates; compare as floats first so 1e300 is refused, not clamped.
            if r < lo as f64 || r > hi as f64 {
                return Err(ValueError::OutOfRange(value.to_string(), bounds()));
            }
            let r = r as i128;
            let n = usize::from(ty.registers(1)) * 2;
            let all = (r as u128 as u64).to_be_bytes();
            all[8 - n..].to_vec()
        }
    };
    Ok(ordered_registers(&bytes, order, true))
}

// ─── RTU timing ───────────────────────────────────────────────────────────────────────────────────

/// Bits per RTU character: start, 8 data, parity or a second stop bit, stop (the serial line
/// specification's 11; with no parity and one stop bit a device sends 10, and the silences
/// computed from 11 are then slightly longer than needed, never shorter).
pub const BITS_PER_CHAR: u32 = 11;

/// RTU timing at one baud rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtuTiming {
    /// One character on the wire.
    pub char: Duration,
    /// Longest gap allowed inside a frame.
    pub t1_5: Duration,
    /// Shortest silence between frames.
    pub t3_5: Duration,
}

impl RtuTiming {
    /// The character time at `baud` with [`BITS_PER_CHAR`] bits; t1.5 and t3.5 from it, or the
    /// specification's fixed 750 µs and 1.75 ms above 19200 baud.
    pub fn at(baud: u32) -> RtuTiming {
        let baud = u64::from(baud.max(1));
        let char = Duration::from_nanos(u64::from(BITS_PER_CHAR) * 1_000_000_000 / baud);
        let (t1_5, t3_5) = if baud > 19_200 {
            (Duration::from_micros(750), Duration::from_micros(1750))
        } else {
            (char * 3 / 2, char * 7 / 2)
        };
        RtuTiming { char, t1_5, t3_5 }
    }

    /// Time `bytes` characters take on the wire.
    pub fn frame(&self, bytes: usize) -> Duration {
        self.char * u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// The silence a master keeps between frames: the line must have been quiet for t3.5 before a
/// request starts. Generic over the instant type so the runtime uses tokio's (pausable) clock
/// and tests pass plain instants.
#[derive(Debug, Clone, Copy)]
pub struct Silence<I> {
    t3_5: Duration,
    busy_until: Option<I>,
}

impl<I: Copy + Ord + Add<Duration, Output = I>> Silence<I> {
    pub fn new(timing: RtuTiming) -> Silence<I> {
        Silence {
            t3_5: timing.t3_5,
            busy_until: None,
        }
    }

    /// The line carries a character until `until` (a byte received at that instant, or the
    /// end of our own frame's transmission).
    pub fn busy(&mut self, until: I) {
        self.busy_until = Some(match self.busy_until {
            Some(b) if b > until => b,
            _ => until,
        });
    }

    /// The earliest instant a new frame may start (`None`: the line has never been used).
    pub fn ready_at(&self) -> Option<I> {
        self.busy_until.map(|b| b + self.t3_5)
    }

    /// Whether a frame may start at `now`.
    pub fn may_send(&self, now: I) -> bool {
        self.ready_at().is_none_or(|r| now >= r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Instant;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
            .collect()
    }

    #[test]
    fn crc16_matches_the_serial_line_guide_and_the_frame_every_tool_shows() {
        // MODBUS over Serial Line V1.02, §6.2.2: 02 07 → CRC 0x1241, sent 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        // Read holding registers 0–1 of unit 1, the frame every tool shows: 01 03 00 00 00 01 84 0A.
        assert_eq!(
            rtu_request(
                1,
                &Request::Read {
                    table: Table::HoldingRegister,
                    address: 0,
                    count: 1
                }
            ),
            hex("01 03 00 00 00 01 84 0A")
        );
        // The check value of CRC-16/MODBUS.
        assert_eq!(crc16(b"123456789"), 0x4B37);
    }

    #[test]
    fn the_application_protocol_examples_encode_byte_for_byte() {
        // §6.1–6.6, 6.11, 6.12 of the application protocol specification.
        let cases: Vec<(Request, &str)> = vec![
            (
                Request::Read {
                    table: Table::Coil,
                    address: 19,
                    count: 19,
                },
                "01 00 13 00 13",
            ),
            (
                Request::Read {
                    table: Table::DiscreteInput,
                    address: 196,
                    count: 22,
                },
                "02 00 C4 00 16",
            ),
            (
                Request::Read {
                    table: Table::HoldingRegister,
                    address: 107,
                    count: 3,
                },
                "03 00 6B 00 03",
            ),
            (
                Request::Read {
                    table: Table::InputRegister,
                    address: 8,
                    count: 1,
                },
                "04 00 08 00 01",
            ),
            (
                Request::WriteCoil {
                    address: 172,
                    on: true,
                },
                "05 00 AC FF 00",
            ),
            (
                Request::WriteRegister {
                    address: 1,
                    value: 3,
                },
                "06 00 01 00 03",
            ),
            (
                Request::WriteCoils {
                    address: 19,
                    values: unpack_bits(&[0xCD, 0x01], 10),
                },
                "0F 00 13 00 0A 02 CD 01",
            ),
            (
                Request::WriteRegisters {
                    address: 1,
                    values: vec![0x000A, 0x0102],
                },
                "10 00 01 00 02 04 00 0A 01 02",
            ),
        ];
        for (req, want) in cases {
            assert_eq!(req.pdu(), hex(want), "{req:?}");
            assert_eq!(Request::parse(&hex(want)), Ok(req.clone()), "{want}");
        }
    }

    #[test]
    fn the_specifications_example_responses_decode_to_their_values() {
        let coils = Request::Read {
            table: Table::Coil,
            address: 19,
            count: 19,
        };
        let Ok(Response::Bits(bits)) = parse_response(&coils, &hex("01 03 CD 6B 05")) else {
            panic!("coils")
        };
        assert_eq!(bits.len(), 19);
        assert_eq!(pack_bits(&bits), hex("CD 6B 05"));
        assert!(bits[0] && !bits[1] && bits[2]);
        let regs = Request::Read {
            table: Table::HoldingRegister,
            address: 107,
            count: 3,
        };
        assert_eq!(
            parse_response(&regs, &hex("03 06 02 2B 00 00 00 64")),
            Ok(Response::Registers(vec![555, 0, 100]))
        );
        let write = Request::WriteRegisters {
            address: 1,
            values: vec![0x000A, 0x0102],
        };
        assert_eq!(
            parse_response(&write, &hex("10 00 01 00 02")),
            Ok(Response::Written)
        );
        // §7: "01 02 03 04 0x81 02" — an exception answers with the function's high bit set.
        assert_eq!(
            parse_response(&regs, &hex("83 02")),
            Err(FrameError::Exception(Exception::IllegalDataAddress))
        );
    }

    #[test]
    fn a_write_echo_that_differs_from_the_request_is_refused() {
        let w = Request::WriteRegister {
            address: 1,
            value: 3,
        };
        assert_eq!(
            parse_response(&w, &hex("06 00 01 00 04")),
            Err(FrameError::Echo)
        );
        assert_eq!(
            parse_response(&w, &hex("06 00 01 00 03 00")),
            Err(FrameError::Length { got: 6, want: 5 })
        );
    }

    #[test]
    fn requests_outside_the_specifications_limits_are_refused_by_a_slave() {
        assert_eq!(
            Request::parse(&hex("03 00 00 00 7E")),
            Err(RequestError::Quantity(126))
        );
        assert_eq!(
            Request::parse(&hex("01 00 00 07 D1")),
            Err(RequestError::Quantity(2001))
        );
        assert_eq!(
            Request::parse(&hex("03 FF FF 00 02")),
            Err(RequestError::Range)
        );
        assert_eq!(
            Request::parse(&hex("05 00 01 12 34")),
            Err(RequestError::CoilValue(0x1234))
        );
        assert_eq!(
            Request::parse(&hex("2B 0E 01 00")),
            Err(RequestError::Function(0x2B))
        );
        assert_eq!(
            Request::parse(&hex("10 00 01 00 02 03 00 0A 01")),
            Err(RequestError::Length)
        );
        assert_eq!(
            RequestError::Function(7).exception(),
            Exception::IllegalFunction
        );
    }

    #[test]
    fn every_exception_code_has_a_name_and_round_trips() {
        for c in [1u8, 2, 3, 4, 5, 6, 8, 10, 11, 99] {
            let e = Exception::from_code(c);
            assert_eq!(e.code(), c);
            assert!(!e.name().is_empty());
        }
        assert_eq!(
            Exception::from_code(11).name(),
            "gateway_target_failed_to_respond"
        );
    }

    fn read_hr(count: u16) -> Request {
        Request::Read {
            table: Table::HoldingRegister,
            address: 0,
            count,
        }
    }

    fn decode_all(unit: u8, req: &Request, bytes: &[u8]) -> Option<Result<Response, FrameError>> {
        RtuDecoder::new(unit, req).push(bytes)
    }

    #[test]
    fn the_rtu_decoder_takes_a_response_byte_by_byte() {
        let req = read_hr(2);
        let frame = rtu_frame(7, &hex("03 04 00 2A FF FF"));
        let mut d = RtuDecoder::new(7, &req);
        for b in &frame[..frame.len() - 1] {
            assert_eq!(d.push(&[*b]), None);
        }
        assert_eq!(
            d.push(&frame[frame.len() - 1..]),
            Some(Ok(Response::Registers(vec![42, 0xFFFF])))
        );
        assert_eq!(d.trailing(), 0);
        assert_eq!(d.push(b"xx"), None);
        assert_eq!(d.trailing(), 2);
    }

    #[test]
    fn the_rtu_decoder_knows_write_and_exception_lengths() {
        let w = Request::WriteCoil {
            address: 172,
            on: true,
        };
        let echo = rtu_frame(1, &hex("05 00 AC FF 00"));
        assert_eq!(echo.len(), 8);
        assert_eq!(decode_all(1, &w, &echo), Some(Ok(Response::Written)));
        let exc = rtu_frame(1, &hex("85 04"));
        assert_eq!(exc.len(), 5);
        assert_eq!(
            decode_all(1, &w, &exc),
            Some(Err(FrameError::Exception(Exception::ServerDeviceFailure)))
        );
    }

    #[test]
    fn the_rtu_decoder_gives_a_distinct_reason_for_each_fault() {
        let req = read_hr(1);
        let good = rtu_frame(1, &hex("03 02 00 01"));
        let mut bad_crc = good.clone();
        *bad_crc.last_mut().expect("frame") ^= 0x01;
        let r = decode_all(1, &req, &bad_crc).expect("decided");
        assert_eq!(r.map_err(|e| e.reason()), Err("crc"));
        let r = decode_all(2, &req, &good).expect("decided at the first byte");
        assert_eq!(r, Err(FrameError::WrongUnit { got: 1, want: 2 }));
        let r = decode_all(1, &req, &rtu_frame(1, &hex("04 02 00 01"))).expect("decided");
        assert_eq!(r.map_err(|e| e.reason()), Err("wrong_function"));
        // A byte count that disagrees with the request is refused at once, not waited for.
        let mut d = RtuDecoder::new(1, &req);
        assert_eq!(
            d.push(&hex("01 03 FA")),
            Some(Err(FrameError::ByteCount { got: 250, want: 2 }))
        );
        assert_eq!(d.received(), 3);
    }

    #[test]
    fn the_slave_side_finds_request_lengths_and_checks_the_crc() {
        let f = rtu_request(
            3,
            &Request::WriteRegisters {
                address: 1,
                values: vec![1, 2, 3],
            },
        );
        assert_eq!(rtu_request_len(&f[..2]), None);
        assert_eq!(rtu_request_len(&f[..7]), Some(f.len()));
        assert_eq!(rtu_request_len(&[1, 3]), Some(8));
        let (unit, pdu) = rtu_split(&f).expect("valid");
        assert_eq!(unit, 3);
        assert_eq!(Request::parse(pdu).map(|r| r.function()), Ok(16));
        let mut broken = f.clone();
        broken[4] ^= 0x40;
        assert!(matches!(rtu_split(&broken), Err(FrameError::Crc { .. })));
    }

    #[test]
    fn replies_built_for_the_simulator_decode_as_responses() {
        let req = Request::Read {
            table: Table::DiscreteInput,
            address: 0,
            count: 10,
        };
        let bits: Vec<bool> = (0..10).map(|i| i % 3 == 0).collect();
        let pdu = reply_pdu(&req, Ok(&Response::Bits(bits.clone())));
        assert_eq!(parse_response(&req, &pdu), Ok(Response::Bits(bits)));
        let w = Request::WriteRegister {
            address: 9,
            value: 1,
        };
        assert_eq!(
            parse_response(&w, &reply_pdu(&w, Ok(&Response::Written))),
            Ok(Response::Written)
        );
        assert_eq!(
            parse_response(&w, &reply_pdu(&w, Err(Exception::ServerDeviceBusy))),
            Err(FrameError::Exception(Exception::ServerDeviceBusy))
        );
    }

    #[test]
    fn the_mbap_header_carries_transaction_protocol_length_and_unit() {
        // Read input register 8 of unit 0x11, transaction 1.
        let req = Request::Read {
            table: Table::InputRegister,
            address: 8,
            count: 1,
        };
        let f = tcp_request(1, 0x11, &req);
        assert_eq!(f, hex("00 01 00 00 00 06 11 04 00 08 00 01"));
        let resp = tcp_frame(1, 0x11, &hex("04 02 00 0A"));
        let h = Mbap::parse(resp[..7].try_into().expect("7 bytes")).expect("header");
        assert_eq!(h.pdu_len(), 4);
        assert_eq!(
            tcp_response(&h, &resp[7..], 1, 0x11, &req),
            Ok(Response::Registers(vec![10]))
        );
        assert_eq!(
            tcp_response(&h, &resp[7..], 2, 0x11, &req).map_err(|e| e.reason()),
            Err("transaction")
        );
        assert_eq!(
            tcp_response(&h, &resp[7..], 1, 0x12, &req).map_err(|e| e.reason()),
            Err("wrong_unit")
        );
        let mut bad = resp.clone();
        bad[3] = 1;
        assert_eq!(
            Mbap::parse(bad[..7].try_into().expect("7")),
            Err(FrameError::Protocol(1))
        );
        bad[3] = 0;
        bad[5] = 0;
        assert_eq!(
            Mbap::parse(bad[..7].try_into().expect("7")),
            Err(FrameError::MbapLength(0))
        );
    }

    fn span(table: Table, address: u16, count: u16) -> Span {
        Span {
            table,
            address,
            count,
        }
    }

    #[test]
    fn planning_joins_nearby_points_per_table_within_gap_and_count() {
        let hr = Table::HoldingRegister;
        let spans = [
            span(hr, 10, 2),
            span(hr, 0, 2),
            span(Table::Coil, 0, 1),
            span(hr, 4, 1),
            span(hr, 30, 4),
            span(Table::Coil, 4, 1),
        ];
        let blocks = plan(&spans, 3, 125);
        let got: Vec<(Table, u16, u16, Vec<usize>)> = blocks
            .iter()
            .map(|b| (b.table, b.address, b.count, b.points.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Table::Coil, 0, 5, vec![2, 5]),
                (hr, 0, 5, vec![1, 3]),
                (hr, 10, 2, vec![0]),
                (hr, 30, 4, vec![4]),
            ]
        );
        // No gap allowed: only touching spans join; a max_count of 4 splits 0..5.
        assert_eq!(plan(&spans, 0, 125).len(), 6);
        let tight = plan(&[span(hr, 0, 2), span(hr, 2, 2), span(hr, 4, 2)], 0, 4);
        assert_eq!(tight.iter().map(|b| b.count).collect::<Vec<_>>(), [4, 2]);
    }

    #[test]
    fn planning_never_exceeds_125_registers_or_2000_bits_whatever_max_count_says() {
        let regs: Vec<Span> = (0..300).map(|a| span(Table::InputRegister, a, 1)).collect();
        let blocks = plan(&regs, 10, u16::MAX);
        assert!(blocks.iter().all(|b| b.count <= MAX_READ_REGISTERS));
        assert_eq!(blocks.len(), 3);
        let bits: Vec<Span> = (0..4001)
            .map(|a| span(Table::DiscreteInput, a, 1))
            .collect();
        let blocks = plan(&bits, 0, u16::MAX);
        assert!(blocks.iter().all(|b| b.count <= MAX_READ_BITS));
        assert_eq!(blocks.len(), 3);
    }

    #[test]
    fn overlapping_points_share_one_read() {
        let hr = Table::HoldingRegister;
        let blocks = plan(&[span(hr, 0, 2), span(hr, 0, 1), span(hr, 1, 1)], 0, 125);
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].count, 2);
        assert_eq!(blocks[0].offset_of(&span(hr, 1, 1)), 1);
    }

    /// 0x12345678 as u32 / 0x40490FDB as f32 (π) in each order.
    #[test]
    // 3.1415927 is the f32 π's shortest decimal form, deliberately not f64's π.
    #[allow(clippy::approx_constant)]
    fn every_order_of_a_32_bit_value_decodes_to_the_same_number() {
        let cases = [
            (Order::Abcd, [0x1234, 0x5678], [0x4049, 0x0FDB]),
            (Order::Cdab, [0x5678, 0x1234], [0x0FDB, 0x4049]),
            (Order::Badc, [0x3412, 0x7856], [0x4940, 0xDB0F]),
            (Order::Dcba, [0x7856, 0x3412], [0xDB0F, 0x4940]),
        ];
        for (order, u, f) in cases {
            assert_eq!(
                decode(&u, ValueType::U32, order),
                Ok(Raw::Unsigned(0x1234_5678)),
                "{order:?}"
            );
            assert_eq!(
                decode(&f, ValueType::F32, order),
                Ok(Raw::Float(3.1415927)),
                "{order:?}: f32 π in its shortest decimal form"
            );
        }
    }

    #[test]
    fn sixty_four_bit_values_follow_the_same_order_rule_over_four_registers() {
        let abcd = [0x0102, 0x0304, 0x0506, 0x0708];
        let want = Raw::Unsigned(0x0102_0304_0506_0708);
        assert_eq!(decode(&abcd, ValueType::U64, Order::Abcd), Ok(want.clone()));
        assert_eq!(
            decode(
                &[0x0708, 0x0506, 0x0304, 0x0102],
                ValueType::U64,
                Order::Cdab
            ),
            Ok(want.clone())
        );
        assert_eq!(
            decode(
                &[0x0201, 0x0403, 0x0605, 0x0807],
                ValueType::U64,
                Order::Badc
            ),
            Ok(want.clone())
        );
        assert_eq!(
            decode(
                &[0x0807, 0x0605, 0x0403, 0x0201],
                ValueType::U64,
                Order::Dcba
            ),
            Ok(want)
        );
        let minus_one = [0xFFFF; 4];
        assert_eq!(
            decode(&minus_one, ValueType::I64, Order::Abcd),
            Ok(Raw::Signed(-1))
        );
        let e = std::f64::consts::E.to_bits();
        let regs = [
            (e >> 48) as u16,
            (e >> 32) as u16,
            (e >> 16) as u16,
            e as u16,
        ];
        assert_eq!(
            decode(&regs, ValueType::F64, Order::Abcd),
            Ok(Raw::Float(std::f64::consts::E))
        );
    }

    #[test]
    fn sixteen_bit_values_signedness_and_byte_swap() {
        assert_eq!(
            decode(&[0xFF38], ValueType::I16, Order::Abcd),
            Ok(Raw::Signed(-200))
        );
        assert_eq!(
            decode(&[0xFF38], ValueType::U16, Order::Abcd),
            Ok(Raw::Unsigned(65336))
        );
        assert_eq!(
            decode(&[0x38FF], ValueType::I16, Order::Badc),
            Ok(Raw::Signed(-200))
        );
        // The word swap alone does nothing to one register.
        assert_eq!(
            decode(&[0xFF38], ValueType::I16, Order::Cdab),
            Ok(Raw::Signed(-200))
        );
        assert_eq!(
            decode(&[0x0000], ValueType::Bool, Order::Abcd),
            Ok(Raw::Bool(false))
        );
        assert_eq!(
            decode(&[0x0100], ValueType::Bool, Order::Abcd),
            Ok(Raw::Bool(true))
        );
    }

    #[test]
    fn strings_read_in_register_order_and_lose_trailing_padding() {
        // "EM-24 " + NUL padding: 'E' 'M' | '-' '2' | '4' ' ' | 0 0.
        let regs = [0x454D, 0x2D32, 0x3420, 0x0000];
        assert_eq!(
            decode(&regs, ValueType::String, Order::Abcd),
            Ok(Raw::Text("EM-24".into()))
        );
        let swapped = [0x4D45, 0x322D, 0x2034, 0x0000];
        assert_eq!(
            decode(&swapped, ValueType::String, Order::Badc),
            Ok(Raw::Text("EM-24".into()))
        );
        assert_eq!(
            decode(&[0xFFFE], ValueType::String, Order::Abcd),
            Err(ValueError::NotUtf8)
        );
    }

    #[test]
    fn nan_and_wrong_register_counts_are_errors_with_reasons() {
        assert_eq!(
            decode(&[0x7FC0, 0x0000], ValueType::F32, Order::Abcd).map_err(|e| e.reason()),
            Err("not_finite")
        );
        assert_eq!(
            decode(&[1], ValueType::U32, Order::Abcd).map_err(|e| e.reason()),
            Err("registers")
        );
    }

    #[test]
    fn scaling_keeps_plain_integers_exact_and_scales_the_rest() {
        assert_eq!(
            scale(Raw::Unsigned(u64::MAX), 1.0, 0.0),
            Ok(Value::Unsigned(u64::MAX))
        );
        assert_eq!(
            scale(Raw::Unsigned(2301), 0.1, 0.0),
            Ok(Value::Float(230.1))
        );
        assert_eq!(scale(Raw::Signed(-405), 0.1, 40.0), Ok(Value::Float(-0.5)));
        assert_eq!(scale(Raw::Unsigned(7), 0.001, 0.0), Ok(Value::Float(0.007)));
        assert_eq!(scale(Raw::Float(1e-20), 3.0, 0.0), Ok(Value::Float(3e-20)));
        assert_eq!(scale(Raw::Bool(true), 10.0, 1.0), Ok(Value::Bool(true)));
    }

    #[test]
    fn writes_are_unscaled_rounded_and_range_checked() {
        // 23.46 °C with scale 0.1 → 235 in one register.
        assert_eq!(
            encode(23.46, ValueType::I16, Order::Abcd, 0.1, 0.0, None, None),
            Ok(vec![235])
        );
        assert_eq!(
            encode(-1.0, ValueType::I16, Order::Abcd, 1.0, 0.0, None, None),
            Ok(vec![0xFFFF])
        );
        assert_eq!(
            encode(1.0, ValueType::U32, Order::Cdab, 1.0, 0.0, None, None),
            Ok(vec![1, 0])
        );
        let e = |v: f64, ty| {
            encode(v, ty, Order::Abcd, 1.0, 0.0, Some(-10.0), Some(100.0)).map_err(|e| e.reason())
        };
        assert_eq!(e(101.0, ValueType::I32), Err("out_of_range"));
        assert_eq!(e(-11.0, ValueType::I32), Err("out_of_range"));
        assert_eq!(
            encode(-1.0, ValueType::U16, Order::Abcd, 1.0, 0.0, None, None).map_err(|e| e.reason()),
            Err("out_of_range")
        );
        assert_eq!(
            encode(70000.0, ValueType::U16, Order::Abcd, 1.0, 0.0, None, None)
                .map_err(|e| e.reason()),
            Err("out_of_range")
        );
        assert_eq!(
            encode(f64::NAN, ValueType::F32, Order::Abcd, 1.0, 0.0, None, None)
                .map_err(|e| e.reason()),
            Err("not_finite")
        );
        assert_eq!(
            encode(1e300, ValueType::F32, Order::Abcd, 1.0, 0.0, None, None)
                .map_err(|e| e.reason()),
            Err("out_of_range")
        );
        assert_eq!(
            encode(1.0, ValueType::String, Order::Abcd, 1.0, 0.0, None, None)
                .map_err(|e| e.reason()),
            Err("not_writable")
        );
    }

    #[test]
    fn the_character_time_and_silences_follow_the_serial_line_specification() {
        let t = RtuTiming::at(9600);
        assert_eq!(t.char, Duration::from_nanos(1_145_833));
        assert_eq!(t.t3_5, Duration::from_nanos(1_145_833 * 7 / 2));
        assert_eq!(t.t1_5, Duration::from_nanos(1_145_833 * 3 / 2));
        let t = RtuTiming::at(19200);
        assert_eq!(t.t3_5, Duration::from_nanos(572_916 * 7 / 2));
        // Above 19200 baud the specification fixes t1.5 = 750 µs and t3.5 = 1.75 ms.
        let t = RtuTiming::at(115_200);
        assert_eq!(t.t1_5, Duration::from_micros(750));
        assert_eq!(t.t3_5, Duration::from_micros(1750));
        assert_eq!(
            RtuTiming::at(19200).frame(8),
            Duration::from_nanos(572_916 * 8)
        );
    }

    #[test]
    fn the_silence_holds_a_request_until_t3_5_after_the_last_byte_on_the_line() {
        let t = RtuTiming::at(9600);
        let t0 = Instant::now();
        let mut s: Silence<Instant> = Silence::new(t);
        assert!(s.may_send(t0), "an unused line is free");
        // Our 8-byte request ends on the wire 8 characters after the write.
        s.busy(t0 + t.frame(8));
        // The last response byte at 20 ms; a later report of an earlier instant changes nothing.
        s.busy(t0 + Duration::from_millis(20));
        s.busy(t0 + Duration::from_millis(5));
        let ready = t0 + Duration::from_millis(20) + t.t3_5;
        assert_eq!(s.ready_at(), Some(ready));
        assert!(!s.may_send(ready - Duration::from_micros(1)));
        assert!(s.may_send(ready));
    }

    proptest! {
        #[test]
        fn every_value_written_reads_back_in_every_order(
            v in any::<i32>(),
            ty in prop::sample::select(vec![ValueType::I32, ValueType::I64, ValueType::F64, ValueType::F32]),
            order in prop::sample::select(vec![Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba]),
        ) {
            let v = f64::from(v);
            let regs = encode(v, ty, order, 1.0, 0.0, None, None).expect("in range");
            prop_assert_eq!(regs.len(), usize::from(ty.registers(1)));
            let back = match decode(&regs, ty, order).expect("decodes") {
                Raw::Signed(i) => i as f64,
                Raw::Float(f) => f,
                other => panic!("{other:?}"),
            };
            if ty == ValueType::F32 {
                // The same f32 (published in its shortest decimal form).
                prop_assert_eq!(back as f32, v as f32);
            } else {
                prop_assert_eq!(back, v);
            }
        }

        #[test]
        fn the_rtu_decoder_accepts_exactly_the_frames_a_slave_would_send(
            count in 1u16..=125,
            regs in prop::collection::vec(any::<u16>(), 125),
            unit in 1u8..=247,
            cut in 1usize..9,
        ) {
            let req = read_hr(count);
            let data = &regs[..usize::from(count)];
            let frame = rtu_frame(unit, &reply_pdu(&req, Ok(&Response::Registers(data.to_vec()))));
            let mut d = RtuDecoder::new(unit, &req);
            let mut result = None;
            for chunk in frame.chunks(cut) {
                if let Some(r) = d.push(chunk) {
                    result = Some(r);
                }
            }
            prop_assert_eq!(result, Some(Ok(Response::Registers(data.to_vec()))));
        }

        #[test]
        fn any_single_flipped_bit_in_a_response_is_caught(
            count in 1u16..=10,
            regs in prop::collection::vec(any::<u16>(), 10),
            bit in 0usize..(8 * (5 + 20)),
        ) {
            let req = read_hr(count);
            let good = rtu_frame(1, &reply_pdu(&req, Ok(&Response::Registers(regs[..usize::from(count)].to_vec()))));
            let bit = bit % (good.len() * 8);
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut d = RtuDecoder::new(1, &req);
            let r = d.push(&bad);
            // Either refused now, or (a corrupted length made it want more) not accepted.
            prop_assert!(!matches!(r, Some(Ok(_))), "{bad:02x?} accepted");
        }
    }
}
