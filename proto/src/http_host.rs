//! HTTP `Host` values: whether a request names this machine's loopback
//! interface.
//!
//! The servers that answer loopback clients without a token (the dashboard,
//! `kiln serve`'s management endpoints) check it against DNS rebinding: a web
//! page whose DNS name an attacker rebinds to 127.0.0.1 is same-origin to the
//! browser, so its requests reach a loopback listener from the visitor's
//! machine, but they still name the attacker's host. Shared here because
//! `kiln-ui` and `kiln-serve` both check it and neither may depend on the
//! other.

use std::net::IpAddr;

/// Whether an HTTP `Host` value (HTTP/1.1 `Host` or HTTP/2 `:authority`, with
/// or without a port) names this machine's loopback interface: `localhost`
/// (any case), a loopback IPv4 address (`127.0.0.0/8`) or `[::1]`. Anything
/// else is refused, the empty value and names that merely start with
/// `localhost` or `127.` (`localhost.evil.example`) included.
pub fn is_loopback(host: &str) -> bool {
    split_port(host).is_some_and(|name| {
        name.eq_ignore_ascii_case("localhost")
            || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    })
}

/// The host name of `host` without its port (and an IPv6 address without
/// its brackets); `None` when what follows the name is not a port.
fn split_port(host: &str) -> Option<&str> {
    let (name, port) = match host.strip_prefix('[') {
        // [::1] or [::1]:8080
        Some(rest) => {
            let (name, tail) = rest.split_once(']')?;
            let port = if tail.is_empty() {
                ""
            } else {
                tail.strip_prefix(':')?
            };
            (name, port)
        }
        None => host.rsplit_once(':').unwrap_or((host, "")),
    };
    port.bytes().all(|b| b.is_ascii_digit()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn only_loopback_names_pass() {
        for host in [
            "localhost",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:41234",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback(host), "{host}");
        }
        for host in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "localhost.evil.example:8080",
            "10.0.0.1:8080",
            "[::2]:80",
            "::1",
            "127.0.0.1.evil.example",
            "[::1].evil.example",
            "[::1]x:80",
            "localhost:80x",
        ] {
            assert!(!is_loopback(host), "{host}");
        }
    }
}
