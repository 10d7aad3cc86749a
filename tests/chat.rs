//! The chat template renders as transformers' apply_chat_template does
//! (goldens in tests/data/chat_template_goldens.json, made with transformers
//! 5.17 from assets/qwen3-0.6b).

mod common;

use qwen_mk::chat::{ChatTemplate, Message};
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

#[test]
fn chat_flags_reach_the_prompt() {
    let dir = common::tiny_checkpoint(1, true);
    let report = common::generate_json(&[
        "--model",
        dir.path().to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "Hi",
        "--chat",
        "--no-think",
        "--max-new-tokens",
        "1",
    ]);
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
