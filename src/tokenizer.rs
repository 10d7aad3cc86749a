//! The model's own tokenizer (`tokenizer.json`), and a streaming decoder that
//! prints text as tokens arrive without splitting multi-byte characters.

use std::path::Path;

use anyhow::{bail, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            bail!(
                "{} has no tokenizer.json; the checkpoint directory is incomplete",
                dir.display()
            );
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot load {}: {e}", path.display()))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`; Qwen3 adds no BOS, so none is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the prompt: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow::anyhow!("cannot decode tokens: {e}"))
    }

    /// Text decoded incrementally: each step returns what the new token
    /// adds, once it forms whole characters.
    pub fn stream(&self) -> TextStream<'_> {
        TextStream(self.inner.decode_stream(false))
    }
}

pub struct TextStream<'a>(
    tokenizers::DecodeStream<
        'a,
        tokenizers::models::ModelWrapper,
        tokenizers::normalizers::NormalizerWrapper,
        tokenizers::pre_tokenizers::PreTokenizerWrapper,
        tokenizers::processors::PostProcessorWrapper,
        tokenizers::decoders::DecoderWrapper,
    >,
);

impl TextStream<'_> {
    pub fn push(&mut self, id: u32) -> Result<String> {
        let text = self
            .0
            .step(id)
            .map_err(|e| anyhow::anyhow!("cannot decode token {id}: {e}"))?;
        Ok(text.unwrap_or_default())
    }
}

/// The most bytes of text that a prompt of `tokens` tokens can take, with
/// room to spare: four times Qwen3's longest token (128 bytes), since Unicode
/// normalisation may shorten text before it is split (at most threefold).
/// Prompt reads stop here, so that an endless input is refused instead of
/// read until the memory runs out.
pub fn max_text_bytes(tokens: usize) -> usize {
    tokens.saturating_mul(512)
}
