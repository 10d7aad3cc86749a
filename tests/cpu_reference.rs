//! The CPU reference forward against transformers' float32 goldens for the
//! tiny synthetic checkpoint (reference/tiny-tokens.json, made by
//! reference/make_reference.py on the device).
//!
//! Tolerance: both sides compute in f32 on the same bf16 weights and differ
//! only in summation order, so logprobs agree to well under 1e-4.

mod common;

use qwen_mk::checkpoint::Checkpoint;
use qwen_mk::cpu_reference::{argmax, logprobs_at, CpuModel, KvCache};
use qwen_mk::parity::Reference;

const LOGPROB_TOLERANCE: f64 = 1e-4;

fn golden() -> (Reference, serde_json::Value) {
    golden_file("tiny-tokens.json")
}

fn golden_file(name: &str) -> (Reference, serde_json::Value) {
    let path = common::reference_file(name);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    (Reference::load(&path).unwrap(), raw)
}

#[test]
fn teacher_forced_logprobs_match_transformers() {
    let (reference, _) = golden();
    let seed: u64 = reference.model.metadata["qwen_mk_seed"].parse().unwrap();
    let dir = common::tiny_checkpoint(seed, true);
    let worst = teacher_forced_error(dir.path(), &reference, reference.truth.ids.len());
    assert!(
        worst < LOGPROB_TOLERANCE,
        "largest logprob error {worst} exceeds {LOGPROB_TOLERANCE}"
    );
}

/// The full Qwen3-0.6B shape (28 layers, theta 1e6) against the reference
/// the GPU parity run uses, for its first steps (the CPU is slow). Summation
/// order differs over 28 layers of width 1024-3072, hence the looser bound.
#[test]
fn full_size_checkpoint_matches_the_gpu_parity_reference() {
    let (reference, _) = golden_file("tokens.json");
    let dir = full_size_checkpoint(&reference);
    let worst = teacher_forced_error(dir.path(), &reference, 6);
    assert!(worst < 1e-3, "largest logprob error {worst} exceeds 1e-3");
}

/// The batched-prefill references (reference/tokens-prefill-N.json, prompt
/// lengths that are no multiple of a tile) have the prompt lengths their
/// names say, and the two shortest agree with the CPU reference.
#[test]
fn prefill_references_have_their_lengths_and_match_the_cpu_reference() {
    for n in [1usize, 7, 129, 1000, 4097] {
        let (reference, _) = golden_file(&format!("tokens-prefill-{n}.json"));
        assert_eq!(reference.prompt_ids.len(), n, "tokens-prefill-{n}.json");
    }
    let (first, _) = golden_file("tokens-prefill-1.json");
    let dir = full_size_checkpoint(&first);
    for n in [1, 7] {
        let (reference, _) = golden_file(&format!("tokens-prefill-{n}.json"));
        let worst = teacher_forced_error(dir.path(), &reference, 4);
        assert!(
            worst < 1e-3,
            "prompt of {n}: largest logprob error {worst} exceeds 1e-3"
        );
    }
}

/// The long-context references reach the attention regimes they are kept
/// for, on a 132-SM H100 or H200 (16 decode blocks a KV head): with
/// tokens-long.json a head's cache is split over its blocks in chunks of at
/// most one tile a consumer warp; with tokens-9k.json the chunks are more
/// than two tiles a warp, so the decode kernel's warps loop over tiles.
#[test]
fn long_references_reach_several_tiles_a_warp() {
    use qwen_mk::kernel_dims::{DECODE_KV_TILE, DECODE_THREADS, NUM_KV_HEADS};
    let consumer_warps = DECODE_THREADS / 32 - 1; // one producer warp
    let blocks_per_kv_head = 132 / NUM_KV_HEADS;
    let chunk_at = |reference: &Reference| reference.prompt_ids.len() / blocks_per_kv_head;
    let (long, _) = golden_file("tokens-long.json");
    assert_eq!(long.prompt_ids.len(), 4100);
    assert!(chunk_at(&long) <= consumer_warps * DECODE_KV_TILE);
    let (longer, _) = golden_file("tokens-9k.json");
    assert_eq!(longer.prompt_ids.len(), 9000);
    assert_eq!(longer.truth.ids.len(), 64);
    assert!(
        chunk_at(&longer) > 2 * consumer_warps * DECODE_KV_TILE,
        "tokens-9k.json's chunks of {} keys are not two tiles a warp",
        chunk_at(&longer)
    );
}

/// The synthetic full-size checkpoint a GPU reference was made from.
fn full_size_checkpoint(reference: &Reference) -> tempfile::TempDir {
    common::full_size_checkpoint(reference.model.metadata["qwen_mk_seed"].parse().unwrap())
}

/// Runs the CPU reference teacher-forced over the golden's first `steps`
/// steps, asserting the greedy ids; returns the largest logprob error.
fn teacher_forced_error(dir: &std::path::Path, reference: &Reference, steps: usize) -> f64 {
    let checkpoint = Checkpoint::open(dir).unwrap();
    assert_eq!(
        checkpoint.metadata, reference.model.metadata,
        "the checkpoint is not the golden's"
    );
    let model = CpuModel::load(&checkpoint);

    let mut cache = KvCache::new(&model.config);
    let mut logits = Vec::new();
    for &token in &reference.prompt_ids {
        logits = model.forward(token, &mut cache, None);
    }
    let truth = &reference.truth;
    let mut worst: f64 = 0.0;
    for step in 0..steps {
        assert_eq!(
            argmax(&logits) as u32,
            truth.ids[step],
            "greedy id differs at step {step}"
        );
        let ours = logprobs_at(&logits, &truth.top_ids[step]);
        for (o, expected) in ours.iter().zip(&truth.top_logprobs[step]) {
            worst = worst.max((o - expected).abs());
        }
        logits = model.forward(truth.ids[step], &mut cache, None);
    }
    eprintln!("largest logprob error against transformers float32 over {steps} steps: {worst:.2e}");
    worst
}

#[test]
fn per_layer_hidden_states_are_inspectable() {
    let dir = common::tiny_checkpoint(1, true);
    let model = CpuModel::load(&Checkpoint::open(dir.path()).unwrap());
    let mut trace = Vec::new();
    let mut cache = KvCache::new(&model.config);
    model.forward(785, &mut cache, Some(&mut trace));
    assert_eq!(trace.len(), model.config.num_hidden_layers);
    assert!(trace
        .iter()
        .all(|h| h.len() == model.config.hidden_size && h.iter().all(|v| v.is_finite())));
    assert_ne!(trace[0], trace[1]);
}

/// `qwen-mk generate --device cpu` on the tiny golden's checkpoint and
/// prompt, for as many new tokens as the golden has, with `extra` arguments.
struct GoldenGenerate {
    reference: Reference,
    prompt: String,
    dir: tempfile::TempDir,
}

impl GoldenGenerate {
    fn new() -> Self {
        let (reference, raw) = golden();
        let seed = reference.model.metadata["qwen_mk_seed"].parse().unwrap();
        Self {
            dir: common::tiny_checkpoint(seed, true),
            prompt: raw["prompt"].as_str().unwrap().to_string(),
            reference,
        }
    }

    fn run(&self, extra: &[&str]) -> serde_json::Value {
        let steps = self.reference.truth.ids.len().to_string();
        let mut args = vec![
            "--model",
            self.dir.path().to_str().unwrap(),
            "--device",
            "cpu",
            "--prompt",
            &self.prompt,
            "--max-new-tokens",
            &steps,
            "--ignore-eos",
        ];
        args.extend_from_slice(extra);
        common::generate_json(&args)
    }
}

#[test]
fn cli_generate_on_cpu_gives_the_transformers_ids() {
    let golden = GoldenGenerate::new();
    let report = golden.run(&[]);
    let reference = &golden.reference;
    assert_eq!(common::ids(&report["prompt_ids"]), reference.prompt_ids);
    assert_eq!(common::ids(&report["generated_ids"]), reference.truth.ids);
}

#[test]
fn cli_sampling_on_cpu_is_fixed_by_its_seed_and_top_k_one_is_greedy() {
    let golden = GoldenGenerate::new();
    let run = |extra: &[&str]| golden.run(extra);
    let reference = &golden.reference;
    // The checkpoint's generation_config.json (Qwen3's: 0.6, 20, 0.95).
    let first = run(&["--sample", "--seed", "11"]);
    assert_eq!(
        first["decoding"],
        serde_json::json!({"temperature": 0.6f32, "top_k": 20, "top_p": 0.95f32, "seed": 11})
    );
    let again = run(&["--sample", "--seed", "11"]);
    let other = run(&["--sample", "--seed", "12"]);
    let ids = |r: &serde_json::Value| common::ids(&r["generated_ids"]);
    assert_eq!(ids(&first), ids(&again));
    assert_ne!(ids(&first), ids(&other));
    assert_ne!(ids(&first), reference.truth.ids);
    // One candidate: the argmax, whatever the seed; temperature 0: greedy.
    assert_eq!(
        ids(&run(&["--top-k", "1", "--seed", "3"])),
        reference.truth.ids
    );
    let greedy = run(&["--temperature", "0"]);
    assert_eq!(greedy["decoding"], "greedy");
    assert_eq!(ids(&greedy), reference.truth.ids);
}
