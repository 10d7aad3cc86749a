//! Where tokens are generated, for `generate` and `chat`: the GPU kernels
//! (the decode megakernel, with batched prefill for the prompt) or the CPU
//! reference, greedy or sampled, each token handed to the caller as soon as
//! it is known.

use std::time::Instant;

use anyhow::Result;

use crate::checkpoint::Checkpoint;
use crate::cli::DeviceKind;
use crate::cpu_reference::{argmax, CpuModel, KvCache};
use crate::gpu::decoder::PREFILL_MIN_TOKENS;
use crate::gpu::GpuDecoder;
use crate::sampling::Sampling;

/// Where tokens are generated: the GPU kernels or the CPU reference, with
/// the decoding (greedy or sampled) chosen once. Successive calls of
/// `generate` reuse the keys and values of the positions where the new
/// prompt starts as the last sequence did (a chat's earlier turns).
pub struct Backend {
    engine: Engine,
    /// The token ids whose keys and values the cache holds, one a position.
    cached: Vec<u32>,
}

enum Engine {
    Gpu {
        decoder: Box<GpuDecoder>,
        /// Whether prompts of PREFILL_MIN_TOKENS or more go through batched
        /// prefill (else one token at a time, through the decode kernel).
        batched: bool,
    },
    Cpu {
        model: Box<CpuModel>,
        cache: KvCache,
        sampling: Option<Sampling>,
    },
}

/// One call of `Backend::generate`: milliseconds to the first token and for
/// the rest, how many of the prompt's positions came from the cache, and how
/// the rest went in when not by batched prefill.
pub struct Timings {
    pub first_token_ms: f64,
    pub rest_ms: f64,
    pub reused_tokens: usize,
    pub prompt_note: &'static str,
}

impl Timings {
    /// Tokens a second after the first, for `generated` tokens in all.
    pub fn decode_tokens_per_s(&self, generated: usize) -> f64 {
        if self.rest_ms > 0.0 {
            generated.saturating_sub(1) as f64 / (self.rest_ms * 1e-3)
        } else {
            0.0
        }
    }
}

impl Backend {
    /// Loads `checkpoint` for sequences of up to `context` positions.
    /// `batched`: feed prompts through batched prefill where it can run.
    pub fn open(
        checkpoint: &Checkpoint,
        device: DeviceKind,
        gpu: usize,
        context: usize,
        sampling: Option<Sampling>,
        batched: bool,
    ) -> Result<Self> {
        let engine = match device {
            DeviceKind::Cuda => {
                let mut decoder = GpuDecoder::new(checkpoint, context, gpu)?;
                decoder.set_sampling(sampling)?;
                let batched = batched && prefill_available(&decoder);
                Engine::Gpu {
                    decoder: Box::new(decoder),
                    batched,
                }
            }
            DeviceKind::Cpu => Engine::Cpu {
                model: Box::new(CpuModel::load(checkpoint)),
                cache: KvCache::new(&checkpoint.config),
                sampling,
            },
        };
        Ok(Backend {
            engine,
            cached: Vec::new(),
        })
    }

    pub fn device_name(&self) -> String {
        match &self.engine {
            Engine::Gpu { decoder, .. } => decoder.device.name.clone(),
            Engine::Cpu { .. } => "cpu".to_string(),
        }
    }

    /// Generates after `prompt` until an `eos` token or `max_new` tokens,
    /// calling `on_token` with each as soon as it is known. The positions
    /// where `prompt` begins as the last call's sequence did (its prompt and
    /// every generated token but the last) are not computed again.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        eos: &[u32],
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Timings> {
        // At least the prompt's last position is computed: its logits give
        // the first token. Until this call succeeds nothing is known to be
        // cached.
        let reused = common_prefix(&std::mem::take(&mut self.cached), prompt)
            .min(prompt.len().saturating_sub(1));
        let mut answer = Vec::new();
        let record = |token: u32| {
            answer.push(token);
            on_token(token)
        };
        let (first_token_ms, rest_ms, prompt_note) = match &mut self.engine {
            Engine::Gpu { decoder, batched } => {
                let batched = *batched && prompt.len() - reused >= PREFILL_MIN_TOKENS;
                let (first, rest) =
                    decoder.generate(prompt, reused, max_new, eos, batched, record)?;
                (first, rest, if batched { "" } else { ", one at a time" })
            }
            Engine::Cpu {
                model,
                cache,
                sampling,
            } => {
                cache.truncate(reused, &model.config);
                let (first, rest) =
                    cpu_generate(model, cache, prompt, max_new, eos, *sampling, record)?;
                (first, rest, "")
            }
        };
        // Every generated token but the last was fed back.
        self.cached = prompt.to_vec();
        self.cached
            .extend_from_slice(&answer[..answer.len().saturating_sub(1)]);
        Ok(Timings {
            first_token_ms,
            rest_ms,
            reused_tokens: reused,
            prompt_note,
        })
    }
}

/// How many leading ids `a` and `b` share.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Whether batched prefill can run; when it cannot, says why on stderr (the
/// prompt then goes through the decode kernel one token at a time).
fn prefill_available(decoder: &GpuDecoder) -> bool {
    match decoder.prefill_unavailable() {
        None => true,
        Some(why) => {
            crate::status!("note: {why}; prompts go one token at a time");
            false
        }
    }
}

/// Decoding on the CPU reference, greedy or sampled; returns the same
/// timings as the GPU path.
fn cpu_generate(
    model: &CpuModel,
    cache: &mut KvCache,
    prompt: &[u32],
    max_new: usize,
    eos: &[u32],
    sampling: Option<Sampling>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(f64, f64)> {
    let start = Instant::now();
    let mut logits = Vec::new();
    for &token in &prompt[cache.len(&model.config)..] {
        logits = model.forward(token, cache, None);
    }
    let mut first_token_ms = 0.0;
    for i in 0..max_new {
        // The draw of the token after position prompt.len() - 1 + i, as the
        // GPU's sampler numbers it.
        let token = match &sampling {
            None => argmax(&logits) as u32,
            Some(s) => s.sample(&logits, prompt.len() - 1 + i),
        };
        if i == 0 {
            first_token_ms = start.elapsed().as_secs_f64() * 1e3;
        }
        on_token(token)?;
        if eos.contains(&token) || i + 1 == max_new {
            break;
        }
        logits = model.forward(token, cache, None);
    }
    let total = start.elapsed().as_secs_f64() * 1e3;
    Ok((first_token_ms, total - first_token_ms))
}
