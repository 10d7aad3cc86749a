//! Sampling the next token instead of taking the argmax (`generate
//! --sample`): temperature, top-k, then top-p, in the order transformers'
//! logits warpers apply them, and one uniform draw per position from a
//! counter-based generator of (seed, position). `choose` is the math
//! kernels/sample.cu runs, step for step in f32, so the CPU backend and the
//! GPU pick the same token from the same logits.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::json_field;
use crate::kernel_dims::SAMPLE_MAX_TOP_K;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub seed: u64,
}

/// What the command line asked for; unset fields come from the
/// checkpoint's generation_config.json, then transformers' defaults.
#[derive(Clone, Copy, Debug, Default)]
pub struct SamplingRequest {
    pub sample: bool,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
}

impl SamplingRequest {
    /// None for greedy decoding: neither --sample nor a sampling setting
    /// (a seed counts) was given, or --temperature 0.
    pub fn resolve(&self, model_dir: &Path) -> Result<Option<Sampling>> {
        let asked = self.sample
            || self.temperature.is_some()
            || self.top_k.is_some()
            || self.top_p.is_some()
            || self.seed.is_some();
        if !asked || self.temperature == Some(0.0) {
            return Ok(None);
        }
        let file = GenerationDefaults::read(model_dir)?;
        Ok(Some(Sampling {
            temperature: file.pick(
                ("--temperature", self.temperature),
                ("temperature", file.temperature),
                temperature_problem,
            )?,
            top_k: file.pick(
                ("--top-k", self.top_k),
                ("top_k", file.top_k),
                top_k_problem,
            )?,
            top_p: file.pick(
                ("--top-p", self.top_p),
                ("top_p", file.top_p),
                top_p_problem,
            )?,
            seed: self.seed.unwrap_or_else(clock_seed),
        }))
    }
}

// What is wrong with a setting's value, if anything.

fn temperature_problem(temperature: f32) -> Option<String> {
    (!(temperature.is_finite() && temperature > 0.0))
        .then(|| "must be a positive number (--temperature 0 decodes greedily)".to_string())
}

fn top_k_problem(top_k: usize) -> Option<String> {
    (!(1..=SAMPLE_MAX_TOP_K).contains(&top_k)).then(|| {
        format!(
            "must be between 1 and {SAMPLE_MAX_TOP_K} (qwen-mk samples among at most the {SAMPLE_MAX_TOP_K} most likely tokens)"
        )
    })
}

fn top_p_problem(top_p: f32) -> Option<String> {
    (!(top_p > 0.0 && top_p <= 1.0)).then(|| "must be in (0, 1]".to_string())
}

/// The settings, as `generate` and `chat` print them: "temperature 0.6,
/// top-k 20, top-p 0.95" (the seed apart).
impl std::fmt::Display for Sampling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "temperature {}, top-k {}, top-p {}",
            self.temperature, self.top_k, self.top_p
        )
    }
}

/// How tokens are picked, as `generate --json` and `chat --json` report it.
pub fn describe(sampling: Option<Sampling>) -> serde_json::Value {
    match sampling {
        None => serde_json::json!("greedy"),
        Some(s) => serde_json::json!({
            "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p, "seed": s.seed
        }),
    }
}

impl Sampling {
    /// The token for position `pos` from a whole vocabulary of logits.
    pub fn sample(&self, logits: &[f32], pos: usize) -> u32 {
        let mut order: Vec<u32> = (0..logits.len() as u32).collect();
        // Largest logit first, ties to the lower id (as argmax_key orders them).
        let by_rank = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = self.top_k.min(order.len());
        if k < order.len() {
            order.select_nth_unstable_by(k - 1, by_rank);
            order.truncate(k);
        }
        order.sort_unstable_by(by_rank);
        let best: Vec<(f32, u32)> = order.iter().map(|&id| (logits[id as usize], id)).collect();
        choose(
            &best,
            self.temperature,
            self.top_p,
            uniform(self.seed, pos as u32),
        )
    }
}

/// The token drawn from `best` (logit, id), largest first: softmax at the
/// temperature, the smallest prefix whose mass reaches top_p (at least one
/// token), then the first token whose running mass passes u times the kept
/// mass. kernels/sample.cu's `choose`, in the same f32 steps.
pub fn choose(best: &[(f32, u32)], temperature: f32, top_p: f32, u: f32) -> u32 {
    let kept = Nucleus::of(best, temperature, top_p);
    let target = u * kept.mass;
    let mut running = 0.0f32;
    for &(logit, id) in &best[..kept.len] {
        running += kept.weight(logit);
        if target < running {
            return id;
        }
    }
    best[kept.len - 1].1
}

/// The probability of each token `choose` may draw, for comparison with
/// transformers' warpers (tests).
pub fn distribution(best: &[(f32, u32)], temperature: f32, top_p: f32) -> Vec<(u32, f32)> {
    let kept = Nucleus::of(best, temperature, top_p);
    best[..kept.len]
        .iter()
        .map(|&(logit, id)| (id, kept.weight(logit) / kept.mass))
        .collect()
}

/// The tokens top-p keeps of the top k: the first `len` of them, whose
/// unnormalised weights add up to `mass`.
struct Nucleus {
    top: f32,
    temperature: f32,
    len: usize,
    mass: f32,
}

impl Nucleus {
    fn of(best: &[(f32, u32)], temperature: f32, top_p: f32) -> Self {
        let mut nucleus = Self {
            top: best[0].0 / temperature,
            temperature,
            len: 0,
            mass: 0.0,
        };
        let total: f32 = best
            .iter()
            .fold(0.0, |sum, &(logit, _)| sum + nucleus.weight(logit));
        while nucleus.len < best.len() && (nucleus.len == 0 || nucleus.mass < top_p * total) {
            nucleus.mass += nucleus.weight(best[nucleus.len].0);
            nucleus.len += 1;
        }
        nucleus
    }

    /// A token's softmax numerator at the temperature.
    fn weight(&self, logit: f32) -> f32 {
        (logit / self.temperature - self.top).exp()
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The draw for position `pos`: 24 random bits as a float in [0, 1).
pub fn uniform(seed: u64, pos: u32) -> f32 {
    (splitmix64(seed ^ splitmix64(pos as u64)) >> 40) as f32 * (1.0 / 16_777_216.0)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.as_nanos() as u64)
        .unwrap_or(0)
}

/// The sampling settings a checkpoint recommends, with transformers'
/// defaults (temperature 1, top-k 50, top-p 1) for those it leaves out.
struct GenerationDefaults {
    path: PathBuf,
    temperature: FileValue<f32>,
    top_k: FileValue<usize>,
    top_p: FileValue<f32>,
}

/// A value of generation_config.json, or transformers' default where the
/// file has none (`in_file` false).
#[derive(Clone, Copy)]
struct FileValue<T> {
    value: T,
    in_file: bool,
}

impl<T> FileValue<T> {
    fn default(value: T) -> Self {
        Self {
            value,
            in_file: false,
        }
    }

    fn in_file(value: T) -> Self {
        Self {
            value,
            in_file: true,
        }
    }
}

impl GenerationDefaults {
    fn read(model_dir: &Path) -> Result<Self> {
        let mut defaults = Self {
            path: model_dir.join("generation_config.json"),
            temperature: FileValue::default(1.0),
            top_k: FileValue::default(50),
            top_p: FileValue::default(1.0),
        };
        let path = &defaults.path;
        if !path.is_file() {
            return Ok(defaults);
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let in_path = format!("in {}", path.display());
        defaults.read_settings(&json).context(in_path)?;
        Ok(defaults)
    }

    /// The file's settings, of the types transformers writes them in.
    fn read_settings(&mut self, json: &Value) -> Result<()> {
        json_field::check_object(json)?;
        if let Some(t) = json_field::number(json, "temperature")? {
            self.temperature = FileValue::in_file(t as f32);
        }
        if let Some(k) = json_field::count(json, "top_k")? {
            self.top_k = FileValue::in_file(usize::try_from(k).unwrap_or(usize::MAX));
        }
        if let Some(p) = json_field::number(json, "top_p")? {
            self.top_p = FileValue::in_file(p as f32);
        }
        Ok(())
    }

    /// A setting: the command line's value (`flag`), else this file's
    /// (`field`), checked by `problem`; an error names where the value
    /// came from.
    fn pick<T: Copy + std::fmt::Display>(
        &self,
        (flag, given): (&str, Option<T>),
        (field, file): (&str, FileValue<T>),
        problem: fn(T) -> Option<String>,
    ) -> Result<T> {
        let value = given.unwrap_or(file.value);
        let Some(why) = problem(value) else {
            return Ok(value);
        };
        if given.is_none() && file.in_file {
            bail!(
                "{field} in {} {why}, not {value}; pass {flag} to override it",
                self.path.display()
            );
        }
        bail!("{flag} {why}, not {value}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(temperature: f32, top_k: usize, top_p: f32) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 7,
        }
    }

    #[test]
    fn top_k_of_one_is_the_argmax_with_ties_to_the_lower_id() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
        for pos in 0..20 {
            assert_eq!(sampling(0.7, 1, 1.0).sample(&logits, pos), 1);
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_that_reaches_it() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 at temperature 1.
        let ln = |p: f32| p.ln();
        let best = [(ln(0.5), 3), (ln(0.25), 1), (ln(0.125), 0), (ln(0.125), 2)];
        // top_p 0.6: {3, 1} (0.5 < 0.6, 0.75 >= 0.6): u below 2/3 picks 3, above picks 1.
        assert_eq!(choose(&best, 1.0, 0.6, 0.0), 3);
        assert_eq!(choose(&best, 1.0, 0.6, 0.66), 3);
        assert_eq!(choose(&best, 1.0, 0.6, 0.67), 1);
        assert_eq!(choose(&best, 1.0, 0.6, 0.999), 1);
        // top_p 0.5 reached by the first alone; a tiny top_p still keeps one.
        assert_eq!(choose(&best, 1.0, 0.5, 0.999), 3);
        assert_eq!(choose(&best, 1.0, 1e-6, 0.999), 3);
        // top_p 1: all four; u in the last eighth picks the last.
        assert_eq!(choose(&best, 1.0, 1.0, 0.9), 2);
        assert_eq!(choose(&best, 1.0, 1.0, 0.8), 0);
    }

    #[test]
    fn frequencies_follow_the_tempered_distribution() {
        // Over many positions, each kept token's share is its softmax at the
        // temperature among the top k (top_p 1).
        let logits = [1.0f32, 3.0, 2.0, 0.0, 2.5];
        let s = sampling(0.8, 3, 1.0);
        let weights: Vec<f32> = [3.0f32, 2.5, 2.0]
            .iter()
            .map(|l| ((l - 3.0) / 0.8).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let n = 40_000;
        let mut counts = [0usize; 5];
        for pos in 0..n {
            counts[s.sample(&logits, pos) as usize] += 1;
        }
        assert_eq!(counts[0] + counts[3], 0, "{counts:?}");
        for (id, w) in [(1, weights[0]), (4, weights[1]), (2, weights[2])] {
            let share = counts[id] as f32 / n as f32;
            assert!(
                (share - w / total).abs() < 0.01,
                "{id}: {share} vs {}",
                w / total
            );
        }
    }

    #[test]
    fn draws_are_uniform_and_fixed_by_seed_and_position() {
        assert_eq!(uniform(1, 5), uniform(1, 5));
        assert_ne!(uniform(1, 5), uniform(2, 5));
        assert_ne!(uniform(1, 5), uniform(1, 6));
        let n = 100_000;
        let mean = (0..n).map(|p| uniform(42, p) as f64).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "{mean}");
        assert!((0..n).all(|p| (0.0..1.0).contains(&uniform(9, p))));
    }

    #[test]
    fn settings_come_from_the_command_line_then_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("qwen-mk-sampling-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"do_sample": true, "temperature": 0.6, "top_k": 20, "top_p": 0.95}"#,
        )
        .unwrap();
        let cases = [
            (SamplingRequest::default(), None),
            (
                SamplingRequest {
                    temperature: Some(0.0),
                    ..Default::default()
                },
                None,
            ),
            (
                SamplingRequest {
                    sample: true,
                    seed: Some(3),
                    ..Default::default()
                },
                Some(sampling_seeded(0.6, 20, 0.95, 3)),
            ),
            (
                SamplingRequest {
                    seed: Some(4),
                    ..Default::default()
                },
                Some(sampling_seeded(0.6, 20, 0.95, 4)),
            ),
            (
                SamplingRequest {
                    top_k: Some(5),
                    seed: Some(3),
                    ..Default::default()
                },
                Some(sampling_seeded(0.6, 5, 0.95, 3)),
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(request.resolve(&dir).unwrap(), expected, "{request:?}");
        }
        for (bad, what) in [
            (
                SamplingRequest {
                    top_k: Some(65),
                    ..Default::default()
                },
                "--top-k must be between 1 and 64",
            ),
            (
                SamplingRequest {
                    top_k: Some(0),
                    ..Default::default()
                },
                "--top-k must be between 1 and 64",
            ),
            (
                SamplingRequest {
                    top_p: Some(1.5),
                    ..Default::default()
                },
                "--top-p must be in (0, 1]",
            ),
            (
                SamplingRequest {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "--temperature must be a positive number",
            ),
        ] {
            let err = bad.resolve(&dir).unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rebuilds a case's logits as reference/make_sampling_reference.py
    /// makes them.
    fn case_logits(seed: u64, vocab: usize, scale: f64) -> Vec<f32> {
        (0..vocab as u64)
            .map(|i| {
                let bits = splitmix64(seed * 1_000_003 + i) >> 40;
                ((bits as f64 / 16_777_216.0 * 2.0 - 1.0) * scale) as f32
            })
            .collect()
    }

    #[test]
    fn the_kept_tokens_and_their_odds_are_transformers() {
        let golden: serde_json::Value =
            serde_json::from_str(include_str!("../reference/sampling.json")).unwrap();
        let cases = golden["cases"].as_array().unwrap();
        assert!(cases.len() >= 5);
        for case in cases {
            let f = |name: &str| case[name].as_f64().unwrap();
            let logits = case_logits(f("seed") as u64, f("vocab") as usize, f("scale"));
            let top_k = f("top_k") as usize;
            let mut order: Vec<u32> = (0..logits.len() as u32).collect();
            order.sort_by(|a, b| logits[*b as usize].total_cmp(&logits[*a as usize]));
            let best: Vec<(f32, u32)> = order[..top_k]
                .iter()
                .map(|&id| (logits[id as usize], id))
                .collect();
            let ours = distribution(&best, f("temperature") as f32, f("top_p") as f32);
            let ids: Vec<u32> = case["kept_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let probs: Vec<f64> = case["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(
                ours.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
                ids,
                "case seed {}",
                f("seed")
            );
            for ((_, p), q) in ours.iter().zip(&probs) {
                assert!(
                    (*p as f64 - q).abs() < 1e-5,
                    "case seed {}: {p} vs {q}",
                    f("seed")
                );
            }
        }
    }

    fn sampling_seeded(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed,
        }
    }
}
