//! Synthetic checkpoints: deterministic, loadable, and not degenerate.

mod common;

use qwen_mk::checkpoint::{Checkpoint, LM_HEAD};

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let dirs = [5, 5, 6].map(|seed| common::tiny_checkpoint(seed, true));
    let [a, b, c] = dirs.each_ref().map(|d| Checkpoint::open(d.path()).unwrap());
    let names = qwen_mk::checkpoint::expected_tensors(&a.config);
    for (name, _) in &names {
        assert_eq!(
            a.bytes(name),
            b.bytes(name),
            "{name} differs for the same seed"
        );
        assert_ne!(
            a.bytes(name),
            c.bytes(name),
            "{name} is the same for another seed"
        );
    }
}

#[test]
fn norm_weights_are_not_all_one_and_metadata_names_the_seed() {
    let dir = common::tiny_checkpoint(5, true);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    for name in [
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.layers.0.self_attn.q_norm.weight",
        "model.layers.0.self_attn.k_norm.weight",
    ] {
        let w = ckpt.to_f32(name);
        assert!(
            w.iter().any(|&v| (v - 1.0).abs() > 0.05),
            "{name} is all ones"
        );
    }
    assert_eq!(
        ckpt.metadata.get("qwen_mk_seed").map(String::as_str),
        Some("5")
    );
}

#[test]
fn tied_and_untied_heads() {
    let tied = common::tiny_checkpoint(5, true);
    let untied = common::tiny_checkpoint(5, false);
    let tied = Checkpoint::open(tied.path()).unwrap();
    let untied = Checkpoint::open(untied.path()).unwrap();
    assert!(tied.config.tie_word_embeddings && !untied.config.tie_word_embeddings);
    assert_eq!(tied.lm_head_name(), qwen_mk::checkpoint::EMBED);
    assert_eq!(untied.lm_head_name(), LM_HEAD);
    assert_ne!(
        untied.to_f32(LM_HEAD),
        untied.to_f32(qwen_mk::checkpoint::EMBED)
    );
}
