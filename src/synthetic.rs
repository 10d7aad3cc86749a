//! Synthetic Qwen3 checkpoints: random weights of exactly a real model's
//! shapes, deterministic from a seed, written in the Hugging Face layout so
//! that transformers loads the very same files qwen-mk does. They stand in
//! for the real weights where those cannot be downloaded.
//!
//! Values are uniform with a standard deviation chosen so the network is not
//! degenerate: projections scaled by 1/sqrt(fan_in) (attention scores and MLP
//! activations of order one), logits with a spread of about 3 (clear winners,
//! so greedy decoding is a meaningful check), and norm weights drawn from
//! [0.6, 1.4] so that a forgotten weight multiply shows.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

use crate::checkpoint::{expected_tensors, LayerTensor};
use crate::config::ModelConfig;

/// The model shapes the generator knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// Qwen3-0.6B: what the CUDA kernels run.
    #[value(name = "0.6b")]
    Qwen3_0_6B,
    /// Two layers of width 64 with the real vocabulary: for CPU tests.
    Tiny,
}

/// What the output head computes. The two test heads check the LM-head
/// kernel's argmax over the whole vocabulary, with any layer weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Head {
    /// Random, like every other weight.
    Random,
    /// Every logit is 0 except the two end-of-sequence ids (151643, 151645),
    /// which get +x and -x for a nonzero x: an EOS id must win, so
    /// generation must stop after one token. (Final norm weight = e_0, head
    /// rows zero but for those two.) Implies an untied head.
    EosWins,
    /// Every logit is exactly 0 (final norm weight zero): torch.argmax's rule
    /// picks id 0. Implies an untied head.
    AllTies,
}

pub struct SyntheticSpec {
    pub shape: Shape,
    pub seed: u64,
    pub tied: bool,
    pub head: Head,
}

/// The two end-of-sequence ids of Qwen3 that `Head::EosWins` makes win.
pub const EOS_IDS: [usize; 2] = [151_645, 151_643];

/// The config.json fields the tiny shape sets; the rest is the real
/// Qwen3-0.6B config.
pub const TINY_DIMENSIONS: [(&str, usize); 7] = [
    ("hidden_size", 64),
    ("num_hidden_layers", 2),
    ("max_window_layers", 2),
    ("num_attention_heads", 4),
    ("num_key_value_heads", 2),
    ("head_dim", 16),
    ("intermediate_size", 128),
];

/// The real Qwen3-0.6B config, with the tiny shape's changes when asked.
pub fn config_json(assets: &Path, spec: &SyntheticSpec) -> Result<Value> {
    let path = assets.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    if spec.shape == Shape::Tiny {
        for (key, value) in TINY_DIMENSIONS {
            config[key] = json!(value);
        }
    }
    config["tie_word_embeddings"] = json!(spec.tied && spec.head == Head::Random);
    Ok(config)
}

/// Writes config, generation config, tokenizer files and `model.safetensors`
/// into `out` (created if needed). `assets` holds the real model's non-weight
/// files (config.json, generation_config.json, tokenizer.json,
/// tokenizer_config.json).
pub fn write_checkpoint(out: &Path, assets: &Path, spec: &SyntheticSpec) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for file in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let from = assets.join(file);
        if !from.is_file() {
            bail!(
                "{} is missing: --assets must point at the real model's non-weight files (see assets/qwen3-0.6b)",
                from.display()
            );
        }
        // Read and write rather than copy: the source may be read-only, and a
        // copied mode would block writing the checkpoint again.
        let bytes =
            std::fs::read(&from).with_context(|| format!("cannot read {}", from.display()))?;
        let to = out.join(file);
        std::fs::write(&to, bytes).with_context(|| format!("cannot write {}", to.display()))?;
    }
    let config_value = config_json(assets, spec)?;
    let in_assets_config = || format!("in {}", assets.join("config.json").display());
    let config = ModelConfig::from_json(&config_value).with_context(in_assets_config)?;
    check_buildable(&config, spec).with_context(in_assets_config)?;
    let config_path = out.join("config.json");
    std::fs::write(&config_path, serde_json::to_string_pretty(&config_value)?)
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    let mut tensors = generate_tensors(&config, spec.seed);
    apply_test_head(&mut tensors, spec.head, config.hidden_size);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view = TensorView::new(Dtype::BF16, shape.clone(), bytes)
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("qwen_mk_seed".to_string(), spec.seed.to_string()),
        (
            "qwen_mk_generator".to_string(),
            format!(
                "qwen-mk synth v1, shape {:?}, tied {}",
                spec.shape, spec.tied
            ),
        ),
    ]);
    let path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

/// The most bytes of weights `synth` makes: it holds them all in memory
/// while it writes them (Qwen3-0.6B's are 1.5 GB).
const MAX_WEIGHT_BYTES: u64 = 32 << 30;

/// Fails, before anything is allocated, for a checkpoint `synth` cannot
/// make: weights past MAX_WEIGHT_BYTES, or a test head whose rows the
/// vocabulary lacks.
fn check_buildable(config: &ModelConfig, spec: &SyntheticSpec) -> Result<()> {
    let untied = !config.tie_word_embeddings;
    let bytes = parameter_count(config, untied).and_then(|n| n.checked_mul(2)); // bf16
    if bytes.is_none_or(|b| b > MAX_WEIGHT_BYTES) {
        bail!(
            "the weights would take {} bytes, past the {} GiB synth makes (it holds them in memory); check the sizes",
            bytes.map_or("more than 2^64".to_string(), |b| b.to_string()),
            MAX_WEIGHT_BYTES >> 30
        );
    }
    let largest_eos = EOS_IDS.iter().max().copied().unwrap_or(0);
    if spec.head == Head::EosWins && config.vocab_size <= largest_eos {
        bail!(
            "--head eos-wins needs the end-of-sequence ids {} and {}, but vocab_size is {}",
            EOS_IDS[1],
            EOS_IDS[0],
            config.vocab_size
        );
    }
    Ok(())
}

/// The number of weights of `config` (with a separate LM head when
/// `untied`), or None past u64.
fn parameter_count(config: &ModelConfig, untied: bool) -> Option<u64> {
    let product = |shape: &[usize]| {
        shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(u64::try_from(d).ok()?))
    };
    let per_layer = LayerTensor::ALL
        .iter()
        .try_fold(0u64, |n, t| n.checked_add(product(&t.shape(config))?))?;
    let embedding = product(&[config.vocab_size, config.hidden_size])?;
    let heads = if untied { 2 } else { 1 };
    per_layer
        .checked_mul(u64::try_from(config.num_hidden_layers).ok()?)?
        .checked_add(embedding.checked_mul(heads)?)?
        .checked_add(u64::try_from(config.hidden_size).ok()?)
}

/// (name, shape, little-endian bf16 bytes) of every tensor, generated in
/// parallel; each tensor's values depend only on the seed and its name.
pub fn generate_tensors(config: &ModelConfig, seed: u64) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let specs = expected_tensors(config);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    let mut results: Vec<Option<Vec<u8>>> = vec![None; specs.len()];
    std::thread::scope(|scope| {
        let per_thread = specs.len().div_ceil(threads);
        let mut handles = Vec::new();
        for (chunk_index, chunk) in results.chunks_mut(per_thread).enumerate() {
            let specs = &specs;
            handles.push(scope.spawn(move || {
                for (i, slot) in chunk.iter_mut().enumerate() {
                    let (name, shape) = &specs[chunk_index * per_thread + i];
                    *slot = Some(tensor_bytes(config, seed, name, shape));
                }
            }));
        }
        for handle in handles {
            // A panic in a generator thread is a bug in this file: re-raise it.
            if let Err(panic) = handle.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    specs
        .into_iter()
        .zip(results)
        .map(|((name, shape), bytes)| (name, shape, bytes.unwrap_or_default()))
        .collect()
}

fn tensor_bytes(config: &ModelConfig, seed: u64, name: &str, shape: &[usize]) -> Vec<u8> {
    let count: usize = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ fnv1a(name.as_bytes()));
    let (low, high) = value_range(config, name, shape);
    let mut bytes = Vec::with_capacity(count * 2);
    for _ in 0..count {
        let value: f32 = rng.random_range(low..high);
        bytes.extend_from_slice(&bf16::from_f32(value).to_le_bytes());
    }
    bytes
}

/// Rewrites the final norm and head for the test heads.
fn apply_test_head(tensors: &mut [(String, Vec<usize>, Vec<u8>)], head: Head, hidden: usize) {
    let bf16_bytes = |v: f32| bf16::from_f32(v).to_le_bytes();
    for (name, _, bytes) in tensors.iter_mut() {
        match (head, name.as_str()) {
            (Head::Random, _) => return,
            (_, crate::checkpoint::FINAL_NORM) => {
                bytes.fill(0);
                if head == Head::EosWins {
                    bytes[..2].copy_from_slice(&bf16_bytes(1.0));
                }
            }
            (_, crate::checkpoint::LM_HEAD) => {
                bytes.fill(0);
                if head == Head::EosWins {
                    for (id, sign) in EOS_IDS.iter().zip([1.0, -1.0]) {
                        bytes[2 * id * hidden..][..2].copy_from_slice(&bf16_bytes(sign));
                    }
                }
            }
            _ => {}
        }
    }
}

/// The interval each tensor's values are drawn from.
fn value_range(config: &ModelConfig, name: &str, shape: &[usize]) -> (f32, f32) {
    if shape.len() == 1 {
        return (0.6, 1.4); // RMSNorm weights
    }
    let std = if name == crate::checkpoint::EMBED || name == crate::checkpoint::LM_HEAD {
        3.0 / (config.hidden_size as f32).sqrt()
    } else {
        1.0 / (shape[1] as f32).sqrt()
    };
    let half_width = std * 3f32.sqrt(); // a uniform's std is half-width / sqrt(3)
    (-half_width, half_width)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}
