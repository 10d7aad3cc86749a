//! The model's `config.json` and `generation_config.json`, read the way
//! transformers 4 and 5 write them, and the check of a config against the
//! dimensions the kernels were compiled for.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::json_field;
use crate::kernel_dims;

/// What qwen-mk needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&json).with_context(|| format!("in {}", path.display()))
    }

    pub fn from_json(json: &Value) -> Result<Self> {
        json_field::check_object(json)?;
        match json_field::string(json, "model_type")? {
            Some("qwen3") => {}
            Some(other) => bail!(
                "model_type is {other:?}, but qwen-mk runs only Qwen3 (\"qwen3\") checkpoints"
            ),
            None => {
                bail!("there is no model_type; qwen-mk runs only Qwen3 (\"qwen3\") checkpoints")
            }
        }
        if json_field::boolean(json, "attention_bias")? == Some(true) {
            bail!("attention_bias is true; Qwen3 projections have no bias and qwen-mk does not support one");
        }
        if let Some(act) = json_field::string(json, "hidden_act")? {
            if act != "silu" {
                bail!("hidden_act is {act:?}; qwen-mk implements only \"silu\"");
            }
        }
        if json_field::boolean(json, "use_sliding_window")? == Some(true) {
            bail!("use_sliding_window is true; qwen-mk implements full attention only");
        }
        let rope = rope_settings(json)?;
        let num_attention_heads = usize_field(json, "num_attention_heads")?;
        let hidden_size = usize_field(json, "hidden_size")?;
        let head_dim = match json_field::get(json, "head_dim") {
            None => hidden_size / num_attention_heads,
            Some(_) => usize_field(json, "head_dim")?,
        };
        // transformers' defaults for the two optional fields.
        let rms_norm_eps = json_field::number(json, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            bail!("rms_norm_eps must be a positive number, found {rms_norm_eps}");
        }
        // Qwen3Config's head is untied unless the config says otherwise.
        let tie_word_embeddings =
            json_field::boolean(json, "tie_word_embeddings")?.unwrap_or(false);
        let config = Self {
            hidden_size,
            num_hidden_layers: usize_field(json, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: usize_field(json, "num_key_value_heads")?,
            head_dim,
            intermediate_size: usize_field(json, "intermediate_size")?,
            vocab_size: usize_field(json, "vocab_size")?,
            max_position_embeddings: usize_field(json, "max_position_embeddings")?,
            rms_norm_eps,
            rope_theta: rope,
            tie_word_embeddings,
        };
        config.check_attention_heads()?;
        Ok(config)
    }

    /// The head layout the attention (CPU and GPU) relies on: whole groups
    /// of query heads per key/value head, and an even head_dim for RoPE,
    /// which rotates dimension pairs (d, d + head_dim / 2).
    fn check_attention_heads(&self) -> Result<()> {
        let (q, kv, d) = (
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        );
        if q % kv != 0 {
            bail!(
                "num_key_value_heads ({kv}) must divide num_attention_heads ({q}): each key/value head serves a whole group of query heads"
            );
        }
        if d == 0 {
            bail!("head_dim is missing and hidden_size / num_attention_heads is 0");
        }
        if d % 2 != 0 {
            bail!("head_dim must be even (RoPE rotates pairs of dimensions), found {d}");
        }
        if q.checked_mul(d).is_none() {
            bail!("num_attention_heads x head_dim ({q} x {d}) is too large");
        }
        Ok(())
    }

    /// Fails when an id in `ids` has no row in the embedding: a tokenizer
    /// (or a reference file) made for another vocabulary. `what` names the
    /// ids; callers say what does not match.
    pub fn check_token_ids<'a>(
        &self,
        what: &str,
        ids: impl IntoIterator<Item = &'a u32>,
    ) -> Result<()> {
        if let Some(id) = ids.into_iter().find(|&&id| id as usize >= self.vocab_size) {
            bail!(
                "{what} has token id {id}, but config.json's vocab_size is {}",
                self.vocab_size
            );
        }
        Ok(())
    }

    /// Every field that differs from what the fused kernels were compiled
    /// for, as `name: checkpoint has X, kernels need Y` lines; empty when the
    /// GPU path can run this checkpoint.
    pub fn kernel_mismatches(&self) -> Vec<String> {
        let expected = [
            ("hidden_size", self.hidden_size, kernel_dims::HIDDEN),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                kernel_dims::NUM_LAYERS,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                kernel_dims::NUM_Q_HEADS,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                kernel_dims::NUM_KV_HEADS,
            ),
            ("head_dim", self.head_dim, kernel_dims::HEAD_DIM),
            (
                "intermediate_size",
                self.intermediate_size,
                kernel_dims::INTERMEDIATE,
            ),
        ];
        expected
            .iter()
            .filter(|(_, have, need)| have != need)
            .map(|(name, have, need)| format!("{name}: checkpoint has {have}, kernels need {need}"))
            .collect()
    }

    /// Fails with one line naming every mismatched field.
    pub fn check_kernel_dims(&self) -> Result<()> {
        let mismatches = self.kernel_mismatches();
        if mismatches.is_empty() {
            return Ok(());
        }
        bail!(
            "this checkpoint does not have Qwen3-0.6B's dimensions, which the CUDA kernels are built for ({}); \
             use --device cpu to run it on the CPU",
            mismatches.join("; ")
        )
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }
}

/// rope_theta lives at the top level in transformers 4 and under
/// `rope_parameters` (or `rope_scaling`) in transformers 5. Only plain RoPE
/// is implemented: any scaling type other than "default" is refused.
fn rope_settings(json: &Value) -> Result<f64> {
    let mut theta = json_field::number(json, "rope_theta")?;
    for key in ["rope_parameters", "rope_scaling"] {
        let Some(params) = json_field::get(json, key) else {
            continue;
        };
        if !params.is_object() {
            return Err(json_field::wrong_type(key, "an object or null", params));
        }
        let field = |name: &str| json_field::string(params, name).with_context(|| key.to_string());
        let kind = match field("rope_type")? {
            Some(kind) => kind,
            None => field("type")?.unwrap_or("default"),
        };
        if kind != "default" {
            bail!("{key} asks for RoPE type {kind:?}; qwen-mk implements only the default RoPE");
        }
        if let Some(t) =
            json_field::number(params, "rope_theta").with_context(|| key.to_string())?
        {
            theta = Some(t);
        }
    }
    let theta = theta.context("config has no rope_theta (top level or in rope_parameters)")?;
    if !(theta.is_finite() && theta > 1.0) {
        bail!("rope_theta is {theta}; it must be a finite number above 1");
    }
    Ok(theta)
}

fn usize_field(json: &Value, name: &str) -> Result<usize> {
    let value = json
        .get(name)
        .with_context(|| format!("config has no field {name:?}"))?;
    let n = value
        .as_u64()
        .filter(|&n| n > 0)
        .ok_or_else(|| json_field::wrong_type(name, "a positive whole number", value))?;
    usize::try_from(n).with_context(|| format!("config field {name:?} is too large"))
}

/// The end-of-sequence ids, from `generation_config.json` when it names
/// some, else from `config.json`.
pub fn eos_token_ids(model_dir: &Path) -> Result<Vec<u32>> {
    for file in ["generation_config.json", "config.json"] {
        let path = model_dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let ids = eos_ids_in(&json).with_context(|| format!("in {}", path.display()))?;
        if !ids.is_empty() {
            return Ok(ids);
        }
    }
    Ok(Vec::new())
}

/// `eos_token_id` of one file: an id, a list of ids, or none.
fn eos_ids_in(json: &Value) -> Result<Vec<u32>> {
    json_field::check_object(json)?;
    let Some(value) = json_field::get(json, "eos_token_id") else {
        return Ok(Vec::new());
    };
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    let ids = match value {
        Value::Array(list) => list.iter().map(as_id).collect(),
        single => as_id(single).map(|id| vec![id]),
    };
    ids.ok_or_else(|| json_field::wrong_type("eos_token_id", "a token id or a list of them", value))
}
