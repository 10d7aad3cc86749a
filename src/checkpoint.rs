//! A Qwen3 checkpoint in the Hugging Face layout: `config.json` and one
//! `model.safetensors` (or shards named by `model.safetensors.index.json`),
//! memory-mapped. Every tensor's name, shape and dtype is checked against the
//! config when the checkpoint is opened, before anything reaches a GPU.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use half::bf16;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::ModelConfig;

pub const EMBED: &str = "model.embed_tokens.weight";
pub const FINAL_NORM: &str = "model.norm.weight";
pub const LM_HEAD: &str = "lm_head.weight";

/// The per-layer weights, in the order of the checkpoint names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerTensor {
    InputNorm,
    QProj,
    KProj,
    VProj,
    OProj,
    QNorm,
    KNorm,
    PostAttnNorm,
    GateProj,
    UpProj,
    DownProj,
}

impl LayerTensor {
    pub const ALL: [LayerTensor; 11] = [
        LayerTensor::InputNorm,
        LayerTensor::QProj,
        LayerTensor::KProj,
        LayerTensor::VProj,
        LayerTensor::OProj,
        LayerTensor::QNorm,
        LayerTensor::KNorm,
        LayerTensor::PostAttnNorm,
        LayerTensor::GateProj,
        LayerTensor::UpProj,
        LayerTensor::DownProj,
    ];

    pub fn name(self, layer: usize) -> String {
        let suffix = match self {
            LayerTensor::InputNorm => "input_layernorm.weight",
            LayerTensor::QProj => "self_attn.q_proj.weight",
            LayerTensor::KProj => "self_attn.k_proj.weight",
            LayerTensor::VProj => "self_attn.v_proj.weight",
            LayerTensor::OProj => "self_attn.o_proj.weight",
            LayerTensor::QNorm => "self_attn.q_norm.weight",
            LayerTensor::KNorm => "self_attn.k_norm.weight",
            LayerTensor::PostAttnNorm => "post_attention_layernorm.weight",
            LayerTensor::GateProj => "mlp.gate_proj.weight",
            LayerTensor::UpProj => "mlp.up_proj.weight",
            LayerTensor::DownProj => "mlp.down_proj.weight",
        };
        format!("model.layers.{layer}.{suffix}")
    }

    pub fn shape(self, c: &ModelConfig) -> Vec<usize> {
        match self {
            LayerTensor::InputNorm | LayerTensor::PostAttnNorm => vec![c.hidden_size],
            LayerTensor::QNorm | LayerTensor::KNorm => vec![c.head_dim],
            LayerTensor::QProj => vec![c.q_dim(), c.hidden_size],
            LayerTensor::KProj | LayerTensor::VProj => vec![c.kv_dim(), c.hidden_size],
            LayerTensor::OProj => vec![c.hidden_size, c.q_dim()],
            LayerTensor::GateProj | LayerTensor::UpProj => vec![c.intermediate_size, c.hidden_size],
            LayerTensor::DownProj => vec![c.hidden_size, c.intermediate_size],
        }
    }
}

/// Every tensor a checkpoint of this config must hold, with its shape.
/// `lm_head.weight` is listed only for an untied head.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let mut list = vec![
        (EMBED.to_string(), vec![c.vocab_size, c.hidden_size]),
        (FINAL_NORM.to_string(), vec![c.hidden_size]),
    ];
    if !c.tie_word_embeddings {
        list.push((LM_HEAD.to_string(), vec![c.vocab_size, c.hidden_size]));
    }
    for layer in 0..c.num_hidden_layers {
        for t in LayerTensor::ALL {
            list.push((t.name(layer), t.shape(c)));
        }
    }
    list
}

struct TensorLocation {
    file: usize,
    start: usize,
    end: usize,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    /// The `__metadata__` of the (first) safetensors file.
    pub metadata: BTreeMap<String, String>,
    files: Vec<Mmap>,
    tensors: HashMap<String, TensorLocation>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model directory {} does not exist", dir.display());
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            bail!(
                "{} has no config.json; point --model at a Hugging Face Qwen3 checkpoint directory",
                dir.display()
            );
        }
        let config = ModelConfig::from_file(&config_path)?;

        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        let mut metadata = BTreeMap::new();
        for (index, path) in safetensors_files(dir)?.iter().enumerate() {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // SAFETY: the map is read-only; a checkpoint changed on disk while
            // qwen-mk runs is outside what it promises to handle.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", path.display()))?;
            let (header_len, header) = SafeTensors::read_metadata(&map).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not a valid safetensors file ({e:?}); it may be truncated or corrupt: download it again",
                    path.display()
                )
            })?;
            if index == 0 {
                if let Some(meta) = header.metadata() {
                    metadata.extend(meta.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            let data_start = 8 + header_len;
            for (name, info) in header.tensors() {
                if info.dtype != Dtype::BF16 && is_model_weight(&name) {
                    bail!(
                        "tensor {name} in {} is {:?}; qwen-mk runs bf16 checkpoints only",
                        path.display(),
                        info.dtype
                    );
                }
                let location = TensorLocation {
                    file: index,
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                let shape = info.shape.clone();
                tensors.insert(name.clone(), (location, shape));
            }
            files.push(map);
        }

        check_layer_count(&config, tensors.keys(), dir)?;
        for (name, shape) in expected_tensors(&config) {
            let Some((_, found)) = tensors.get(&name) else {
                bail!(
                    "checkpoint {} has no tensor {name}; it is not a complete Qwen3 checkpoint for its config.json",
                    dir.display()
                );
            };
            if *found != shape {
                bail!("tensor {name} has shape {found:?}, but config.json implies {shape:?}");
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            metadata,
            files,
            tensors: tensors.into_iter().map(|(k, (loc, _))| (k, loc)).collect(),
        })
    }

    /// The raw little-endian bf16 bytes of a tensor that `open` validated.
    pub fn bytes(&self, name: &str) -> &[u8] {
        let loc = &self.tensors[name];
        &self.files[loc.file][loc.start..loc.end]
    }

    pub fn to_f32(&self, name: &str) -> Vec<f32> {
        self.bytes(name)
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    }

    /// The name of the output projection: `lm_head.weight`, or the embedding
    /// when the config ties them (transformers ignores a stored lm_head then).
    pub fn lm_head_name(&self) -> &'static str {
        if self.config.tie_word_embeddings {
            EMBED
        } else {
            LM_HEAD
        }
    }
}

/// Fails when config.json asks for more layers than the checkpoint has
/// tensors for. It comes before the tensors are listed one by one: that list
/// has 11 names a layer, and an absurd num_hidden_layers would exhaust the
/// memory making it.
fn check_layer_count<'a>(
    config: &ModelConfig,
    names: impl Iterator<Item = &'a String>,
    dir: &Path,
) -> Result<()> {
    let layers: HashSet<&str> = names
        .filter_map(|name| name.strip_prefix("model.layers."))
        .filter_map(|rest| rest.split('.').next())
        .collect();
    if config.num_hidden_layers > layers.len() {
        bail!(
            "config.json says num_hidden_layers is {}, but checkpoint {} has tensors of {} layers; it is not a complete Qwen3 checkpoint for its config.json",
            config.num_hidden_layers,
            dir.display(),
            layers.len()
        );
    }
    Ok(())
}

fn is_model_weight(name: &str) -> bool {
    name.starts_with("model.") || name == LM_HEAD
}

/// `model.safetensors`, or the shards an index file names.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        bail!(
            "{} has neither model.safetensors nor model.safetensors.index.json; the weights are missing",
            dir.display()
        );
    }
    let text = std::fs::read_to_string(&index_path)
        .with_context(|| format!("cannot read {}", index_path.display()))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", index_path.display()))?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index_path.display()))?;
    let mut shards: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    shards
        .into_iter()
        .map(|shard| {
            let path = dir.join(&shard);
            if path.is_file() {
                Ok(path)
            } else {
                bail!("shard {shard} named in {} is missing", index_path.display())
            }
        })
        .collect()
}
