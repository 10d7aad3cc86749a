//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qwen_mk::synthetic::{write_checkpoint, Head, Shape, SyntheticSpec};

pub fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/qwen3-0.6b")
}

pub fn reference_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("reference")
        .join(name)
}

/// A tiny synthetic checkpoint in a fresh temporary directory.
pub fn tiny_checkpoint(seed: u64, tied: bool) -> tempfile::TempDir {
    synthetic_checkpoint(Shape::Tiny, seed, tied)
}

/// A synthetic checkpoint of the real Qwen3-0.6B shape (tied head).
pub fn full_size_checkpoint(seed: u64) -> tempfile::TempDir {
    synthetic_checkpoint(Shape::Qwen3_0_6B, seed, true)
}

fn synthetic_checkpoint(shape: Shape, seed: u64, tied: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = SyntheticSpec {
        shape,
        seed,
        tied,
        head: Head::Random,
    };
    write_checkpoint(dir.path(), &assets(), &spec).expect("write synthetic checkpoint");
    dir
}

/// Runs the qwen-mk binary.
pub fn qwen_mk(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qwen-mk"))
        .args(args)
        .output()
        .expect("run qwen-mk")
}

/// The arguments of `generate --model dir` with `extra` after them.
pub fn generate_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["generate", "--model", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    args
}

/// Runs `generate --model dir` with `extra` after it.
pub fn generate(dir: &Path, extra: &[&str]) -> Output {
    qwen_mk(&generate_args(dir, extra))
}

/// A short prompt, two new tokens, on the CPU backend: a run that works on
/// any machine unless the input is bad.
pub const CPU_PROMPT: &[&str] = &[
    "--prompt",
    "hello there",
    "--max-new-tokens",
    "2",
    "--device",
    "cpu",
];

/// Runs the qwen-mk binary with `input` on its standard input.
pub fn qwen_mk_with_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_qwen-mk"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qwen-mk");
    child
        .stdin
        .take()
        .expect("a pipe to its stdin")
        .write_all(input.as_bytes())
        .expect("write its stdin");
    child.wait_with_output().expect("wait for qwen-mk")
}

/// Asserts a failed run: non-zero exit, exactly one line on stderr that
/// contains `needle`, no panic.
pub fn assert_one_line_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
}

/// Asserts that `stderr`, of a run that reported an error and went on
/// (chat refusing one message), holds exactly one error line, and that it
/// contains every one of `needles`.
pub fn assert_one_error_line_among(stderr: &str, needles: &[&str]) {
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "expected {needle:?} in: {stderr}"
        );
    }
}

/// A tiny checkpoint with one of the argmax test heads.
pub fn tiny_test_head_checkpoint(head: Head) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = SyntheticSpec {
        shape: Shape::Tiny,
        seed: 1,
        tied: false,
        head,
    };
    write_checkpoint(dir.path(), &assets(), &spec).expect("write tiny checkpoint");
    dir
}

/// Runs `qwen-mk generate ... --json`, asserts success, returns the report.
pub fn generate_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = qwen_mk(&all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("generate --json prints JSON")
}

/// A JSON array of token ids.
pub fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("an array of ids")
        .iter()
        .map(|v| v.as_u64().expect("an id") as u32)
        .collect()
}
