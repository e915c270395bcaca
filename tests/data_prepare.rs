//! End-to-end tests of `kiln data prepare`: the real binary on small texts.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .env("KILN_LOG", "warn")
        .args(args)
        .output()
        .unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn prepare_writes_the_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("corpus.txt");
    std::fs::write(
        &text,
        "It was a dark and stormy night; the kiln glowed.\n".repeat(40),
    )
    .unwrap();
    let data = dir.path().join("data");

    let out = kiln(&[
        "data",
        "prepare",
        path(&text),
        "--out",
        path(&data),
        "--val-fraction",
        "0.2",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "kiln data prepare failed: {}",
        stderr(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {stdout}"));
    let meta = &report["meta"];
    let (train, val) = (
        meta["train_tokens"].as_u64().unwrap(),
        meta["val_tokens"].as_u64().unwrap(),
    );
    assert_eq!(train + val, 40 * 49, "one byte token per byte: {report}");
    assert_eq!(val, (40.0_f64 * 49.0 * 0.2).round() as u64);
    assert_eq!(meta["vocab_size"], 256);
    assert_eq!(meta["token_dtype"], "uint16");
    assert_eq!(meta["tokenizer"], "byte");

    for name in ["train.bin", "val.bin", "tokenizer.json", "meta.json"] {
        assert!(data.join(name).is_file(), "{name} missing");
    }
    assert_eq!(
        std::fs::metadata(data.join("train.bin")).unwrap().len(),
        train * 2
    );
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(&on_disk, meta);

    // Without --json: a readable summary.
    let out = kiln(&[
        "data",
        "prepare",
        path(&text),
        "--out",
        path(&data),
        "--train-bpe",
        "300",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("bpe tokenizer") && stdout.contains("train.bin"),
        "{stdout}"
    );
}

#[test]
fn bad_inputs_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let missing = dir.path().join("no-such-corpus.txt");
    let out = kiln(&["data", "prepare", path(&missing), "--out", path(&data)]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("error: prepare data: text file") && e.contains("no-such-corpus.txt: not found"),
        "{e}"
    );

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let out = kiln(&["data", "prepare", path(&empty), "--out", path(&data)]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(e.contains("empty.txt: empty or only whitespace"), "{e}");
    assert!(!data.exists(), "nothing is written for bad inputs");

    // --tokenizer and --train-bpe exclude each other (a usage error from clap).
    let out = kiln(&[
        "data",
        "prepare",
        path(&empty),
        "--out",
        path(&data),
        "--tokenizer",
        "byte",
        "--train-bpe",
        "300",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}
