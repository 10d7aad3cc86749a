//! Where a model comes from: a local directory, or a Hugging Face repo id
//! fetched (and cached) with hf-hub. Honours HF_HOME, HF_ENDPOINT, HF_TOKEN
//! and HF_HUB_OFFLINE.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

pub const DEFAULT_MODEL: &str = "Qwen/Qwen3-0.6B";

/// Every file of a checkpoint qwen-mk reads, which a download fetches:
/// tokenizer_config.json holds the chat template (`--chat`, `chat`).
pub const MODEL_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
];
/// Fetched where the repo has it: the chat template as transformers 5
/// writes it, which qwen-mk prefers to tokenizer_config.json's.
pub const OPTIONAL_MODEL_FILES: [&str; 1] = ["chat_template.jinja"];

/// A directory holding the checkpoint, downloading it first when `model`
/// is a repo id rather than a path.
pub fn resolve(model: &str) -> Result<PathBuf> {
    let path = Path::new(model);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if path.exists() {
        bail!("--model {model} is a file; it must be a checkpoint directory or a Hugging Face repo id");
    }
    if !looks_like_repo_id(model) {
        bail!("model directory {model} does not exist (give a directory, or a Hugging Face repo id such as {DEFAULT_MODEL})");
    }
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    // A checkpoint already in the cache runs without the network: no request
    // at all, not even for the optional files, which on a machine whose
    // network drops packets would wait for a timeout at every start.
    match cached(model) {
        Ok(dir) => Ok(dir),
        Err(missing) if offline => bail!(
            "HF_HUB_OFFLINE is set and {missing} of {model} is not in the Hugging Face cache; unset it to download"
        ),
        Err(_) => download(model),
    }
}

fn looks_like_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let valid = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    matches!((parts.next(), parts.next(), parts.next()), (Some(a), Some(b), None) if valid(a) && valid(b))
}

fn download(repo_id: &str) -> Result<PathBuf> {
    let mut builder = ApiBuilder::from_env().with_progress(true);
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder
        .build()
        .context("cannot set up the Hugging Face client")?;
    let repo = api.model(repo_id.to_string());
    let mut dir = None;
    for file in MODEL_FILES {
        let path = repo.get(file).with_context(|| {
            format!(
                "cannot download {file} of {repo_id} from the Hugging Face Hub; check the repo id and your network, \
                 or pass a local checkpoint directory with --model"
            )
        })?;
        dir = path.parent().map(Path::to_path_buf);
    }
    for file in OPTIONAL_MODEL_FILES {
        // Most repos have none: a failure here only means there is none.
        let _ = repo.get(file);
    }
    dir.context("hf-hub returned no path")
}

/// The cache's snapshot of `repo_id` if it holds every file of MODEL_FILES,
/// else the name of the first one it lacks.
fn cached(repo_id: &str) -> std::result::Result<PathBuf, &'static str> {
    let repo = Cache::from_env().repo(Repo::model(repo_id.to_string()));
    let mut dir = None;
    for file in MODEL_FILES {
        let path = repo.get(file).ok_or(file)?;
        dir = path.parent().map(Path::to_path_buf);
    }
    dir.ok_or(MODEL_FILES[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_paths_are_told_apart() {
        assert!(looks_like_repo_id("Qwen/Qwen3-0.6B"));
        assert!(!looks_like_repo_id("./models/qwen"));
        assert!(!looks_like_repo_id("/abs/path"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("justaname"));
    }
}
