//! `generate --prompt-file` reads the prompt from a file, or from standard
//! input with `-`, and gives the tokens --prompt gives for the same text.

mod common;

#[test]
fn a_prompt_file_and_stdin_give_what_the_same_prompt_gives() {
    let dir = common::tiny_checkpoint(2, true);
    let model = dir.path().to_str().unwrap();
    let text = "The capital of France is\nParis, and of Italy";
    let settings = ["--device", "cpu", "--max-new-tokens", "3"];
    let mut by_flag = vec!["--model", model, "--prompt", text];
    by_flag.extend_from_slice(&settings);
    let expected = common::generate_json(&by_flag);

    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, text).unwrap();
    let mut by_file = vec!["--model", model, "--prompt-file", file.to_str().unwrap()];
    by_file.extend_from_slice(&settings);
    let from_file = common::generate_json(&by_file);
    assert_eq!(from_file["prompt_ids"], expected["prompt_ids"]);
    assert_eq!(from_file["generated_ids"], expected["generated_ids"]);

    let mut from_stdin = vec!["generate", "--model", model, "--prompt-file", "-", "--json"];
    from_stdin.extend_from_slice(&settings);
    let out = common::qwen_mk_with_stdin(&from_stdin, text);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let from_stdin: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_stdin["prompt_ids"], expected["prompt_ids"]);
    assert_eq!(from_stdin["generated_ids"], expected["generated_ids"]);
}

#[test]
fn a_missing_prompt_file_is_a_one_line_error() {
    let dir = common::tiny_checkpoint(2, true);
    let out = common::qwen_mk(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt-file",
        "/nonexistent/prompt.txt",
    ]);
    common::assert_one_line_error(&out, "cannot read the prompt file /nonexistent/prompt.txt");
}

#[test]
fn prompt_and_prompt_file_together_or_neither_are_usage_errors() {
    let dir = common::tiny_checkpoint(2, true);
    let model = dir.path().to_str().unwrap();
    for args in [
        vec![
            "generate",
            "--model",
            model,
            "--prompt",
            "hi",
            "--prompt-file",
            "-",
        ],
        vec!["generate", "--model", model],
    ] {
        let out = common::qwen_mk(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.starts_with("error: ") && !stderr.contains("panicked"),
            "{stderr}"
        );
    }
}
