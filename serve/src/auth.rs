//! Bearer tokens: who may infer and who may manage.
//!
//! - Health (`/v2/health/*`, gRPC `ServerLive`/`ServerReady`) and `/metrics`
//!   are open: probes and scrapers carry no secrets, and neither reveals
//!   data or changes anything.
//! - Inference and metadata require the inference token when one is set
//!   (`Authorization: Bearer TOKEN`; gRPC metadata `authorization`). The
//!   management token is accepted there too.
//! - Management (`/v2/repository/...`) requires the management token when one
//!   is set; without one it is accepted from loopback clients only, so a
//!   server listening on a public address cannot be reconfigured from outside
//!   by accident.

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

/// Checks a management request: its token if one is set, else that it comes
/// from a loopback address.
pub fn check_admin(
    tokens: &Tokens,
    authorization: Option<&str>,
    peer: Option<SocketAddr>,
) -> Result<(), RequestError> {
    match &tokens.admin {
        Some(want) => match bearer(authorization) {
            Some(got) if same(got, want) => Ok(()),
            _ => Err(unauthorized("management")),
        },
        None if peer.is_some_and(|p| p.ip().is_loopback()) => Ok(()),
        None => Err(RequestError::new(
            ErrorKind::Forbidden,
            "management is allowed from loopback clients only unless a management token is set (KILN_SERVE_ADMIN_TOKEN or --admin-token-file)",
        )),
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

    #[test]
    fn management_is_loopback_only_without_a_token() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let open = tokens(Some("abc"), None);
        assert!(check_admin(&open, None, Some(local)).is_ok());
        assert_eq!(
            check_admin(&open, Some("Bearer abc"), Some(remote))
                .unwrap_err()
                .kind,
            ErrorKind::Forbidden
        );
        let t = tokens(None, Some("root"));
        assert!(check_admin(&t, Some("Bearer root"), Some(remote)).is_ok());
        assert_eq!(
            check_admin(&t, None, Some(local)).unwrap_err().kind,
            ErrorKind::Unauthorized
        );
    }
}
