//! The command line: `generate`, `chat`, `bench`, `parity`, `synth`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model_source::DEFAULT_MODEL;
use crate::synthetic::{Head, Shape};

#[derive(Parser)]
#[command(
    name = "qwen-mk",
    version,
    about = "Qwen3-0.6B (bf16) text generation with one CUDA megakernel per decode step"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Generate text from a prompt (greedy), streaming it as it decodes.
    Generate(GenerateArgs),
    /// Talk with the model: one message a line on stdin, each answer
    /// streamed (sampled with the checkpoint's settings; --temperature 0
    /// for greedy). /clear starts over, /exit or end of input ends.
    Chat(ChatArgs),
    /// Measure decode speed on the GPU against the memory-bandwidth floor.
    Bench(BenchArgs),
    /// Check the GPU kernels against a transformers reference file.
    Parity(ParityArgs),
    /// Write a synthetic checkpoint (random weights, real shapes) in the Hugging Face layout.
    Synth(SynthArgs),
}

#[derive(Args, Clone)]
pub struct ModelArgs {
    /// A local checkpoint directory, or a Hugging Face repo id.
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Which GPU to use (CUDA ordinal).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    Cuda,
    Cpu,
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text; used as is unless --chat.
    #[arg(long, required_unless_present = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from this file instead, as it is (a final newline
    /// included); `-` reads standard input.
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// With --chat: a system message.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// With --chat: ask Qwen3 to answer without its <think> block.
    #[arg(long, requires = "chat")]
    pub no_think: bool,
    /// Stop after this many new tokens (or at an end-of-sequence token).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Where to run: the fused CUDA kernels, or the (slow) CPU reference.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cuda)]
    pub device: DeviceKind,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Feed the prompt through the decode kernel one token at a time instead
    /// of batched prefill (for comparison; prompts of 1-2 tokens always are).
    #[arg(long)]
    pub token_by_token: bool,
    /// Sample the tokens with the checkpoint's generation_config.json
    /// settings (temperature, top-k, top-p) instead of taking the most
    /// likely one. Any of the four below implies it.
    #[arg(long)]
    pub sample: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// Sampling settings over the checkpoint's generation_config.json.
#[derive(Args, Clone, Copy)]
pub struct SamplingArgs {
    /// Sampling temperature (0: greedy).
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Sample among the k most likely tokens (1 to 64).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the fewest most likely tokens whose probability reaches p.
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the sampling draws (default: from the clock; --json reports it).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    /// What these settings ask for; `sample`: whether to sample even if none is given.
    pub fn request(&self, sample: bool) -> crate::sampling::SamplingRequest {
        crate::sampling::SamplingRequest {
            sample,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }
}

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A system message for the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Ask Qwen3 to answer without its <think> block.
    #[arg(long)]
    pub no_think: bool,
    /// Stop each answer after this many tokens (or at an end-of-sequence
    /// token) [default: 2048, or the context less one if that is smaller]
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// Positions the conversation may fill (default: the model's context).
    #[arg(long)]
    pub context: Option<usize>,
    /// Where to run: the fused CUDA kernels, or the (slow) CPU reference.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cuda)]
    pub device: DeviceKind,
    /// Print one JSON object a turn (ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Feed each turn's new tokens through the decode kernel one at a time
    /// instead of batched prefill (for comparison).
    #[arg(long)]
    pub token_by_token: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Context positions to measure decode speed at.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0usize, 1024, 4096, 16384])]
    pub positions: Vec<usize>,
    /// Decode steps per timed run.
    #[arg(long, default_value_t = 256)]
    pub steps: usize,
    /// Timed runs per position (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also time each phase of the decode kernel (in-kernel timestamps).
    #[arg(long)]
    pub profile: bool,
    /// Prompt lengths to time batched prefill at (time to first token); 0 skips it.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1024usize, 4096, 8192])]
    pub prefill_lengths: Vec<usize>,
}

#[derive(Args)]
pub struct ParityArgs {
    /// Reference file written by reference/make_reference.py.
    #[arg(long = "ref")]
    pub reference: PathBuf,
    /// Checkpoint directory; defaults to the one the reference names.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Also write the comparison as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Feed the prompt through the decode kernel one token at a time instead
    /// of batched prefill.
    #[arg(long, conflicts_with = "last_prefill")]
    pub token_by_token: bool,
    /// Send the prompt's last N tokens through a second batched prefill that
    /// continues the cache the first left, as a chat turn does (0: all at
    /// once).
    #[arg(long, default_value_t = 0)]
    pub last_prefill: usize,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Directory to write the checkpoint into.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Shape::Qwen3_0_6B)]
    pub shape: Shape,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write a separate lm_head.weight instead of tying it to the embedding.
    #[arg(long)]
    pub untied: bool,
    /// A test head for the argmax: `eos-wins` or `all-ties` (see `synthetic.rs`).
    #[arg(long, value_enum, default_value_t = Head::Random)]
    pub head: Head,
    /// The real model's non-weight files (config, tokenizer).
    #[arg(long, default_value = "assets/qwen3-0.6b")]
    pub assets: PathBuf,
}
