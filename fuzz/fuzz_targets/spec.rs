//! The job spec as `kiln run` reads it: TOML text plus `--set` overrides,
//! parsed, resolved and validated; the JSON form workers receive; and the
//! store URL and small field parsers the spec uses.
//!
//! Input: the spec text, then optionally a NUL byte and one override per line.
#![no_main]

use std::path::Path;

use kiln_proto::spec::{JobSpec, parse_time_limit, validate_location};
use kiln_proto::store_url::StoreUrl;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (spec_text, overrides) = match text.split_once('\0') {
        Some((spec, rest)) => (spec, rest.lines().map(str::to_string).collect()),
        None => (text, Vec::new()),
    };
    // A base folder that does not exist: relative paths resolve against it,
    // and files named by the spec are never found (validation must say so).
    let base = Path::new("/nonexistent/kiln-fuzz");
    if let Ok(spec) = JobSpec::from_toml_str(spec_text, base, &overrides) {
        // What a valid spec goes on to: its JSON round trip and the batch
        // arithmetic at other world sizes.
        let json = spec.to_json();
        let back = JobSpec::from_json(&json).expect("a valid spec's json reads back");
        assert_eq!(back.to_json(), json);
        for world in [1, 2, 3, 7, 64, usize::MAX] {
            let _ = spec.micro_batch_at(world);
        }
    }
    let _ = JobSpec::from_json(text);
    let _ = StoreUrl::parse(text);
    let _ = parse_time_limit(text);
    let _ = validate_location("fuzz", text);
});
