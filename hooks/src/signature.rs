//! Webhook signatures: HMAC-SHA256 over `"<timestamp>.<body>"`.
//!
//! A signed delivery carries `X-Kiln-Timestamp: <unix seconds>` and
//! `X-Kiln-Signature: sha256=<lowercase hex>`. Signing the timestamp with the
//! body lets a receiver refuse old deliveries replayed by someone who captured
//! one (docs/hooks.md).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of `X-Kiln-Signature`'s value, naming the scheme.
pub const SIGNATURE_PREFIX: &str = "sha256=";

fn mac_over(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(secret).expect("hmac takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Kiln-Signature` value for `body` sent at `timestamp` (Unix seconds,
/// as written in `X-Kiln-Timestamp`): `sha256=` and the hex HMAC-SHA256 of
/// `"<timestamp>.<body>"` keyed with `secret`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let tag = mac_over(secret, timestamp, body).finalize().into_bytes();
    format!("{SIGNATURE_PREFIX}{}", hex::encode(tag))
}

/// Whether `header` (an `X-Kiln-Signature` value) is the signature of `body`
/// sent at `timestamp` under `secret`. The comparison takes constant time.
/// Malformed headers (no `sha256=` prefix, bad hex, wrong length) are `false`.
///
/// This checks authenticity only; a receiver should also refuse timestamps far
/// from its own clock (replays) and drop repeated `X-Kiln-Delivery` ids.
pub fn verify_signature(secret: &[u8], timestamp: &str, body: &[u8], header: &str) -> bool {
    let Some(hex_tag) = header.trim().strip_prefix(SIGNATURE_PREFIX) else {
        return false;
    };
    let Ok(tag) = hex::decode(hex_tag) else {
        return false;
    };
    mac_over(secret, timestamp, body).verify_slice(&tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_rfc_4231_test_case_2() {
        // Pin the primitive with RFC 4231's test case 2 ...
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // ... then the scheme's layout: the MAC of "<timestamp>.<body>".
        let direct = {
            let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
            mac.update(b"1700000000.{\"a\":1}");
            format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
        };
        assert_eq!(sign(b"Jefe", "1700000000", b"{\"a\":1}"), direct);
    }

    #[test]
    fn verifies_its_own_signatures_and_nothing_else() {
        let body = br#"{"kind":"job.finished"}"#;
        let header = sign(b"s3cret", "1700000000", body);
        assert!(verify_signature(b"s3cret", "1700000000", body, &header));
        assert!(verify_signature(
            b"s3cret",
            "1700000000",
            body,
            &format!(" {header} ")
        ));
        assert!(!verify_signature(b"other", "1700000000", body, &header));
        assert!(!verify_signature(b"s3cret", "1700000001", body, &header));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            br#"{"kind":"job.failed"}"#,
            &header
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            body,
            header.trim_start_matches("sha256=")
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            body,
            "sha256=zz"
        ));
        assert!(!verify_signature(
            b"s3cret",
            "1700000000",
            body,
            &header[..header.len() - 2]
        ));
        assert!(!verify_signature(b"s3cret", "1700000000", body, ""));
    }
}
