//! The CPU ring's connection handshake: 112 bytes from whoever connects
//! (or answers), decoded and checked (HMAC under the round's secret, then
//! kind, round, rank and world size).
//!
//! Input: one byte (whether to sign the handshake with the test secret, so
//! the checks after authentication are reached), then the handshake bytes.
#![no_main]

use kiln_trainer::collective::ring::RingSecret;
use kiln_trainer::collective::ring::fuzzing::{
    HANDSHAKE_LEN, HANDSHAKE_MAGIC, check_handshake, sign,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = [0u8; HANDSHAKE_LEN];
    let n = rest.len().min(HANDSHAKE_LEN);
    bytes[..n].copy_from_slice(&rest[..n]);
    if flags & 1 == 1 {
        // A valid magic too, or little gets past the first check.
        bytes[..8].copy_from_slice(&HANDSHAKE_MAGIC);
    }
    let secret = RingSecret::from_bytes(&[7u8; 32]).expect("32 bytes");
    if flags & 2 == 2 {
        sign(&mut bytes, &secret);
    }
    let _ = check_handshake(&bytes, &secret, 5, 1, 4);
});
