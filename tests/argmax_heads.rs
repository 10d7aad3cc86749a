//! The argmax test heads (`qwen-mk synth --head ...`) behave as documented on
//! the CPU reference; `scripts/device_round.sh` runs the same checkpoints
//! through the GPU kernels.

mod common;

use qwen_mk::synthetic::{Head, EOS_IDS};

fn generate_json(dir: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "--model",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
        "--prompt",
        "Hello world",
    ];
    args.extend_from_slice(extra);
    common::generate_json(&args)
}

#[test]
fn eos_wins_head_stops_after_one_end_of_sequence_token() {
    let dir = common::tiny_test_head_checkpoint(Head::EosWins);
    let report = generate_json(dir.path(), &["--max-new-tokens", "8"]);
    let ids = report["generated_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1, "{report}");
    assert!(
        EOS_IDS.contains(&(ids[0].as_u64().unwrap() as usize)),
        "{report}"
    );
    assert_eq!(report["stop_reason"], "eos");
}

#[test]
fn all_ties_head_picks_the_lowest_id() {
    let dir = common::tiny_test_head_checkpoint(Head::AllTies);
    let report = generate_json(dir.path(), &["--max-new-tokens", "3"]);
    assert_eq!(
        report["generated_ids"],
        serde_json::json!([0, 0, 0]),
        "{report}"
    );
}
