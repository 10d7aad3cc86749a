//! config.json parsing and the check against the kernels' dimensions.

use qwen_mk::config::ModelConfig;
use serde_json::json;

fn real_config() -> serde_json::Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/qwen3-0.6b/config.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn real_config_matches_the_kernels() {
    let config = ModelConfig::from_json(&real_config()).unwrap();
    assert_eq!(config.rope_theta, 1e6);
    assert!(config.tie_word_embeddings);
    assert_eq!(config.vocab_size, 151_936);
    assert!(config.kernel_mismatches().is_empty());
    config.check_kernel_dims().unwrap();
}

#[test]
fn rope_theta_is_read_where_transformers_5_puts_it() {
    let mut json = real_config();
    json.as_object_mut().unwrap().remove("rope_theta");
    json["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 5e5});
    assert_eq!(ModelConfig::from_json(&json).unwrap().rope_theta, 5e5);
    json.as_object_mut().unwrap().remove("rope_parameters");
    json["rope_scaling"] = json!({"rope_type": "default", "rope_theta": 2e6});
    assert_eq!(ModelConfig::from_json(&json).unwrap().rope_theta, 2e6);
}

#[test]
fn unsupported_rope_scaling_and_missing_theta_are_refused() {
    let mut json = real_config();
    json["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("yarn"), "{err}");
    let mut json = real_config();
    json.as_object_mut().unwrap().remove("rope_theta");
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("rope_theta"), "{err}");
}

#[test]
fn other_model_types_are_refused() {
    let mut json = real_config();
    json["model_type"] = json!("llama");
    let err = ModelConfig::from_json(&json).unwrap_err().to_string();
    assert!(err.contains("llama") && err.contains("qwen3"), "{err}");
}

#[test]
fn another_qwen3_size_gets_every_differing_field() {
    // Qwen3-1.7B's shape.
    let mut json = real_config();
    json["hidden_size"] = json!(2048);
    json["intermediate_size"] = json!(6144);
    let config = ModelConfig::from_json(&json).unwrap();
    let mismatches = config.kernel_mismatches();
    assert_eq!(mismatches.len(), 2, "{mismatches:?}");
    assert!(mismatches[0].starts_with("hidden_size: checkpoint has 2048, kernels need 1024"));
    assert!(mismatches[1].starts_with("intermediate_size"));
    let err = config.check_kernel_dims().unwrap_err().to_string();
    assert!(
        err.contains("hidden_size") && err.contains("intermediate_size"),
        "{err}"
    );
}

#[test]
fn head_dim_defaults_and_untied_default() {
    let mut json = real_config();
    json.as_object_mut().unwrap().remove("head_dim");
    json.as_object_mut().unwrap().remove("tie_word_embeddings");
    let config = ModelConfig::from_json(&json).unwrap();
    assert_eq!(config.head_dim, 1024 / 16);
    assert!(!config.tie_word_embeddings);
}
