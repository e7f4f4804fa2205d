//! MQTT framing and the strict checks of the front: pure code over byte slices, no I/O.
//!
//! The front forwards each packet's original bytes; it decodes only what it acts on (CONNECT,
//! PUBLISH, SUBSCRIBE, UNSUBSCRIBE) and checks every other packet's fixed header and length.
//! The maintained Rust codecs (rumqttd's included) accept packets the specification says must
//! close the connection (wildcards or an empty topic in PUBLISH, wrong reserved flags, trailing
//! bytes after CONNECT, a second CONNECT…); each such packet is a [`Malformed`] reason here.

use std::ops::Range;

/// Why a packet closes its connection. The names are stable: they label the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// Remaining length encoded in more than 4 bytes, or not minimal.
    BadLength,
    /// Larger than `broker.max_payload_size`.
    TooLarge,
    /// Reserved packet type 0, or a packet only a server sends (CONNACK, SUBACK…), or AUTH.
    BadType,
    /// Fixed-header flags other than the ones the packet type requires.
    BadFlags,
    /// The first packet was not CONNECT, or a second CONNECT came.
    ConnectOrder,
    /// CONNECT with a wrong protocol name, reserved flag, will flags, or bytes after its end.
    BadConnect,
    /// A field runs past the end of the packet, or bytes are left after its end.
    Truncated,
    /// A topic or filter that is not valid UTF-8, empty, has a NUL or misplaced wildcards.
    BadTopic,
    /// QoS 3, or a QoS 0 PUBLISH with DUP set.
    BadQos,
    /// Packet identifier 0 where one is required.
    ZeroPacketId,
    /// SUBSCRIBE/UNSUBSCRIBE without any filter, or a subscription option's reserved bits set.
    BadSubscription,
    /// MQTT 5 properties that cannot be parsed, or one a client must not send.
    BadProperties,
    /// A topic alias that was never set, or is out of range.
    BadTopicAlias,
}

impl Malformed {
    pub const ALL: [Malformed; 13] = [
        Malformed::BadLength,
        Malformed::TooLarge,
        Malformed::BadType,
        Malformed::BadFlags,
        Malformed::ConnectOrder,
        Malformed::BadConnect,
        Malformed::Truncated,
        Malformed::BadTopic,
        Malformed::BadQos,
        Malformed::ZeroPacketId,
        Malformed::BadSubscription,
        Malformed::BadProperties,
        Malformed::BadTopicAlias,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Malformed::BadLength => "bad_length",
            Malformed::TooLarge => "too_large",
            Malformed::BadType => "bad_type",
            Malformed::BadFlags => "bad_flags",
            Malformed::ConnectOrder => "connect_order",
            Malformed::BadConnect => "bad_connect",
            Malformed::Truncated => "truncated",
            Malformed::BadTopic => "bad_topic",
            Malformed::BadQos => "bad_qos",
            Malformed::ZeroPacketId => "zero_packet_id",
            Malformed::BadSubscription => "bad_subscription",
            Malformed::BadProperties => "bad_properties",
            Malformed::BadTopicAlias => "bad_topic_alias",
        }
    }

    pub fn index(self) -> usize {
        Malformed::ALL
            .iter()
            .position(|m| *m == self)
            .expect("ALL lists every variant")
    }
}

/// Packet types, as in the fixed header's high nibble.
pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const PUBACK: u8 = 4;
pub const PUBREC: u8 = 5;
pub const PUBREL: u8 = 6;
pub const PUBCOMP: u8 = 7;
pub const SUBSCRIBE: u8 = 8;
pub const SUBACK: u8 = 9;
pub const UNSUBSCRIBE: u8 = 10;
pub const PINGREQ: u8 = 12;
pub const PINGRESP: u8 = 13;
pub const DISCONNECT: u8 = 14;

/// A PINGREQ, whole.
pub const PINGREQ_PACKET: [u8; 2] = [PINGREQ << 4, 0x00];

/// SUBACK failure (MQTT 3.1.1).
pub const SUBACK_FAILURE_V4: u8 = 0x80;
/// Reason code 0x87, Not authorized (MQTT 5: CONNACK, SUBACK, DISCONNECT).
pub const NOT_AUTHORIZED: u8 = 0x87;
/// Reason code 0x97, Quota exceeded (MQTT 5: PUBACK, PUBREC).
pub const QUOTA_EXCEEDED: u8 = 0x97;

/// The code a denied filter gets in a SUBACK at protocol `level`.
pub fn suback_denied_code(level: u8) -> u8 {
    if level == 5 {
        NOT_AUTHORIZED
    } else {
        SUBACK_FAILURE_V4
    }
}

/// A PUBACK (MQTT 3.1.1 form, also valid MQTT 5 for success).
pub fn puback(pkid: u16) -> [u8; 4] {
    let [hi, lo] = pkid.to_be_bytes();
    [PUBACK << 4, 0x02, hi, lo]
}

/// An MQTT 5 PUBACK (QoS 1) or PUBREC (QoS 2) with a reason code and no properties.
pub fn puback_v5_with_reason(pkid: u16, qos: u8, reason: u8) -> [u8; 5] {
    let [hi, lo] = pkid.to_be_bytes();
    let kind = if qos == 2 { PUBREC } else { PUBACK };
    [kind << 4, 0x03, hi, lo, reason]
}

/// An MQTT 5 DISCONNECT with a reason code and no properties.
pub fn disconnect_v5(reason: u8) -> [u8; 3] {
    [DISCONNECT << 4, 1, reason]
}

/// CONNACK refusing a connection, in the device's protocol version.
pub fn connack_refused(level: u8, code_v4: u8, code_v5: u8) -> &'static [u8] {
    match (level, code_v4, code_v5) {
        (5, _, 0x86) => &[0x20, 3, 0, 0x86, 0],
        (5, _, 0x87) => &[0x20, 3, 0, 0x87, 0],
        (5, _, _) => &[0x20, 3, 0, 0x88, 0],
        (_, 1, _) => &[0x20, 2, 0, 1],
        (_, 4, _) => &[0x20, 2, 0, 4],
        (_, 5, _) => &[0x20, 2, 0, 5],
        _ => &[0x20, 2, 0, 3],
    }
}

/// Length of the fixed header of a whole packet in `buf`.
pub fn header_len(buf: &[u8]) -> usize {
    1 + buf[1..]
        .iter()
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1)
}

/// One whole packet found at the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The first byte: type in the high nibble, flags in the low one.
    pub header: u8,
    /// Bytes of the fixed header (1 + length bytes).
    pub header_len: usize,
    /// Fixed header plus remaining length: the whole packet.
    pub len: usize,
}

impl Frame {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }
    pub fn flags(&self) -> u8 {
        self.header & 0x0f
    }
}

/// Finds the first packet in `buf`: `Ok(None)` when more bytes are needed.
pub fn frame(buf: &[u8], max_remaining: usize) -> Result<Option<Frame>, Malformed> {
    let Some(&header) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    let mut shift = 0;
    for i in 1..=4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        remaining |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            // A non-minimal encoding (a trailing 0x00 continuation byte) is malformed.
            if i > 1 && b == 0 {
                return Err(Malformed::BadLength);
            }
            if remaining > max_remaining {
                return Err(Malformed::TooLarge);
            }
            let len = 1 + i + remaining;
            return Ok((buf.len() >= len).then_some(Frame {
                header,
                header_len: 1 + i,
                len,
            }));
        }
        shift += 7;
    }
    Err(Malformed::BadLength)
}

/// A cursor over a packet's variable header and payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], pos: usize) -> Self {
        Reader { buf, pos }
    }
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self) -> Result<u8, Malformed> {
        let b = *self.buf.get(self.pos).ok_or(Malformed::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from(self.u8()?) << 8 | u16::from(self.u8()?))
    }
    fn take(&mut self, n: usize) -> Result<Range<usize>, Malformed> {
        if self.left() < n {
            return Err(Malformed::Truncated);
        }
        let r = self.pos..self.pos + n;
        self.pos += n;
        Ok(r)
    }
    /// A length-prefixed field (string or binary data): its range.
    fn field(&mut self) -> Result<Range<usize>, Malformed> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
    fn string(&mut self) -> Result<&'a str, Malformed> {
        let r = self.field()?;
        std::str::from_utf8(&self.buf[r]).map_err(|_| Malformed::BadTopic)
    }
    fn varint(&mut self) -> Result<usize, Malformed> {
        let mut v = 0usize;
        for i in 0..4 {
            let b = self.u8()?;
            v |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed::BadProperties)
    }
}

/// MQTT 5 properties found in a packet (only the ones the front acts on).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    /// Range of the whole property block, its length prefix included.
    pub block: Range<usize>,
    pub topic_alias: Option<u16>,
    pub subscription_identifier: bool,
    /// Session expiry interval (CONNECT).
    pub session_expiry: Option<u32>,
}

impl Properties {
    /// Whether the block holds any property at all (a lone 0x00 length holds none).
    pub fn is_empty(&self) -> bool {
        self.block.len() <= 1
    }
}

/// Walks a v5 property block, checking each property's shape.
fn properties(r: &mut Reader<'_>) -> Result<Properties, Malformed> {
    let start = r.pos;
    let len = r.varint()?;
    let end = r.pos.checked_add(len).ok_or(Malformed::BadProperties)?;
    if end > r.buf.len() {
        return Err(Malformed::BadProperties);
    }
    let mut p = Properties::default();
    while r.pos < end {
        let id = r.u8()?;
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => {
                r.u8()?;
            }
            // Two-byte integer; 0x23 is the topic alias.
            0x13 | 0x21 | 0x22 => {
                r.u16()?;
            }
            0x23 => p.topic_alias = Some(r.u16()?),
            0x11 => {
                let b = r.take(4)?;
                p.session_expiry = Some(u32::from_be_bytes([
                    r.buf[b.start],
                    r.buf[b.start + 1],
                    r.buf[b.start + 2],
                    r.buf[b.start + 3],
                ]));
            }
            // Four-byte integer.
            0x02 | 0x18 | 0x27 => {
                r.take(4)?;
            }
            // Variable byte integer: subscription identifier.
            0x0b => {
                r.varint()?;
                p.subscription_identifier = true;
            }
            // UTF-8 string.
            0x03 | 0x08 | 0x12 | 0x15 | 0x1a | 0x1c | 0x1f => {
                r.string().map_err(|_| Malformed::BadProperties)?;
            }
            // Binary data.
            0x09 | 0x16 => {
                r.field()?;
            }
            // UTF-8 string pair (user property).
            0x26 => {
                r.string().map_err(|_| Malformed::BadProperties)?;
                r.string().map_err(|_| Malformed::BadProperties)?;
            }
            _ => return Err(Malformed::BadProperties),
        }
    }
    if r.pos != end {
        return Err(Malformed::BadProperties);
    }
    p.block = start..end;
    Ok(p)
}

/// What the front needs from a CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect<'a> {
    /// 4 (MQTT 3.1.1) or 5.
    pub level: u8,
    pub clean: bool,
    /// MQTT 5 session expiry interval in seconds (0 when absent, and on 3.1.1).
    pub session_expiry: u32,
    pub keep_alive: u16,
    /// Offset of the keep-alive's two bytes in the packet (it may be rewritten in place).
    pub keep_alive_at: usize,
    pub client_id: &'a str,
    pub will: Option<Will<'a>>,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5: the will's property block when it holds any property.
    pub properties: Option<Range<usize>>,
}

/// A CONNECT whose protocol level is neither 4 nor 5 (answered with CONNACK 0x01 on 3.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedLevel(pub u8);

pub enum ConnectError {
    Malformed(Malformed),
    Level(UnsupportedLevel),
}

impl From<Malformed> for ConnectError {
    fn from(m: Malformed) -> Self {
        ConnectError::Malformed(m)
    }
}

/// Parses a whole CONNECT packet (`pkt` starts at its fixed header).
pub fn connect<'a>(pkt: &'a [u8], f: &Frame) -> Result<Connect<'a>, ConnectError> {
    if f.kind() != CONNECT {
        return Err(Malformed::ConnectOrder.into());
    }
    if f.flags() != 0 {
        return Err(Malformed::BadFlags.into());
    }
    let mut r = Reader::new(pkt, f.header_len);
    let name = r.field().map_err(|_| Malformed::BadConnect)?;
    let level = r.u8()?;
    match (&pkt[name], level) {
        (b"MQTT", 4 | 5) => {}
        (b"MQTT", l) | (b"MQIsdp", l) => return Err(ConnectError::Level(UnsupportedLevel(l))),
        _ => return Err(Malformed::BadConnect.into()),
    }
    let flags = r.u8()?;
    let keep_alive_at = r.pos;
    let keep_alive = r.u16()?;
    let session_expiry = if level == 5 {
        properties(&mut r)?.session_expiry.unwrap_or(0)
    } else {
        0
    };
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    let bad_flags = flags & 0x01 != 0
        || will_qos == 3
        || (!will_flag && (will_qos != 0 || will_retain))
        || (level == 4 && has_password && !has_username);
    if bad_flags {
        return Err(Malformed::BadConnect.into());
    }
    let client_id = r.string().map_err(|_| Malformed::BadConnect)?;
    let will = if will_flag {
        let properties = if level == 5 {
            Some(properties(&mut r)?)
                .filter(|p| !p.is_empty())
                .map(|p| p.block)
        } else {
            None
        };
        let topic = r.string()?;
        crate::config::topic::valid_topic(topic).map_err(|_| Malformed::BadTopic)?;
        let payload = r.field()?;
        Some(Will {
            topic,
            payload: &pkt[payload],
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string().map_err(|_| Malformed::BadConnect)?)
    } else {
        None
    };
    let password = if has_password {
        Some(&pkt[r.field()?])
    } else {
        None
    };
    if r.left() != 0 {
        return Err(Malformed::BadConnect.into());
    }
    Ok(Connect {
        level,
        clean: flags & 0x02 != 0,
        session_expiry,
        keep_alive,
        keep_alive_at,
        client_id,
        will,
        username,
        password,
    })
}

/// What the front needs from a PUBLISH.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub qos: u8,
    pub retain: bool,
    /// Range of the topic name's bytes (may be empty on MQTT 5 with a topic alias).
    pub topic: Range<usize>,
    /// Range of the topic's two-byte length prefix and the topic.
    pub topic_field: Range<usize>,
    pub properties: Option<Properties>,
    pub payload: Range<usize>,
}

/// Parses and checks a PUBLISH (`pkt` is the whole packet).
pub fn publish(pkt: &[u8], f: &Frame, level: u8) -> Result<Publish, Malformed> {
    let qos = (f.flags() >> 1) & 0x03;
    if qos == 3 || (qos == 0 && f.flags() & 0x08 != 0) {
        return Err(Malformed::BadQos);
    }
    let mut r = Reader::new(pkt, f.header_len);
    let field_start = r.pos;
    let topic = r.field()?;
    let topic_field = field_start..topic.end;
    let text = std::str::from_utf8(&pkt[topic.clone()]).map_err(|_| Malformed::BadTopic)?;
    if qos > 0 && r.u16()? == 0 {
        return Err(Malformed::ZeroPacketId);
    }
    let properties = if level == 5 {
        let p = properties(&mut r)?;
        if p.subscription_identifier {
            return Err(Malformed::BadProperties);
        }
        if p.topic_alias == Some(0) {
            return Err(Malformed::BadTopicAlias);
        }
        Some(p)
    } else {
        None
    };
    let aliased = properties.as_ref().is_some_and(|p| p.topic_alias.is_some());
    if !(text.is_empty() && aliased) {
        crate::config::topic::valid_topic(text).map_err(|_| Malformed::BadTopic)?;
    }
    Ok(Publish {
        qos,
        retain: f.flags() & 0x01 != 0,
        topic,
        topic_field,
        properties,
        payload: r.pos..pkt.len(),
    })
}

/// The filters of a SUBSCRIBE or UNSUBSCRIBE, after checking it, each with the range of its
/// entry (filter field and, in a SUBSCRIBE, its options byte).
pub fn filters<'a>(
    pkt: &'a [u8],
    f: &Frame,
    level: u8,
) -> Result<Vec<(&'a str, Range<usize>)>, Malformed> {
    if f.flags() != 0x02 {
        return Err(Malformed::BadFlags);
    }
    let subscribe = f.kind() == SUBSCRIBE;
    let mut r = Reader::new(pkt, f.header_len);
    if r.u16()? == 0 {
        return Err(Malformed::ZeroPacketId);
    }
    if level == 5 {
        let p = properties(&mut r)?;
        if !subscribe && p.subscription_identifier {
            return Err(Malformed::BadProperties);
        }
    }
    let mut out = Vec::new();
    while r.left() > 0 {
        let start = r.pos;
        let filter = r.string()?;
        crate::config::topic::valid_filter(filter).map_err(|_| Malformed::BadTopic)?;
        if subscribe {
            let options = r.u8()?;
            let reserved = if level == 5 { 0xc0 } else { 0xfc };
            if options & reserved != 0 || options & 0x03 == 3 || (options >> 4) & 0x03 == 3 {
                return Err(Malformed::BadSubscription);
            }
        }
        out.push((filter, start..r.pos));
    }
    if out.is_empty() {
        return Err(Malformed::BadSubscription);
    }
    Ok(out)
}

/// The packet identifier of a SUBSCRIBE, SUBACK (or any packet that starts with one).
pub fn packet_id(pkt: &[u8], f: &Frame) -> Option<u16> {
    let b = pkt.get(f.header_len..f.header_len + 2)?;
    Some(u16::from(b[0]) << 8 | u16::from(b[1]))
}

/// A SUBACK with the given reason codes and no properties.
pub fn suback(pkid: u16, level: u8, codes: &[u8]) -> Vec<u8> {
    let props = usize::from(level == 5);
    let mut out = vec![0x90];
    encode_length(2 + props + codes.len(), &mut out);
    out.extend_from_slice(&pkid.to_be_bytes());
    if props == 1 {
        out.push(0);
    }
    out.extend_from_slice(codes);
    out
}

/// rumqttd's SUBACK for a SUBSCRIBE the front cut down to its allowed filters, with `code` put
/// back at the positions of the filters it removed (`denied`, ascending, out of `total`).
/// `None` when the SUBACK does not have one code per forwarded filter.
pub fn suback_with_denied(
    pkt: &[u8],
    f: &Frame,
    level: u8,
    total: usize,
    denied: &[usize],
    code: u8,
) -> Option<Vec<u8>> {
    let mut r = Reader::new(pkt, f.header_len + 2);
    if level == 5 {
        properties(&mut r).ok()?;
    }
    let props = f.header_len + 2..r.pos;
    let granted = &pkt[r.pos..];
    if granted.len() + denied.len() != total {
        return None;
    }
    let mut codes = Vec::with_capacity(total);
    let mut g = granted.iter();
    for i in 0..total {
        if denied.contains(&i) {
            codes.push(code);
        } else {
            codes.push(*g.next()?);
        }
    }
    let mut out = vec![f.header];
    encode_length(2 + props.len() + codes.len(), &mut out);
    out.extend_from_slice(&pkt[f.header_len..f.header_len + 2]);
    out.extend_from_slice(&pkt[props]);
    out.extend_from_slice(&codes);
    Some(out)
}

/// Checks a packet the front passes on without decoding: its type, flags and fixed lengths.
pub fn check_other(pkt: &[u8], f: &Frame, level: u8) -> Result<(), Malformed> {
    let remaining = f.len - f.header_len;
    let flags_ok = match f.kind() {
        PUBACK | PUBREC | PUBCOMP | PINGREQ | DISCONNECT => f.flags() == 0,
        PUBREL => f.flags() == 0x02,
        CONNECT => return Err(Malformed::ConnectOrder),
        _ => return Err(Malformed::BadType),
    };
    if !flags_ok {
        return Err(Malformed::BadFlags);
    }
    let len_ok = match (f.kind(), level) {
        (PINGREQ, _) | (DISCONNECT, 4) => remaining == 0,
        (DISCONNECT, _) => true,
        (_, 4) => remaining == 2,
        _ => remaining >= 2,
    };
    if !len_ok {
        return Err(Malformed::Truncated);
    }
    if matches!(f.kind(), PUBACK | PUBREC | PUBREL | PUBCOMP) {
        let id = u16::from(pkt[f.header_len]) << 8 | u16::from(pkt[f.header_len + 1]);
        if id == 0 {
            return Err(Malformed::ZeroPacketId);
        }
        if level == 5 && remaining > 3 {
            let mut r = Reader::new(pkt, f.header_len + 3);
            properties(&mut r)?;
            if r.left() != 0 {
                return Err(Malformed::Truncated);
            }
        }
    }
    if f.kind() == DISCONNECT && level == 5 && remaining > 1 {
        let mut r = Reader::new(pkt, f.header_len + 1);
        properties(&mut r)?;
        if r.left() != 0 {
            return Err(Malformed::Truncated);
        }
    }
    Ok(())
}

/// Encodes an MQTT remaining length.
pub fn encode_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// The packet with byte ranges replaced (`edits` sorted, not overlapping, absolute offsets
/// past the fixed header) and its remaining length re-encoded. Used only where the original
/// bytes cannot be forwarded: properties that would crash rumqttd, a topic alias to resolve.
pub fn splice(pkt: &[u8], f: &Frame, edits: &[(Range<usize>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::with_capacity(pkt.len());
    let mut at = f.header_len;
    for (range, with) in edits {
        body.extend_from_slice(&pkt[at..range.start]);
        body.extend_from_slice(with);
        at = range.end;
    }
    body.extend_from_slice(&pkt[at..]);
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(f.header);
    encode_length(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkt(header: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![header];
        encode_length(body.len(), &mut v);
        v.extend_from_slice(body);
        v
    }

    fn str_field(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn a_frame_needs_all_its_bytes_and_refuses_long_or_padded_lengths() {
        assert_eq!(frame(&[0x30], 100), Ok(None));
        assert_eq!(frame(&[0x30, 3, 0, 1], 100), Ok(None));
        let f = frame(&[0x30, 3, 0, 1, b'a', 0xff], 100)
            .expect("valid")
            .expect("whole");
        assert_eq!((f.header_len, f.len), (2, 5));
        assert_eq!(
            frame(&[0x30, 0xff, 0xff, 0xff, 0xff, 1], usize::MAX),
            Err(Malformed::BadLength)
        );
        assert_eq!(frame(&[0x30, 0x80, 0x00], 100), Err(Malformed::BadLength));
        assert_eq!(frame(&[0x30, 0x80, 0x01], 100), Err(Malformed::TooLarge));
    }

    #[test]
    fn a_connect_is_parsed_and_its_keep_alive_located() {
        let mut body = str_field("MQTT");
        body.extend_from_slice(&[4, 0xc2, 0, 0]);
        body.extend(str_field("dev1"));
        body.extend(str_field("user"));
        body.extend(str_field("pw"));
        let p = pkt(0x10, &body);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        let Ok(c) = connect(&p, &f) else {
            panic!("CONNECT refused")
        };
        assert_eq!(c.level, 4);
        assert_eq!(c.keep_alive, 0);
        assert_eq!(&p[c.keep_alive_at..c.keep_alive_at + 2], &[0, 0]);
        assert_eq!(c.username, Some("user"));
        assert_eq!(c.password, Some(&b"pw"[..]));
        assert_eq!(c.client_id, "dev1");
    }

    #[test]
    fn a_v5_connect_reports_its_session_expiry_and_clean_start() {
        // Properties: receive maximum 10, session expiry 3600 s.
        let mut body = str_field("MQTT");
        body.extend_from_slice(&[5, 0x02, 0, 30, 8, 0x21, 0, 10, 0x11, 0, 0, 0x0e, 0x10]);
        body.extend(str_field("dev1"));
        let p = pkt(0x10, &body);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        let Ok(c) = connect(&p, &f) else {
            panic!("CONNECT refused")
        };
        assert!(c.clean);
        assert_eq!(c.session_expiry, 3600);
        assert_eq!(c.keep_alive, 30);

        let mut body = str_field("MQTT");
        body.extend_from_slice(&[5, 0x00, 0, 30, 0]);
        body.extend(str_field("dev1"));
        let p = pkt(0x10, &body);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        let Ok(c) = connect(&p, &f) else {
            panic!("CONNECT refused")
        };
        assert!(!c.clean);
        assert_eq!(c.session_expiry, 0, "absent means 0");
    }

    #[test]
    fn a_connect_with_trailing_bytes_or_the_reserved_flag_is_malformed() {
        let mut body = str_field("MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 60]);
        body.extend(str_field("dev1"));
        let mut trailing = body.clone();
        trailing.push(0);
        let p = pkt(0x10, &trailing);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        assert!(matches!(
            connect(&p, &f),
            Err(ConnectError::Malformed(Malformed::BadConnect))
        ));
        let mut reserved = body.clone();
        reserved[7] |= 0x01;
        let p = pkt(0x10, &reserved);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        assert!(matches!(
            connect(&p, &f),
            Err(ConnectError::Malformed(Malformed::BadConnect))
        ));
    }

    #[test]
    fn publish_topics_with_wildcards_or_empty_are_refused_but_an_alias_may_stand_for_one() {
        for (topic, ok) in [("a/b", true), ("a/#", false), ("a/+", false), ("", false)] {
            let mut body = str_field(topic);
            body.extend_from_slice(&[0, 1]);
            let p = pkt(0x32, &body);
            let f = frame(&p, 1000).expect("valid").expect("whole");
            assert_eq!(publish(&p, &f, 4).is_ok(), ok, "{topic}");
        }
        let mut body = str_field("");
        body.extend_from_slice(&[0, 1, 3, 0x23, 0, 7]);
        let p = pkt(0x32, &body);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        let parsed = publish(&p, &f, 5).expect("aliased publish");
        assert_eq!(parsed.properties.and_then(|pr| pr.topic_alias), Some(7));
    }

    #[test]
    fn stripping_properties_keeps_topic_packet_id_and_payload() {
        // Properties: payload format indicator (2 bytes) and message expiry (5 bytes).
        let mut body = str_field("a/b");
        body.extend_from_slice(&[0, 9, 7, 0x01, 1, 0x02, 0, 0, 0, 5]);
        body.extend_from_slice(b"hello");
        let p = pkt(0x33, &body);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        let parsed = publish(&p, &f, 5).expect("valid publish");
        let block = parsed.properties.expect("v5 has a block").block;
        let out = splice(&p, &f, &[(block, &[0])]);
        let mut want = str_field("a/b");
        want.extend_from_slice(&[0, 9, 0]);
        want.extend_from_slice(b"hello");
        assert_eq!(out, pkt(0x33, &want));
    }

    #[test]
    fn subscribe_needs_its_flags_a_filter_and_clean_options() {
        let mut body = vec![0, 1];
        body.extend(str_field("a/#"));
        body.push(1);
        let good = pkt(0x82, &body);
        let f = frame(&good, 1000).expect("valid").expect("whole");
        let parsed = filters(&good, &f, 4).expect("valid SUBSCRIBE");
        assert_eq!(parsed, vec![("a/#", 4..10)]);
        let bad_flags = pkt(0x80, &body);
        let f = frame(&bad_flags, 1000).expect("valid").expect("whole");
        assert_eq!(filters(&bad_flags, &f, 4), Err(Malformed::BadFlags));
        let mut bad_opts = body.clone();
        *bad_opts.last_mut().expect("non-empty") = 0x04;
        let p = pkt(0x82, &bad_opts);
        let f = frame(&p, 1000).expect("valid").expect("whole");
        assert_eq!(filters(&p, &f, 4), Err(Malformed::BadSubscription));
        let empty = pkt(0x82, &[0, 1]);
        let f = frame(&empty, 1000).expect("valid").expect("whole");
        assert_eq!(filters(&empty, &f, 4), Err(Malformed::BadSubscription));
    }

    #[test]
    fn a_suback_gets_the_denied_codes_back_in_their_places() {
        let rumqttd = [0x90, 4, 0, 7, 1, 0];
        let f = frame(&rumqttd, 100).expect("valid").expect("whole");
        let out = suback_with_denied(&rumqttd, &f, 4, 4, &[0, 2], 0x80);
        assert_eq!(out, Some(vec![0x90, 6, 0, 7, 0x80, 1, 0x80, 0]));
        let v5 = [0x90, 5, 0, 7, 0, 1, 0];
        let f = frame(&v5, 100).expect("valid").expect("whole");
        let out = suback_with_denied(&v5, &f, 5, 3, &[2], 0x87);
        assert_eq!(out, Some(vec![0x90, 6, 0, 7, 0, 1, 0, 0x87]));
        assert_eq!(suback_with_denied(&v5, &f, 5, 4, &[2], 0x87), None);
        assert_eq!(suback(9, 5, &[0x87]), vec![0x90, 4, 0, 9, 0, 0x87]);
    }

    #[test]
    fn fixed_packets_are_checked_for_flags_length_and_packet_id() {
        let cases: &[(&[u8], u8, Result<(), Malformed>)] = &[
            (&[0xc0, 0], 4, Ok(())),
            (&[0xc1, 0], 4, Err(Malformed::BadFlags)),
            (&[0xc0, 1, 0], 4, Err(Malformed::Truncated)),
            (&[0x62, 2, 0, 1], 4, Ok(())),
            (&[0x60, 2, 0, 1], 4, Err(Malformed::BadFlags)),
            (&[0x40, 2, 0, 0], 4, Err(Malformed::ZeroPacketId)),
            (&[0x40, 3, 0, 1, 0], 5, Ok(())),
            (&[0x20, 2, 0, 0], 4, Err(Malformed::BadType)),
            (&[0xf0, 0], 5, Err(Malformed::BadType)),
            (&[0xe0, 0], 4, Ok(())),
            (&[0xe0, 1, 0], 4, Err(Malformed::Truncated)),
        ];
        for (bytes, level, want) in cases {
            let f = frame(bytes, 1000).expect("valid").expect("whole");
            assert_eq!(check_other(bytes, &f, *level), *want, "{bytes:02x?}");
        }
    }
}
