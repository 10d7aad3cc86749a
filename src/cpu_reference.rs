//! The CPU reference forward pass of Qwen3: f32 arithmetic on the bf16
//! weights, one token at a time, with a KV cache. It is the oracle the GPU
//! kernels are checked against and the `--device cpu` backend: slow, but
//! correct anywhere, for any Qwen3 size.

use crate::checkpoint::{Checkpoint, LayerTensor, FINAL_NORM};
use crate::config::ModelConfig;
use crate::rope;

struct Layer {
    input_norm: Vec<f32>,
    q_proj: Vec<f32>,
    k_proj: Vec<f32>,
    v_proj: Vec<f32>,
    o_proj: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    gate_proj: Vec<f32>,
    up_proj: Vec<f32>,
    down_proj: Vec<f32>,
}

pub struct CpuModel {
    pub config: ModelConfig,
    embed: Vec<f32>,
    /// None when the head is tied to the embedding.
    lm_head: Option<Vec<f32>>,
    final_norm: Vec<f32>,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
}

/// Keys and values of every layer, f32, one row of `kv_dim` per position.
pub struct KvCache {
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl KvCache {
    pub fn new(config: &ModelConfig) -> Self {
        Self {
            keys: vec![Vec::new(); config.num_hidden_layers],
            values: vec![Vec::new(); config.num_hidden_layers],
        }
    }

    /// Positions cached so far.
    pub fn len(&self, config: &ModelConfig) -> usize {
        self.keys.first().map_or(0, |k| k.len() / config.kv_dim())
    }

    /// Forgets every position from `positions` on (a no-op if fewer are
    /// cached).
    pub fn truncate(&mut self, positions: usize, config: &ModelConfig) {
        let len = positions * config.kv_dim();
        for cached in self.keys.iter_mut().chain(self.values.iter_mut()) {
            cached.truncate(len);
        }
    }
}

impl CpuModel {
    pub fn load(checkpoint: &Checkpoint) -> Self {
        let config = checkpoint.config.clone();
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let get = |t: LayerTensor| checkpoint.to_f32(&t.name(i));
                Layer {
                    input_norm: get(LayerTensor::InputNorm),
                    q_proj: get(LayerTensor::QProj),
                    k_proj: get(LayerTensor::KProj),
                    v_proj: get(LayerTensor::VProj),
                    o_proj: get(LayerTensor::OProj),
                    q_norm: get(LayerTensor::QNorm),
                    k_norm: get(LayerTensor::KNorm),
                    post_attn_norm: get(LayerTensor::PostAttnNorm),
                    gate_proj: get(LayerTensor::GateProj),
                    up_proj: get(LayerTensor::UpProj),
                    down_proj: get(LayerTensor::DownProj),
                }
            })
            .collect();
        let lm_head =
            (!config.tie_word_embeddings).then(|| checkpoint.to_f32(checkpoint.lm_head_name()));
        Self {
            inv_freq: rope::inverse_frequencies(config.rope_theta, config.head_dim),
            embed: checkpoint.to_f32(crate::checkpoint::EMBED),
            final_norm: checkpoint.to_f32(FINAL_NORM),
            lm_head,
            layers,
            config,
        }
    }

    /// Runs `token` at the next position of `cache` and returns the logits.
    /// When `trace` is given, the residual stream after each layer is pushed
    /// onto it.
    pub fn forward(
        &self,
        token: u32,
        cache: &mut KvCache,
        mut trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Vec<f32> {
        let c = &self.config;
        let (h, d) = (c.hidden_size, c.head_dim);
        let pos = cache.len(c);
        let row = token as usize * h;
        let mut x = self.embed[row..row + h].to_vec();
        let group = c.num_attention_heads / c.num_key_value_heads;
        let scale = 1.0 / (d as f32).sqrt();

        for (i, layer) in self.layers.iter().enumerate() {
            // Attention block.
            let normed = rms_norm(&x, &layer.input_norm, c.rms_norm_eps);
            let mut q = matvec(&layer.q_proj, &normed);
            let mut k = matvec(&layer.k_proj, &normed);
            let v = matvec(&layer.v_proj, &normed);
            for head in q.chunks_exact_mut(d) {
                head.copy_from_slice(&rms_norm(head, &layer.q_norm, c.rms_norm_eps));
                rope::apply(head, &self.inv_freq, pos);
            }
            for head in k.chunks_exact_mut(d) {
                head.copy_from_slice(&rms_norm(head, &layer.k_norm, c.rms_norm_eps));
                rope::apply(head, &self.inv_freq, pos);
            }
            cache.keys[i].extend_from_slice(&k);
            cache.values[i].extend_from_slice(&v);
            let (keys, values) = (&cache.keys[i], &cache.values[i]);
            let kv_dim = c.kv_dim();
            let mut attn = vec![0f32; c.q_dim()];
            for (qh, out) in attn.chunks_exact_mut(d).enumerate() {
                let kv_off = (qh / group) * d;
                let qv = &q[qh * d..(qh + 1) * d];
                let scores: Vec<f32> = (0..=pos)
                    .map(|t| dot(qv, &keys[t * kv_dim + kv_off..][..d]) * scale)
                    .collect();
                let probs = softmax(&scores);
                for (t, p) in probs.iter().enumerate() {
                    for (o, vv) in out.iter_mut().zip(&values[t * kv_dim + kv_off..][..d]) {
                        *o += p * vv;
                    }
                }
            }
            let o = matvec(&layer.o_proj, &attn);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);

            // MLP block.
            let normed = rms_norm(&x, &layer.post_attn_norm, c.rms_norm_eps);
            let gate = matvec(&layer.gate_proj, &normed);
            let up = matvec(&layer.up_proj, &normed);
            let act: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();
            let down = matvec(&layer.down_proj, &act);
            x.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            if let Some(trace) = trace.as_deref_mut() {
                trace.push(x.clone());
            }
        }
        let normed = rms_norm(&x, &self.final_norm, c.rms_norm_eps);
        matvec(self.lm_head.as_ref().unwrap_or(&self.embed), &normed)
    }
}

pub fn rms_norm(x: &[f32], weight: &[f32], eps: f64) -> Vec<f32> {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps as f32).sqrt();
    x.iter().zip(weight).map(|(v, w)| v * inv * w).collect()
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// y = W x for a row-major W of `y.len()` rows, split over threads when large.
fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    let rows = w.len() / x.len();
    let mut y = vec![0f32; rows];
    let threads = if w.len() < 1 << 20 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let rows_per = rows.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk_index, out) in y.chunks_mut(rows_per).enumerate() {
            scope.spawn(move || {
                for (i, o) in out.iter_mut().enumerate() {
                    let r = chunk_index * rows_per + i;
                    *o = dot(&w[r * x.len()..(r + 1) * x.len()], x);
                }
            });
        }
    });
    y
}

/// Index of the largest value, the lowest index on a tie (torch.argmax).
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// log_softmax of `logits` at `ids`, computed in f64.
pub fn logprobs_at(logits: &[f32], ids: &[u32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    ids.iter()
        .map(|&id| logits[id as usize] as f64 - log_sum)
        .collect()
}

/// The `k` most likely ids with their log_softmax (f64), most likely first
/// (ties to the lower id).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f64)> {
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(ids.len());
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k < ids.len() {
        ids.select_nth_unstable_by(k, by_logit);
        ids.truncate(k);
    }
    ids.sort_by(by_logit);
    let logprobs = logprobs_at(logits, &ids);
    ids.into_iter().zip(logprobs).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_ties_go_to_the_lowest_id() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        let mut v = vec![0.0; 151_936];
        v[151_935] = 1.0; // the last row is reachable
        assert_eq!(argmax(&v), 151_935);
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let top = top_logprobs(&logits, 3);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let log_sum = 2.0 - top[0].1;
        let total: f64 = logits.iter().map(|&l| (l as f64 - log_sum).exp()).sum();
        assert!((total - 1.0).abs() < 1e-12, "{total}");
    }

    #[test]
    fn rms_norm_multiplies_by_the_weight() {
        let y = rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert!((y[0] - 3.0 * inv).abs() < 1e-6);
        assert!((y[1] - 8.0 * inv).abs() < 1e-6);
    }
}
