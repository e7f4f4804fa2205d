//! The uplink's URL: `Endpoint` (host, port, TLS) and the parser of `mqtt://` / `mqtts://` URLs
//! behind `UplinkConfig::endpoint`.

use std::net::Ipv6Addr;

/// Where the uplink connects, parsed from `uplink.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address (IPv6 without brackets), as given to the socket and to TLS (SNI).
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

/// See `UplinkConfig::endpoint` for the accepted forms.
pub(super) fn parse_endpoint(url: &str) -> Result<Endpoint, String> {
    const FORMS: &str = "expected mqtt://host[:port] or mqtts://host[:port]";
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("`{url}` is not a URL; {FORMS}"))?;
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "mqtt" => (false, 1883),
        "mqtts" => (true, 8883),
        other => {
            return Err(format!(
                "unsupported scheme `{other}://` in `{url}`; {FORMS} (TLS: mqtts://)"
            ))
        }
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#']) {
        return Err(format!("`{url}` has a path or query; {FORMS}"));
    }
    if authority.contains('@') {
        return Err(format!(
            "`{url}` contains credentials; put them in uplink.username / password instead"
        ));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("`{url}`: missing `]` after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("`{ip}` in `{url}` is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("`{url}`: expected `:port` after `]`"))?,
            ),
        };
        (ip, port)
    } else {
        let (host, port) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if host.is_empty() {
            return Err(format!("`{url}` has no host; {FORMS}"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(format!(
                "`{host}` in `{url}` is not a host name or IPv4 address (IPv6 goes in brackets: [::1])"
            ));
        }
        (host, port)
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("`{p}` in `{url}` is not a port (1 to 65535)")),
            Ok(port) => port,
        },
    };
    Ok(Endpoint {
        host: host.to_string(),
        port,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_schemes_hosts_and_default_ports() {
        let ep = parse_endpoint;
        let ok = |host: &str, port, tls| {
            Ok(Endpoint {
                host: host.to_string(),
                port,
                tls,
            })
        };
        assert_eq!(ep("mqtt://localhost"), ok("localhost", 1883, false));
        assert_eq!(
            ep("mqtts://mqtt.example.com"),
            ok("mqtt.example.com", 8883, true)
        );
        assert_eq!(
            ep("mqtts://mqtt.example.com:443/"),
            ok("mqtt.example.com", 443, true)
        );
        assert_eq!(ep("MQTT://10.0.0.5:1884"), ok("10.0.0.5", 1884, false));
        assert_eq!(ep("mqtt://[::1]:1883"), ok("::1", 1883, false));
        assert_eq!(ep("mqtts://[2001:db8::1]"), ok("2001:db8::1", 8883, true));
        for bad in [
            "localhost:1883",
            "http://h",
            "ws://h:80",
            "mqtt://",
            "mqtt://:1883",
            "mqtt://h:0",
            "mqtt://h:65536",
            "mqtt://h:x",
            "mqtt://h/path",
            "mqtt://u:p@h",
            "mqtt://::1:1883",
            "mqtt://[::1",
            "mqtt://[nothex]:1",
            "mqtt://h h",
        ] {
            assert!(ep(bad).is_err(), "{bad} should be refused");
        }
    }
}
