//! The chat template renders as transformers' apply_chat_template does
//! (goldens in tests/data/chat_template_goldens.json, made with transformers
//! 5.17 from assets/qwen3-0.6b), and `qwen-mk chat` carries a conversation
//! through it.

mod common;

use qwen_mk::chat_template::{ChatTemplate, Message};
use qwen_mk::tokenizer::Tokenizer;

#[test]
fn renders_and_tokenizes_like_transformers() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/chat_template_goldens.json"
    );
    let goldens: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let template = ChatTemplate::from_model_dir(&common::assets()).unwrap();
    let tokenizer = Tokenizer::from_model_dir(&common::assets()).unwrap();
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 4);
    for case in cases {
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let thinking = case["enable_thinking"].as_bool();
        let text = template.render(&messages, thinking).unwrap();
        assert_eq!(
            text,
            case["text"].as_str().unwrap(),
            "case {}",
            case["name"]
        );
        let ids: Vec<u64> = tokenizer
            .encode(&text)
            .unwrap()
            .into_iter()
            .map(u64::from)
            .collect();
        let expected: Vec<u64> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(ids, expected, "case {}", case["name"]);
    }
}

/// `generate --chat --json` of `prompt` on the CPU backend of `dir`.
fn generate_chat_on_cpu(dir: &std::path::Path, prompt: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        prompt,
        "--chat",
    ];
    args.extend_from_slice(extra);
    common::generate_json(&args)
}

#[test]
fn chat_flags_reach_the_prompt() {
    let dir = common::tiny_checkpoint(1, true);
    let report = generate_chat_on_cpu(dir.path(), "Hi", &["--no-think", "--max-new-tokens", "1"]);
    assert_eq!(
        report["prompt"],
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    // --no-think without --chat is a usage error, not a silent no-op.
    let out = common::qwen_mk(&[
        "generate",
        "--model",
        dir.path().to_str().unwrap(),
        "--prompt",
        "Hi",
        "--no-think",
    ]);
    assert!(!out.status.success());
}

/// Runs `qwen-mk chat --json` on the CPU backend of `dir` with `input` on
/// stdin; returns (exit status, the JSON line of each turn, stderr).
fn chat(
    dir: &std::path::Path,
    extra: &[&str],
    input: &str,
) -> (std::process::ExitStatus, Vec<serde_json::Value>, String) {
    let mut args = vec![
        "chat",
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = common::qwen_mk_with_stdin(&args, input);
    let turns = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a turn"))
        .collect();
    (
        out.status,
        turns,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn chat_carries_the_conversation_and_clear_starts_over() {
    let dir = common::tiny_checkpoint(1, true);
    let greedy = ["--temperature", "0", "--max-new-tokens", "4"];
    let (status, turns, stderr) = chat(
        dir.path(),
        &greedy,
        "What is 2+2?\n\nand 3+3?\n/clear\nWhat is 2+2?\n/exit\nnever read\n",
    );
    assert!(status.success(), "{stderr}");
    assert_eq!(turns.len(), 3, "{stderr}");
    assert_eq!(turns[0]["decoding"], "greedy");
    // Turn 2's prompt is the whole conversation so far, as the template
    // renders it (tested against transformers above).
    let template = ChatTemplate::from_model_dir(dir.path()).unwrap();
    let tokenizer = Tokenizer::from_model_dir(dir.path()).unwrap();
    let ids = |messages: &[Message]| {
        tokenizer
            .encode(&template.render(messages, None).unwrap())
            .unwrap()
    };
    let first = Message::new("user", "What is 2+2?");
    let answer = Message::new("assistant", turns[0]["text"].as_str().unwrap());
    let first_prompt = ids(std::slice::from_ref(&first));
    let second_prompt = ids(&[first.clone(), answer, Message::new("user", "and 3+3?")]);
    assert_eq!(turns[0]["prompt_tokens"], first_prompt.len());
    assert_eq!(turns[1]["prompt_tokens"], second_prompt.len());
    // Turn 2 computes again only where its prompt leaves turn 1's sequence
    // (the prompt and every answer token but the last, which was never fed).
    let answer_ids = common::ids(&turns[0]["generated_ids"]);
    let mut first_sequence = first_prompt.clone();
    first_sequence.extend_from_slice(&answer_ids[..answer_ids.len() - 1]);
    let shared = first_sequence
        .iter()
        .zip(&second_prompt)
        .take_while(|(a, b)| a == b)
        .count();
    assert_eq!(turns[0]["reused_tokens"], 0);
    assert!(shared > first_prompt.len() / 2, "{shared}");
    assert_eq!(turns[1]["reused_tokens"], shared);
    // After /clear the same question starts a new conversation, and greedy
    // decoding gives the same answer, which `generate --chat` also gives;
    // all of its prompt but the last position is still in the cache.
    assert_eq!(turns[2]["prompt_tokens"], turns[0]["prompt_tokens"]);
    assert_eq!(turns[2]["reused_tokens"], first_prompt.len() - 1);
    assert_eq!(turns[2]["generated_ids"], turns[0]["generated_ids"]);
    let report = generate_chat_on_cpu(dir.path(), "What is 2+2?", &["--max-new-tokens", "4"]);
    assert_eq!(report["generated_ids"], turns[0]["generated_ids"]);
}

#[test]
fn chat_refuses_a_message_past_the_context_and_goes_on() {
    let dir = common::tiny_checkpoint(1, true);
    let long = "word ".repeat(100);
    let (status, turns, stderr) = chat(
        dir.path(),
        &["--context", "48", "--max-new-tokens", "2", "--seed", "1"],
        &format!("{long}\nHi\n"),
    );
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    common::assert_one_error_line_among(&stderr, &["more than the context of 48", "/clear"]);
    // The refused message is not part of the conversation: "Hi" is turn 1,
    // alone.
    assert_eq!(turns.len(), 1, "{stderr}");
    assert_eq!(turns[0]["turn"], 1);
    // Sampled by default, with the checkpoint's settings and the seed given.
    assert_eq!(turns[0]["decoding"]["seed"], 1);
    assert_eq!(turns[0]["decoding"]["top_k"], 20);
    assert!(turns[0]["prompt_tokens"].as_u64().unwrap() < 20);
    assert_eq!(common::ids(&turns[0]["generated_ids"]).len(), 2);
}

#[test]
fn chat_settings_out_of_range_are_one_line_errors() {
    let dir = common::tiny_checkpoint(1, true);
    let model = dir.path().to_str().unwrap();
    for (args, needle) in [
        (vec!["--context", "1"], "--context must be between 2 and"),
        (
            vec!["--context", "1000000"],
            "--context must be between 2 and",
        ),
        (
            vec!["--context", "64", "--max-new-tokens", "64"],
            "--max-new-tokens must be between 1 and 63",
        ),
        (vec!["--top-k", "0"], "--top-k"),
    ] {
        let mut all = vec!["chat", "--model", model, "--device", "cpu"];
        all.extend_from_slice(&args);
        common::assert_one_line_error(&common::qwen_mk(&all), needle);
    }
}

#[test]
fn the_files_a_download_fetches_are_enough_for_chat() {
    // What `--model <repo id>` fetches with hf-hub (model_source.rs), and
    // nothing else: the chat template must be among it.
    let full = common::tiny_checkpoint(1, true);
    let fetched = tempfile::tempdir().unwrap();
    for file in qwen_mk::model_source::MODEL_FILES {
        std::fs::copy(full.path().join(file), fetched.path().join(file)).unwrap();
    }
    let report = generate_chat_on_cpu(fetched.path(), "Hi", &["--max-new-tokens", "1"]);
    assert_eq!(
        report["prompt"],
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}
