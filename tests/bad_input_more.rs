//! More bad input (found by an audit, beyond tests/bad_input.rs): each case
//! must end in one line on stderr naming the problem, a non-zero exit, and
//! never a panic, an abort or a run away with the memory.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    assert_one_line_error, generate, generate_args, qwen_mk, tiny_checkpoint, CPU_PROMPT,
};
use qwen_mk::synthetic::{write_checkpoint, Head, Shape, SyntheticSpec, TINY_DIMENSIONS};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_qwen-mk");

/// A copy of the real assets with `edit` applied to config.json.
fn assets_with(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(common::assets()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    edit_json(&dir.path().join("config.json"), edit);
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// A consistent checkpoint (tensors of the shapes its config implies) of a
/// tiny model with `edit` applied to the config: Shape::Qwen3_0_6B takes the
/// assets' config as it is, so the dimensions set here are the ones written.
fn small_checkpoint(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let assets = assets_with(|c| {
        for (key, value) in TINY_DIMENSIONS {
            c[key] = json!(value);
        }
        edit(c);
    });
    let dir = tempfile::tempdir().unwrap();
    let spec = SyntheticSpec {
        shape: Shape::Qwen3_0_6B,
        seed: 1,
        tied: true,
        head: Head::Random,
    };
    write_checkpoint(dir.path(), assets.path(), &spec).unwrap();
    dir
}

/// Runs qwen-mk under a 2 GB address-space limit, so that a run away with
/// the memory fails fast instead of taking the machine down.
fn qwen_mk_limited(args: &[&str]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2000000; exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(args)
        .output()
        .unwrap()
}

fn qwen_mk_with_bytes(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn assert_no_panic(out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    assert_ne!(out.status.code(), Some(101), "panicked: {stderr}");
    assert_ne!(out.status.code(), None, "killed by a signal: {stderr}");
}

// --- checkpoints and their JSON files ---

#[test]
fn prompt_ids_past_the_config_vocabulary() {
    // Real tokenizer (151,669 tokens), config vocab_size 1000: "hello" is id
    // 14990. It was a panic in cpu_reference.rs (embedding row out of range).
    let dir = small_checkpoint(|c| c["vocab_size"] = json!(1000));
    assert_one_line_error(&generate(dir.path(), CPU_PROMPT), "vocab");
    let model = dir.path().to_str().unwrap();
    let chat = qwen_mk_with_bytes(
        &[
            "chat",
            "--model",
            model,
            "--device",
            "cpu",
            "--max-new-tokens",
            "1",
        ],
        b"hello\n",
    );
    assert_no_panic(&chat);
    assert!(!chat.status.success());
}

/// Runs `generate` on the CPU on a tiny checkpoint whose config.json has
/// `edit` applied after its tensors were written.
fn generate_with_config(edit: impl FnOnce(&mut Value)) -> Output {
    let dir = tiny_checkpoint(3, true);
    edit_json(&dir.path().join("config.json"), edit);
    generate(dir.path(), CPU_PROMPT)
}

#[test]
fn kv_heads_must_divide_query_heads() {
    // 4 query heads over 3 KV heads: a panic (slice out of range); 8 KV
    // heads over 4 query heads: a division by zero (group = 4 / 8). The
    // config is refused before its tensors are looked at (synth refuses to
    // write tensors of such a config at all).
    for kv in [3, 8] {
        let out = generate_with_config(|c| c["num_key_value_heads"] = json!(kv));
        assert_one_line_error(&out, "num_key_value_heads");
    }
}

#[test]
fn odd_head_dim_is_refused() {
    // RoPE rotates pairs (d, d + head_dim/2); with an odd head_dim the last
    // dimension is left unrotated (transformers cannot run such a config).
    let out = generate_with_config(|c| c["head_dim"] = json!(15));
    assert_one_line_error(&out, "head_dim must be even");
}

#[test]
fn absurd_layer_count_fails_without_exhausting_memory() {
    // expected_tensors() lists 11 names per layer before any is looked up:
    // 400 million layers abort on the allocation.
    let dir = tiny_checkpoint(3, true);
    edit_json(&dir.path().join("config.json"), |c| {
        c["num_hidden_layers"] = json!(400_000_000u64)
    });
    let args = generate_args(dir.path(), CPU_PROMPT);
    assert_one_line_error(&qwen_mk_limited(&args), "layers");
}

#[test]
fn config_fields_of_the_wrong_type_are_refused() {
    // These were silently replaced by defaults (eps 1e-6, untied head, no
    // RoPE scaling) or misreported ("config has no rope_theta", 'model_type
    // is ""'): the error names the field and what it holds.
    for (key, value, found) in [
        ("rms_norm_eps", json!("1e-6"), "found \"1e-6\""),
        ("rms_norm_eps", json!(-1.0), "found -1"),
        ("tie_word_embeddings", json!("true"), "found \"true\""),
        ("rope_theta", json!("1000000"), "found \"1000000\""),
        ("model_type", json!(5), "found 5"),
        ("rope_scaling", json!("abc"), "found \"abc\""),
        ("attention_bias", json!("false"), "found \"false\""),
    ] {
        let out = generate_with_config(|c| c[key] = value.clone());
        assert_one_line_error(&out, &format!("{key} must be"));
        assert_one_line_error(&out, found);
    }
}

/// `generate` on the CPU with `file` as generation_config.json.
fn generate_with_generation_config(file: &str, extra: &[&str]) -> Output {
    let dir = tiny_checkpoint(3, true);
    std::fs::write(dir.path().join("generation_config.json"), file).unwrap();
    let mut args = CPU_PROMPT.to_vec();
    args.extend_from_slice(extra);
    generate(dir.path(), &args)
}

#[test]
fn generation_config_values_are_reported_as_written() {
    // top_k -5 was cast to 0 and reported as "--top-k ... not 0", 20.7
    // silently became 20, a temperature of 0 in the file was blamed on
    // --temperature; a file that is no object, or an eos_token_id that is
    // no id, was ignored.
    let sample: &[&str] = &["--sample"];
    for (file, extra, needle) in [
        (
            r#"{"top_k": -5}"#,
            sample,
            "top_k must be a whole number of zero or more, found -5",
        ),
        (r#"{"top_k": 20.7}"#, sample, "found 20.7"),
        (r#"{"temperature": 0}"#, sample, "temperature in "),
        (r#"{"top_k": 0}"#, sample, "top_k in "),
        ("[1, 2]", &[], "must hold a JSON object"),
        ("[1, 2]", sample, "must hold a JSON object"),
        (r#"{"eos_token_id": "abc"}"#, &[], "eos_token_id must be"),
    ] {
        let out = generate_with_generation_config(file, extra);
        assert_one_line_error(&out, "generation_config.json");
        assert_one_line_error(&out, needle);
    }
    // A value the command line overrides is not used, so not refused.
    for (file, flag) in [
        (r#"{"temperature": 0}"#, ["--temperature", "0.5"]),
        (r#"{"top_k": 0}"#, ["--top-k", "3"]),
    ] {
        let out = generate_with_generation_config(file, &flag);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

// --- prompts and conversations ---

#[test]
fn a_huge_prompt_file_is_refused_without_reading_it_all() {
    // An 8 GB (sparse) prompt file: read_to_string takes it whole, then the
    // tokenizer encodes all of it (5 MB took 8 s and 680 MB). A prompt that
    // cannot fit the context should be refused after a bounded read.
    let dir = tiny_checkpoint(3, true);
    let prompt = dir.path().join("huge.txt");
    std::fs::File::create(&prompt)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let out = qwen_mk_limited(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt-file",
        prompt.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_one_line_error(&out, "context");
}

#[test]
fn chat_refuses_a_line_that_is_not_utf8_and_goes_on() {
    // It was "error: stream did not contain valid UTF-8" (no word of where)
    // and the conversation ended; a message too long for the context is
    // refused with an error line and the conversation goes on, so should this.
    let dir = tiny_checkpoint(3, true);
    let model = dir.path().to_str().unwrap();
    let out = qwen_mk_with_bytes(
        &[
            "chat",
            "--model",
            model,
            "--device",
            "cpu",
            "--json",
            "--max-new-tokens",
            "1",
        ],
        b"\xff\xfe\nhi\n",
    );
    assert_no_panic(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    common::assert_one_error_line_among(&stderr, &["UTF-8", "input"]);
    let turns = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        turns, 1,
        "the message after the bad line gets an answer; stderr: {stderr}"
    );
}

#[test]
fn endless_input_is_refused_after_a_bounded_read() {
    // /dev/zero on stdin: `generate --prompt-file -` read it whole
    // (read_to_string) and chat read one endless line (read_line), until
    // the memory ran out.
    let dir = tiny_checkpoint(3, true);
    let model = dir.path().to_str().unwrap();
    for args in [
        vec![
            "generate",
            "--model",
            model,
            "--prompt-file",
            "-",
            "--device",
            "cpu",
        ],
        vec!["chat", "--model", model, "--device", "cpu"],
    ] {
        let out = Command::new("sh")
            .arg("-c")
            .arg("ulimit -v 2000000; exec \"$0\" \"$@\" < /dev/zero")
            .arg(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert_one_line_error(&out, "more than");
        assert_one_line_error(&out, "of 40960 tokens can hold");
    }
}

#[test]
fn a_chat_template_that_renders_nothing_is_named() {
    // An empty template: generate --chat said "the prompt encodes to no
    // tokens; pass some text with --prompt", and chat went on to decode
    // after an empty prompt.
    let dir = tiny_checkpoint(3, true);
    std::fs::write(dir.path().join("chat_template.jinja"), "").unwrap();
    let model = dir.path().to_str().unwrap();
    let out = generate(dir.path(), &["--prompt", "hi", "--chat", "--device", "cpu"]);
    assert_one_line_error(&out, "chat template rendered nothing");
    let out = qwen_mk_with_bytes(&["chat", "--model", model, "--device", "cpu"], b"hi\n");
    assert_one_line_error(&out, "chat template rendered nothing");
}

#[test]
fn messages_name_the_command_that_needs_them() {
    // Without a chat template, `chat` was told "run without --chat", a flag
    // it does not have.
    let dir = tiny_checkpoint(3, true);
    edit_json(&dir.path().join("tokenizer_config.json"), |c| {
        c.as_object_mut().unwrap().remove("chat_template");
    });
    let model = dir.path().to_str().unwrap();
    let out = qwen_mk_with_bytes(&["chat", "--model", model, "--device", "cpu"], b"hi\n");
    assert_one_line_error(&out, "chat needs the model's chat template");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("--chat"));
    let out = generate(dir.path(), &["--prompt", "hi", "--chat", "--device", "cpu"]);
    assert_one_line_error(&out, "--chat needs the model's chat template");

    // At the model's whole context, "run with a larger --context" cannot
    // help: it is suggested only below it.
    edit_json(&dir.path().join("config.json"), |c| {
        c["max_position_embeddings"] = json!(48)
    });
    std::fs::copy(
        common::assets().join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let long = "word ".repeat(100) + "\n";
    for (context, suggested) in [(None, false), (Some("40"), true)] {
        let mut args = vec![
            "chat",
            "--model",
            model,
            "--device",
            "cpu",
            "--max-new-tokens",
            "1",
        ];
        args.extend(context.map(|c| ["--context", c]).iter().flatten());
        let out = qwen_mk_with_bytes(&args, long.as_bytes());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("more than the context of"), "{stderr}");
        assert_eq!(stderr.contains("--context"), suggested, "{stderr}");
    }
}

#[test]
fn a_download_error_gives_its_cause_once() {
    // hf-hub's errors repeat their source's text: the URL and "Connection
    // refused" were printed three times on one line.
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["generate", "--model", "Qwen/NoSuchModel", "--prompt", "hi"])
        .env("HF_HOME", cache.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert_one_line_error(&out, "cannot download config.json of Qwen/NoSuchModel");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("127.0.0.1:9/Qwen").count(), 1, "{stderr}");
}

#[test]
fn chat_context_below_the_default_answer_length() {
    // --context 100 alone fails with "--max-new-tokens must be between 1 and
    // 99", a flag the user did not pass: its default (2048) should be capped.
    let dir = tiny_checkpoint(3, true);
    let model = dir.path().to_str().unwrap();
    let out = qwen_mk_with_bytes(
        &[
            "chat",
            "--model",
            model,
            "--device",
            "cpu",
            "--context",
            "100",
            "--json",
        ],
        b"hi\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` with stdout and stderr piped, closes the read end of the
/// one `closed` names at once, and returns the exit status and what the
/// other stream said.
fn run_with_a_closed(closed: Stream, args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut other = String::new();
    match closed {
        Stream::Stdout => {
            drop(child.stdout.take());
            child.stderr.take().unwrap().read_to_string(&mut other)
        }
        Stream::Stderr => {
            drop(child.stderr.take());
            child.stdout.take().unwrap().read_to_string(&mut other)
        }
    }
    .unwrap();
    (child.wait().unwrap(), other)
}

enum Stream {
    Stdout,
    Stderr,
}

#[test]
fn output_to_a_closed_stdout_ends_quietly() {
    // `qwen-mk generate --json ... | true`: println! panicked with "failed
    // printing to stdout: Broken pipe" (generate.rs), and streamed text
    // ended in "error: Broken pipe (os error 32)". The reader chose to stop:
    // nothing on stderr, and the status a shell gives a program SIGPIPE
    // ends (main.rs says why).
    let dir = tiny_checkpoint(3, true);
    for output in ["--json", "--ignore-eos"] {
        let mut args = generate_args(dir.path(), &[output]);
        args.extend_from_slice(CPU_PROMPT);
        let (status, stderr) = run_with_a_closed(Stream::Stdout, &args);
        assert_eq!(status.code(), Some(141), "{output}: {stderr}");
        assert_eq!(stderr, "", "{output}");
    }
}

#[test]
fn output_with_a_closed_stderr_still_succeeds() {
    // `qwen-mk generate ... 2>&1 | ...` whose reader stops, or stderr piped
    // to a reader gone: eprintln! panicked ("failed printing to stderr",
    // status 101) on generate's closing statistics line. Status lines are
    // best effort; the run and its exit status are the run's own.
    let dir = tiny_checkpoint(3, true);
    let args = generate_args(dir.path(), CPU_PROMPT);
    let (status, stdout) = run_with_a_closed(Stream::Stderr, &args);
    assert!(status.success(), "{status:?}, stdout: {stdout}");
    assert!(!stdout.is_empty());
}

// --- bench, parity, synth ---

#[test]
fn bench_sizes_that_overflow_are_refused() {
    // position + steps + 1 wraps around in release builds, so the context
    // check passes and the run goes on to the GPU.
    let dir = tiny_checkpoint(3, true);
    let model = dir.path().to_str().unwrap();
    let max = usize::MAX.to_string();
    for args in [
        vec!["--positions", max.as_str(), "--steps", "16"],
        vec!["--positions", "0", "--steps", max.as_str()],
        vec![
            "--positions",
            "0",
            "--steps",
            "16",
            "--prefill-lengths",
            max.as_str(),
        ],
    ] {
        let mut all = vec!["bench", "--model", model];
        all.extend(args);
        assert_one_line_error(&qwen_mk(&all), "exceeds the model's context");
    }
}

#[test]
fn parity_ids_outside_the_vocabulary_are_refused_before_the_gpu() {
    // truth.top_ids are indexed into the logits on the host
    // (cpu_reference::logprobs_at): an id past the vocabulary panics after
    // the whole GPU run. Reference::load can check them against config.json.
    let dir = common::full_size_checkpoint(1);
    let mut reference: Value = serde_json::from_str(
        &std::fs::read_to_string(common::reference_file("tokens.json")).unwrap(),
    )
    .unwrap();
    reference["truth"]["top_ids"][0][0] = json!(999_999_999u64);
    let path = dir.path().join("bad-ref.json");
    std::fs::write(&path, reference.to_string()).unwrap();
    let out = qwen_mk(&[
        "parity",
        "--ref",
        path.to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "999999999");

    // A reference made from another checkpoint: the values, not
    // `Some("1")`.
    reference["truth"]["top_ids"][0][0] = json!(0);
    reference["model"]["metadata"]["qwen_mk_seed"] = json!("7");
    std::fs::write(&path, reference.to_string()).unwrap();
    let out = qwen_mk(&[
        "parity",
        "--ref",
        path.to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "(qwen_mk_seed is \"1\", the reference says \"7\")");

    // (The same checkpoint, to spare CI another 1.2 GB.) A second prefill of
    // the whole 22-token prompt or more leaves no first part: refused before
    // the GPU starts.
    let out = qwen_mk(&[
        "parity",
        "--ref",
        common::reference_file("tokens.json").to_str().unwrap(),
        "--model",
        dir.path().to_str().unwrap(),
        "--last-prefill",
        "22",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(
        &out,
        "--last-prefill must be less than the reference prompt's 22 tokens",
    );
}

#[test]
fn synth_eos_wins_head_needs_the_eos_rows() {
    // A vocabulary without ids 151643/151645: a panic in apply_test_head.
    let assets = assets_with(|c| c["vocab_size"] = json!(1000));
    let out_dir = tempfile::tempdir().unwrap();
    let out = qwen_mk(&[
        "synth",
        "--out",
        out_dir.path().to_str().unwrap(),
        "--shape",
        "tiny",
        "--head",
        "eos-wins",
        "--assets",
        assets.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "vocab");
}

#[test]
fn synth_names_a_broken_assets_file() {
    // It was "error: expected ident at line 1 column 2" (config.json) and
    // "error: Is a directory (os error 21)" (writing config.json): no file named.
    let assets = assets_with(|_| {});
    std::fs::write(assets.path().join("config.json"), "nope").unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let synth = |assets: &Path, out: &Path| {
        qwen_mk(&[
            "synth",
            "--out",
            out.to_str().unwrap(),
            "--shape",
            "tiny",
            "--assets",
            assets.to_str().unwrap(),
        ])
    };
    assert_one_line_error(&synth(assets.path(), out_dir.path()), "config.json");
    let good = assets_with(|_| {});
    std::fs::create_dir(out_dir.path().join("config.json")).unwrap();
    assert_one_line_error(&synth(good.path(), out_dir.path()), "config.json");
    // The weights file: its name, and the OS's reason as text, not Debug.
    let out_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(out_dir.path().join("model.safetensors")).unwrap();
    let out = synth(good.path(), out_dir.path());
    assert_one_line_error(&out, "model.safetensors: I/O error: Is a directory");
}

#[test]
fn synth_refuses_weights_it_cannot_hold() {
    // vocab_size 10^12: the embedding alone is 128 TB; it was allocated
    // (and the allocation aborted).
    let assets = assets_with(|c| c["vocab_size"] = json!(1_000_000_000_000u64));
    let out_dir = tempfile::tempdir().unwrap();
    let out = qwen_mk_limited(&[
        "synth",
        "--out",
        out_dir.path().to_str().unwrap(),
        "--shape",
        "tiny",
        "--assets",
        assets.path().to_str().unwrap(),
    ]);
    assert_one_line_error(&out, "the weights would take 128000000148224 bytes");
}
