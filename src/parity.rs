//! `qwen-mk parity`: the GPU kernels against a transformers reference
//! (reference/README.md documents the file).
//!
//! qwen-mk runs teacher-forced on the float32 truth's sequence. A near-tie is
//! a step where the truth's top-2 logprob margin is below transformers-bf16's
//! largest logprob error. The run passes when qwen-mk's mean and max absolute
//! logprob error against the truth (on the truth's top-20 ids) are no larger
//! than transformers-bf16's, and qwen-mk's top-1 equals the truth's at every
//! step that is not a near-tie. A free-running greedy run is printed beside
//! it up to the first near-tie, and must agree there too. And the sampler
//! (`generate --sample`), run on the same steps, must draw at each the token
//! the CPU's sampler draws from the same logits.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::cli::ParityArgs;
use crate::config::ModelConfig;
use crate::cpu_reference::{argmax, logprobs_at};
use crate::gpu::GpuDecoder;
use crate::sampling::Sampling;
use crate::tokenizer::Tokenizer;

#[derive(Deserialize)]
pub struct Reference {
    pub format: String,
    pub model: ReferenceModel,
    pub prompt_ids: Vec<u32>,
    pub truth: Truth,
    pub peer: Peer,
}

#[derive(Deserialize)]
pub struct ReferenceModel {
    pub dir: String,
    #[serde(default)]
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub struct Truth {
    pub ids: Vec<u32>,
    pub top_ids: Vec<Vec<u32>>,
    pub top_logprobs: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
pub struct Peer {
    pub logprobs_at_truth_top: Vec<Vec<f64>>,
}

impl Reference {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read reference file {}", path.display()))?;
        let reference: Reference = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a qwen-mk parity reference", path.display()))?;
        if reference.format != "qwen-mk-parity/1" {
            bail!(
                "{} has format {:?}, expected \"qwen-mk-parity/1\"",
                path.display(),
                reference.format
            );
        }
        let steps = reference.truth.ids.len();
        if steps == 0
            || reference.prompt_ids.is_empty()
            || reference.truth.top_ids.len() != steps
            || reference.truth.top_logprobs.len() != steps
            || reference.peer.logprobs_at_truth_top.len() != steps
        {
            bail!(
                "{} is inconsistent: the per-step arrays differ in length",
                path.display()
            );
        }
        Ok(reference)
    }

    /// Mean and max |peer - truth| over every step's top-20 ids.
    pub fn peer_errors(&self) -> (f64, f64) {
        let errors = self
            .truth
            .top_logprobs
            .iter()
            .zip(&self.peer.logprobs_at_truth_top)
            .flat_map(|(truth, peer)| truth.iter().zip(peer).map(|(t, p)| (t - p).abs()));
        mean_max(errors)
    }

    /// Steps whose truth top-2 margin is below `threshold`.
    pub fn near_ties(&self, threshold: f64) -> Vec<bool> {
        self.truth
            .top_logprobs
            .iter()
            .map(|lp| lp.len() > 1 && lp[0] - lp[1] < threshold)
            .collect()
    }
}

fn mean_max(errors: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut sum, mut max, mut n) = (0.0, 0.0f64, 0usize);
    for e in errors {
        sum += e;
        max = max.max(e);
        n += 1;
    }
    (sum / n.max(1) as f64, max)
}

/// How the prompt goes in: batched prefill, its last `last_prefill` tokens
/// (if not 0) in a second prefill that continues the cache the first left,
/// as a chat turn continues a conversation; or one token at a time.
#[derive(Clone, Copy)]
enum PromptPath {
    Batched { last_prefill: usize },
    TokenByToken,
}

/// Runs `steps` decode steps teacher-forced on `sequence` after its first
/// `prompt_len` tokens, calling `each(step, logits)` with the logits the LM
/// head wrote at each.
fn teacher_forced(
    decoder: &mut GpuDecoder,
    sequence: &[u32],
    prompt_len: usize,
    path: PromptPath,
    steps: usize,
    mut each: impl FnMut(usize, &[f32]),
) -> Result<()> {
    let first = prompt_len - 1;
    let batched = matches!(path, PromptPath::Batched { .. });
    if let PromptPath::Batched { last_prefill } = path {
        decoder.reset(sequence, sequence.len(), first, None)?;
        let cached = match last_prefill {
            0 => 0,
            n => prompt_len - n,
        };
        if cached > 0 {
            decoder.enqueue_prefill(0, cached)?;
        }
        decoder.enqueue_prefill(cached, prompt_len - cached)?;
    } else {
        decoder.reset(sequence, sequence.len(), 0, None)?;
        for step in 0..first {
            decoder.enqueue_step(false)?;
            if step % 256 == 255 {
                decoder.synchronize()?; // keeps every watchdog wait short
            }
        }
    }
    for step in 0..steps {
        if batched && step == 0 {
            decoder.enqueue_lm_head(true)?; // the prefill left the last position's residual
        } else {
            decoder.enqueue_step(true)?;
        }
        each(step, &decoder.logits()?);
    }
    Ok(())
}

/// The sampler (`generate --sample`) on the same teacher-forced steps, with
/// Qwen3's recommended settings: the steps at which the kernel's draw is not
/// the one src/sampling.rs makes from the logits the LM head wrote.
fn check_sampler(
    decoder: &mut GpuDecoder,
    sequence: &[u32],
    prompt_len: usize,
    path: PromptPath,
    steps: usize,
) -> Result<Vec<usize>> {
    let sampling = Sampling {
        temperature: 0.6,
        top_k: 20,
        top_p: 0.95,
        seed: 1,
    };
    decoder.set_sampling(Some(sampling))?;
    let first = prompt_len - 1;
    let mut expected = Vec::with_capacity(steps);
    teacher_forced(
        decoder,
        sequence,
        prompt_len,
        path,
        steps,
        |step, logits| {
            expected.push(sampling.sample(logits, first + step));
        },
    )?;
    decoder.set_sampling(None)?;
    let drawn = decoder.predicted(first..first + steps)?;
    Ok((0..steps).filter(|&s| drawn[s] != expected[s]).collect())
}

/// Every id of the reference must have a row in the checkpoint's
/// vocabulary: they index the embedding on the GPU and the logits on the
/// host, and are checked before the GPU starts.
fn check_reference_ids(reference: &Reference, config: &ModelConfig) -> Result<()> {
    config.check_token_ids("prompt_ids", &reference.prompt_ids)?;
    config.check_token_ids("truth.ids", &reference.truth.ids)?;
    config.check_token_ids("truth.top_ids", reference.truth.top_ids.iter().flatten())
}

/// The checkpoint in `model_dir`, if it is the one `reference` (read from
/// `reference_path`) was made from: its ids fit the vocabulary, and the
/// qwen_mk metadata `synth` writes (seed, generator and shape) agrees.
fn open_reference_checkpoint(
    reference: &Reference,
    reference_path: &Path,
    model_dir: &str,
) -> Result<Checkpoint> {
    let checkpoint = Checkpoint::open(Path::new(model_dir))?;
    check_reference_ids(reference, &checkpoint.config).with_context(|| {
        format!(
            "reference {} does not fit checkpoint {model_dir}",
            reference_path.display()
        )
    })?;
    for (key, value) in &reference.model.metadata {
        let found = checkpoint.metadata.get(key);
        if key.starts_with("qwen_mk") && found != Some(value) {
            let found = found.map_or("absent".to_string(), |v| format!("{v:?}"));
            bail!(
                "checkpoint {model_dir} is not the one the reference was made from ({key} is {found}, the reference says {value:?}); \
                 regenerate it as reference/README.md says"
            );
        }
    }
    Ok(checkpoint)
}

/// The free-running ids beside the truth's, a row a step, up to the first
/// step where they part (returned: after it the two compare different
/// contexts). Near-tie steps are marked ~.
fn write_free_running(
    out: &mut impl Write,
    tokenizer: &Tokenizer,
    prompt_len: usize,
    truth: &[u32],
    free: &[u32],
    near_tie: &[bool],
) -> Result<Option<usize>> {
    for (step, (&r, &o)) in truth.iter().zip(free).enumerate() {
        writeln!(
            out,
            "{:>6} {:>8} {:>8}  {:<24} {:<24} {}{}",
            prompt_len + step,
            r,
            o,
            format!("{:?}", tokenizer.decode(&[r])?),
            format!("{:?}", tokenizer.decode(&[o])?),
            if r == o { "ok" } else { "differs" },
            if near_tie[step] { " ~" } else { "" }
        )?;
        if r != o {
            writeln!(
                out,
                "       (the sequences part here; later rows compare different contexts)"
            )?;
            return Ok(Some(step));
        }
    }
    Ok(None)
}

/// Runs the comparison; Ok(true) on pass, Ok(false) on fail, Err on a setup
/// problem.
pub fn run(args: &ParityArgs) -> Result<bool> {
    let reference = Reference::load(&args.reference)?;
    let model_dir = args
        .model
        .clone()
        .unwrap_or_else(|| reference.model.dir.clone());
    let checkpoint = open_reference_checkpoint(&reference, &args.reference, &model_dir)?;
    let tokenizer = Tokenizer::from_model_dir(Path::new(&model_dir))?;
    let prompt = &reference.prompt_ids;
    let truth = &reference.truth;
    let steps = truth.ids.len();
    if args.last_prefill >= prompt.len() {
        bail!(
            "--last-prefill must be less than the reference prompt's {} tokens",
            prompt.len()
        );
    }
    let mut decoder = GpuDecoder::new(&checkpoint, prompt.len() + steps, args.gpu)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "parity: {} on {} ({} blocks), prompt {} tokens, {steps} steps",
        args.reference.display(),
        decoder.device.name,
        decoder.decode_blocks,
        prompt.len()
    )?;

    if !args.token_by_token {
        if let Some(why) = decoder.prefill_unavailable() {
            bail!("batched prefill cannot run: {why} (or pass --token-by-token)");
        }
    }
    let path = if args.token_by_token {
        PromptPath::TokenByToken
    } else {
        PromptPath::Batched {
            last_prefill: args.last_prefill,
        }
    };
    let batched = matches!(path, PromptPath::Batched { .. });
    writeln!(
        out,
        "prompt path: {}",
        match path {
            PromptPath::Batched { last_prefill: 0 } => "batched prefill".to_string(),
            PromptPath::Batched { last_prefill } => format!(
                "batched prefill, the last {last_prefill} tokens continuing the cache of the rest"
            ),
            PromptPath::TokenByToken => "decode kernel, one token at a time".to_string(),
        }
    )?;

    // Teacher-forced on the truth's sequence.
    let sequence: Vec<u32> = prompt.iter().chain(&truth.ids).copied().collect();
    let first = prompt.len() - 1;
    let mut our_errors = Vec::with_capacity(steps);
    let mut our_top1 = Vec::with_capacity(steps);
    teacher_forced(
        &mut decoder,
        &sequence,
        prompt.len(),
        path,
        steps,
        |step, logits| {
            let ours = logprobs_at(logits, &truth.top_ids[step]);
            our_errors.extend(
                ours.iter()
                    .zip(&truth.top_logprobs[step])
                    .map(|(o, t)| (o - t).abs()),
            );
            our_top1.push(argmax(logits) as u32);
        },
    )?;
    let kernel_top1 = decoder.predicted(first..first + steps)?;
    if kernel_top1 != our_top1 {
        let step = kernel_top1
            .iter()
            .zip(&our_top1)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        writeln!(
            out,
            "FAIL: the LM-head kernel's argmax ({}) differs from the argmax of its own logits ({}) at step {step}",
            kernel_top1[step], our_top1[step]
        )?;
        return Ok(false);
    }

    let (peer_mean, peer_max) = reference.peer_errors();
    let (our_mean, our_max) = mean_max(our_errors.iter().copied());
    let near_tie = reference.near_ties(peer_max);
    let top1_misses: Vec<usize> = (0..steps)
        .filter(|&s| !near_tie[s] && our_top1[s] != truth.ids[s])
        .collect();
    let first_near_tie = near_tie.iter().position(|&t| t).unwrap_or(steps);

    // Free-running greedy from the prompt, compared up to the first near-tie.
    let mut free = Vec::with_capacity(steps);
    decoder.generate(prompt, 0, steps, &[], batched, |t| {
        free.push(t);
        Ok(())
    })?;
    writeln!(out, "\nfree-running greedy vs the float32 truth (near-tie steps marked ~; agreement is required up to the first, step {first_near_tie}):")?;
    writeln!(
        out,
        "{:>6} {:>8} {:>8}  {:<24} {:<24} match",
        "pos", "ref id", "qwen-mk", "ref text", "qwen-mk text"
    )?;
    let parted = write_free_running(
        &mut out,
        &tokenizer,
        prompt.len(),
        &truth.ids,
        &free,
        &near_tie,
    )?;
    let free_mismatch = parted.filter(|&step| step < first_near_tie);

    let sampler_misses = check_sampler(&mut decoder, &sequence, prompt.len(), path, steps)?;
    let pass = our_mean <= peer_mean
        && our_max <= peer_max
        && top1_misses.is_empty()
        && free_mismatch.is_none()
        && sampler_misses.is_empty();
    writeln!(
        out,
        "\nteacher-forced logprob error vs float32 truth (top-20 ids, {steps} steps):\n  qwen-mk           mean {our_mean:.5}  max {our_max:.5}\n  transformers-bf16 mean {peer_mean:.5}  max {peer_max:.5}"
    )?;
    writeln!(
        out,
        "near-ties (truth top-2 margin < {peer_max:.5}): {}; top-1 mismatches outside near-ties: {:?}",
        near_tie.iter().filter(|&&t| t).count(),
        top1_misses
    )?;
    writeln!(
        out,
        "{}: qwen-mk error {} transformers-bf16's (mean {our_mean:.5} vs {peer_mean:.5}, max {our_max:.5} vs {peer_max:.5}); top-1 {} at all {} non-near-tie steps; free-running greedy {}; sampler {}",
        if pass { "PASS" } else { "FAIL" },
        if our_mean <= peer_mean && our_max <= peer_max { "is within" } else { "EXCEEDS" },
        if top1_misses.is_empty() { "matches" } else { "DIFFERS" },
        near_tie.iter().filter(|&&t| !t).count(),
        match free_mismatch {
            None => format!("matches up to step {first_near_tie}"),
            Some(s) => format!("DIVERGES at step {s}"),
        },
        if sampler_misses.is_empty() {
            format!("matches the CPU's draws at all {steps} steps")
        } else {
            format!("DIFFERS from the CPU's draws at steps {sampler_misses:?}")
        }
    )?;
    if let Some(path) = &args.json {
        let report = json!({
            "reference": args.reference.display().to_string(),
            "device": decoder.device.name,
            "prompt_path": if batched { "batched-prefill" } else { "token-by-token" },
            "last_prefill": args.last_prefill,
            "prompt_tokens": prompt.len(),
            "pass": pass,
            "qwen_mk": {"mean_abs_err": our_mean, "max_abs_err": our_max, "top1": our_top1, "free_running": free},
            "peer": {"mean_abs_err": peer_mean, "max_abs_err": peer_max},
            "near_ties": (0..steps).filter(|&s| near_tie[s]).collect::<Vec<_>>(),
            "top1_mismatches": top1_misses,
            "sampler_mismatches": sampler_misses,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(pass)
}
