//! Bearer tokens: who may infer and who may manage.
//!
//! - Health (`/v2/health/*`, gRPC `ServerLive`/`ServerReady`) and `/metrics`
//!   are open: probes and scrapers carry no secrets, and neither reveals
//!   data or changes anything.
//! - Inference and metadata require the inference token when one is set
//!   (`Authorization: Bearer TOKEN`; gRPC metadata `authorization`). The
//!   management token is accepted there too.
//! - Management (`/v2/repository/...`) requires the management token when one
//!   is set. Without one it is accepted only when nothing but this machine
//!   can reach it: the server listens on a loopback address, the client is on
//!   loopback, and the request carries no `Forwarded` / `X-Forwarded-For` /
//!   `X-Real-IP` header (a reverse proxy on this machine would make every
//!   remote client look local). A server listening on any other address
//!   (`0.0.0.0`, a public IP) needs the management token for management, so
//!   it cannot be reconfigured from outside by accident. A token-less
//!   management request must also name a loopback host (`Host` or HTTP/2
//!   `:authority`: `localhost`, a loopback IP, `[::1]`), else 421 Misdirected
//!   Request: a web page whose DNS name an attacker rebinds to 127.0.0.1
//!   reaches a loopback listener from the visitor's browser, but it still
//!   names the attacker's host ([`kiln_proto::http_host`], the dashboard's
//!   check too).
//! - Management POSTs must be `Content-Type: application/json` (checked in
//!   `http.rs`): a browser sends a cross-site form post or a no-CORS fetch
//!   without a preflight only with a form or text content type, so a web
//!   page cannot drive a token-less local server through its visitor.

use std::net::SocketAddr;

use crate::config::Tokens;
use crate::error::{ErrorKind, RequestError};

/// The token of an `Authorization: Bearer TOKEN` value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let value = value?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares without an early exit, so timing does not reveal how much of a
/// guess was right.
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

fn unauthorized(what: &str) -> RequestError {
    RequestError::new(
        ErrorKind::Unauthorized,
        format!(
            "{what} requires a bearer token (Authorization: Bearer TOKEN); none or a wrong one was given"
        ),
    )
}

/// Checks an inference or metadata request's `authorization` value.
pub fn check_inference(tokens: &Tokens, authorization: Option<&str>) -> Result<(), RequestError> {
    let Some(want) = &tokens.inference else {
        return Ok(());
    };
    match bearer(authorization) {
        Some(got) if same(got, want) => Ok(()),
        Some(got) if tokens.admin.as_deref().is_some_and(|a| same(got, a)) => Ok(()),
        _ => Err(unauthorized("inference")),
    }
}

/// Where a management request came from, for [`check_admin`].
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The client's address (the TCP peer).
    pub peer: SocketAddr,
    /// Whether the server listens on a loopback address only.
    pub listener_loopback: bool,
    /// Whether the request carries `Forwarded`, `X-Forwarded-For` or
    /// `X-Real-IP`: it came through a proxy, so the peer says nothing about
    /// the client.
    pub forwarded: bool,
    /// The host the request names: its `Host` header, else (HTTP/2) its
    /// `:authority`; `None` when it names none.
    pub host: Option<&'a str>,
}

/// Checks a management request: its token if one is set; else that only
/// this machine can have sent it (see the module docs).
pub fn check_admin(
    tokens: &Tokens,
    authorization: Option<&str>,
    origin: Origin<'_>,
) -> Result<(), RequestError> {
    if let Some(want) = &tokens.admin {
        return match bearer(authorization) {
            Some(got) if same(got, want) => Ok(()),
            _ => Err(unauthorized("management")),
        };
    }
    let refuse = |why: &str| {
        Err(RequestError::new(
            ErrorKind::Forbidden,
            format!(
                "management without a management token (KILN_SERVE_ADMIN_TOKEN or --admin-token-file) is allowed only from this machine to a server listening on loopback; {why}"
            ),
        ))
    };
    if !origin.listener_loopback {
        refuse("this server listens on a non-loopback address")
    } else if origin.forwarded {
        refuse("this request came through a proxy (Forwarded / X-Forwarded-For)")
    } else if !origin.peer.ip().is_loopback() {
        refuse("this client is not on loopback")
    } else if !origin.host.is_some_and(kiln_proto::http_host::is_loopback) {
        Err(RequestError::new(
            ErrorKind::Misdirected,
            format!(
                "this server listens on a loopback address and answers management without a management token only for localhost, 127.0.0.1 or [::1], not {:?} (a DNS name rebound to this machine?)",
                origin.host.unwrap_or_default()
            ),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(inference: Option<&str>, admin: Option<&str>) -> Tokens {
        Tokens {
            inference: inference.map(String::from),
            admin: admin.map(String::from),
        }
    }

    #[test]
    fn inference_token() {
        let open = tokens(None, None);
        assert!(check_inference(&open, None).is_ok());
        let t = tokens(Some("abc"), Some("root"));
        assert!(check_inference(&t, Some("Bearer abc")).is_ok());
        assert!(check_inference(&t, Some("bearer  abc ")).is_ok());
        assert!(check_inference(&t, Some("Bearer root")).is_ok());
        for bad in [
            None,
            Some("abc"),
            Some("Bearer ab"),
            Some("Bearer abcd"),
            Some("Basic abc"),
        ] {
            let e = check_inference(&t, bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Unauthorized, "{bad:?}");
        }
    }

    fn origin(peer: &str, listener_loopback: bool, forwarded: bool) -> Origin<'static> {
        Origin {
            peer: peer.parse().unwrap(),
            listener_loopback,
            forwarded,
            host: Some("127.0.0.1:8000"),
        }
    }

    #[test]
    fn management_without_a_token_only_from_this_machine() {
        let open = tokens(Some("abc"), None);
        let local = origin("127.0.0.1:5000", true, false);
        assert!(check_admin(&open, None, local).is_ok());
        assert!(check_admin(&open, None, origin("[::1]:5000", true, false)).is_ok());
        for (o, why) in [
            (origin("10.1.2.3:5000", true, false), "not on loopback"),
            (
                origin("127.0.0.1:5000", false, false),
                "non-loopback address",
            ),
            (origin("127.0.0.1:5000", true, true), "proxy"),
        ] {
            let e = check_admin(&open, Some("Bearer abc"), o).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Forbidden, "{o:?}");
            assert!(e.message.contains(why), "{o:?}: {e}");
        }
    }

    #[test]
    fn the_management_token_is_required_wherever_it_is_set() {
        let t = tokens(None, Some("root"));
        for o in [
            origin("10.1.2.3:5000", false, false),
            origin("127.0.0.1:5000", false, true),
            origin("127.0.0.1:5000", true, false),
        ] {
            assert!(check_admin(&t, Some("Bearer root"), o).is_ok(), "{o:?}");
            for bad in [None, Some("Bearer abc"), Some("root")] {
                let e = check_admin(&t, bad, o).unwrap_err();
                assert_eq!(e.kind, ErrorKind::Unauthorized, "{o:?} {bad:?}");
            }
        }
    }

    #[test]
    fn management_without_a_token_needs_a_loopback_host_name() {
        let open = tokens(None, None);
        let named = |host| Origin {
            host,
            ..origin("127.0.0.1:5000", true, false)
        };
        for host in [
            "localhost:8000",
            "127.0.0.1:8000",
            "[::1]:8000",
            "LOCALHOST",
        ] {
            assert!(
                check_admin(&open, None, named(Some(host))).is_ok(),
                "{host}"
            );
        }
        for host in [
            Some("evil.example:8000"),
            Some("localhost.evil.example:8000"),
            Some(""),
            None,
        ] {
            let e = check_admin(&open, None, named(host)).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Misdirected, "{host:?}");
            assert_eq!(e.status(), axum::http::StatusCode::MISDIRECTED_REQUEST);
            assert!(e.message.contains("rebound"), "{e}");
        }
        // A request with the management token is not asked where it was sent.
        let t = tokens(None, Some("root"));
        let rebound = named(Some("evil.example:8000"));
        assert!(check_admin(&t, Some("Bearer root"), rebound).is_ok());
    }
}
