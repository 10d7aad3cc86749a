//! What `qwen-mk bench` measures on the decoder: the device's read bandwidth,
//! per-phase kernel times, random KV-cache contents for long positions, and
//! the bytes a step must read.

use std::cmp::Reverse;

use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::watchdog::wait_for;
use super::{ptr, GpuDecoder, KV_BYTES_PER_POSITION, PHASE_STAMPS, PROFILE_CLOCKS};
use crate::kernel_dims::{HEAD_DIM, HIDDEN, NUM_KV_HEADS, NUM_LAYERS};

/// Where a decode step's time goes, from the kernel's own clocks.
pub struct Profile {
    /// Mean time of each phase (A..E) per layer in microseconds, as block 0
    /// sees it: waiting for its inputs, then working.
    pub phase_us: [[f64; 2]; 5],
    /// How each phase's output reaches the next phase, over all blocks.
    pub handoffs: [Handoff; 5],
    /// Shares of block 0's producer time spent waiting for a slot the
    /// consumers still read, and for the copy in flight.
    pub producer_waits: [f64; 2],
    /// Share of block 0's first consumer thread's time spent waiting for
    /// weight rows to land in the ring.
    pub consumer_ring_wait: f64,
    /// Mean microseconds from the first block's start of a step to the last
    /// block's end of its last phase (the decode kernel's span), and from
    /// that end to the next step's first start (the LM head and the two
    /// launches between; NaN with fewer than two steps).
    pub kernel_span_us: f64,
    pub between_kernels_us: f64,
}

/// One phase's output on its way to the next phase, averaged over layers
/// and steps. A phase's writers are the blocks that work in it (in B, those
/// with an attention task), its readers those of the next phase.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Handoff {
    /// Microseconds from the median writer's end of the phase to the last's.
    pub straggle_us: f64,
    /// Microseconds from the last writer's end to the median reader having
    /// its inputs (E of the last layer has no reader and is left out).
    pub latency_us: f64,
    /// The writers most often last, with the share of phases they were last in.
    pub last_writers: Vec<(usize, f64)>,
}

impl Profile {
    /// Reads the words of `steps` profiled steps of a `blocks`-block grid
    /// (kernels/decode_common.cuh: every block's stamps, then block 0's
    /// clock counts).
    pub fn from_words(words: &[u64], blocks: usize) -> Profile {
        let step_words = blocks * PHASE_STAMPS + PROFILE_CLOCKS;
        let steps = words.len() / step_words;
        let mut phase_ns = [[0f64; 2]; 5];
        let mut straggle_ns = [0f64; 5];
        let mut latency_ns = [0f64; 5];
        let mut last_counts = vec![[0usize; 5]; blocks];
        let mut producer = [0f64; 3];
        let mut consumer = [0f64; 2];
        let mut spans = Vec::new(); // (first start, last end) of each step
        for step in words.chunks_exact(step_words) {
            let (stamps, clock) = step.split_at(blocks * PHASE_STAMPS);
            let block = |b: usize| &stamps[b * PHASE_STAMPS..(b + 1) * PHASE_STAMPS];
            // (inputs ready, done) of phase `i` of `layer` in block `b`; a
            // block with no attention task never stamps B's inputs.
            let stamp = |b: usize, layer: usize, i: usize| {
                let at = 1 + (layer * 5 + i) * 2;
                (block(b)[at], block(b)[at + 1])
            };
            let works = |b: usize, layer: usize, i: usize| i != 1 || stamp(b, layer, i).0 != 0;
            let first_start = (0..blocks).map(|b| block(b)[0]).min().unwrap_or(0);
            let last_end = (0..blocks)
                .map(|b| block(b)[PHASE_STAMPS - 1])
                .max()
                .unwrap_or(0);
            spans.push((first_start, last_end));

            let mut done = block(0)[0];
            for layer in 0..NUM_LAYERS {
                for (i, phase) in phase_ns.iter_mut().enumerate() {
                    let (ready, end) = stamp(0, layer, i);
                    let ready = if ready == 0 { done } else { ready };
                    phase[0] += ready.saturating_sub(done) as f64;
                    phase[1] += end.saturating_sub(ready) as f64;
                    done = end;

                    let writers: Vec<usize> = (0..blocks).filter(|&b| works(b, layer, i)).collect();
                    // The last to end; on a tie, the lowest block.
                    let Some(&last) = writers
                        .iter()
                        .min_by_key(|&&b| (Reverse(stamp(b, layer, i).1), b))
                    else {
                        continue;
                    };
                    let last_end = stamp(last, layer, i).1;
                    let mut ends: Vec<f64> = writers
                        .iter()
                        .map(|&b| stamp(b, layer, i).1 as f64)
                        .collect();
                    straggle_ns[i] += last_end as f64 - median(&mut ends);
                    last_counts[last][i] += 1;
                    let (next_layer, next) = if i == 4 {
                        (layer + 1, 0)
                    } else {
                        (layer, i + 1)
                    };
                    if next_layer < NUM_LAYERS {
                        let mut readies: Vec<f64> = (0..blocks)
                            .filter(|&b| works(b, next_layer, next))
                            .map(|b| stamp(b, next_layer, next).0 as f64)
                            .collect();
                        latency_ns[i] += median(&mut readies) - last_end as f64;
                    }
                }
            }
            for (sum, &count) in producer.iter_mut().zip(&clock[..3]) {
                *sum += count as f64;
            }
            for (sum, &count) in consumer.iter_mut().zip(&clock[3..]) {
                *sum += count as f64;
            }
        }
        let per_layer = ((steps * NUM_LAYERS) as f64 * 1e3).max(1.0); // ns -> us
        let with_reader = ((steps * (NUM_LAYERS - 1)) as f64 * 1e3).max(1.0);
        let handoffs = std::array::from_fn(|i| {
            let mut last_writers: Vec<(usize, f64)> = (0..blocks)
                .filter(|&b| last_counts[b][i] > 0)
                .map(|b| (b, last_counts[b][i] as f64 / (steps * NUM_LAYERS) as f64))
                .collect();
            last_writers.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            last_writers.truncate(3);
            Handoff {
                straggle_us: straggle_ns[i] / per_layer,
                latency_us: latency_ns[i] / if i == 4 { with_reader } else { per_layer },
                last_writers,
            }
        });
        let total = producer[0].max(1.0);
        let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64 / 1e3; // ns -> us
        let kernel_span_us = mean(
            spans
                .iter()
                .map(|&(s, e)| e.saturating_sub(s) as f64)
                .collect(),
        );
        let between_kernels_us = mean(
            spans
                .windows(2)
                .map(|w| w[1].0.saturating_sub(w[0].1) as f64)
                .collect(),
        );
        Profile {
            phase_us: phase_ns.map(|t| t.map(|ns| ns / per_layer)),
            handoffs,
            producer_waits: [producer[1] / total, producer[2] / total],
            consumer_ring_wait: consumer[1] / consumer[0].max(1.0),
            kernel_span_us,
            between_kernels_us,
        }
    }
}

impl GpuDecoder {
    /// Runs `steps` decode steps from the current state with the kernel's
    /// profiling on.
    pub fn profile(&self, steps: usize) -> Result<Profile> {
        let blocks = self.decode_blocks as usize;
        let step_words = blocks * PHASE_STAMPS + PROFILE_CLOCKS;
        let words = self.stream.alloc_zeros::<u64>(steps * step_words)?;
        let base = ptr(&words, &self.stream);
        for step in 0..steps {
            let mut params = self.decode_params;
            params.phase_times = base + (step * step_words * 8) as u64;
            self.launch_decode(&params)?;
            self.enqueue_lm_head(false)?;
        }
        self.synchronize()?;
        Ok(Profile::from_words(
            &self.stream.clone_dtoh(&words)?,
            blocks,
        ))
    }

    /// Random contents for the whole KV cache: timing attention at a long
    /// context without decoding that many tokens first.
    pub fn fill_cache_random(&mut self, seed: u32) -> Result<()> {
        let n = (NUM_LAYERS * NUM_KV_HEADS * self.context * HEAD_DIM) as u64;
        for (cache, salt) in [(&self.k_cache, 0u32), (&self.v_cache, 1)] {
            let cfg = LaunchConfig {
                grid_dim: (self.device.sm_count * 8, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let p = ptr(cache, &self.stream);
            let s = seed.wrapping_mul(2).wrapping_add(salt);
            let mut launch = self.stream.launch_builder(&self.device.fill_random_bf16);
            launch.arg(&p).arg(&n).arg(&s);
            unsafe { launch.launch(cfg) }?;
        }
        self.synchronize()
    }

    /// The device's streaming read bandwidth in bytes/s, over `bytes` bytes
    /// (median of `repeats`).
    pub fn measure_read_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        let words = bytes / 16;
        let buffer = self.stream.alloc_zeros::<u8>(words * 16)?;
        let sink = self.stream.alloc_zeros::<u32>(1)?;
        let (src, sink_ptr, n) = (
            ptr(&buffer, &self.stream),
            ptr(&sink, &self.stream),
            words as u64,
        );
        let cfg = LaunchConfig {
            grid_dim: (self.device.sm_count * 4, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut times = Vec::new();
        for i in 0..repeats + 1 {
            let (a, b) = (self.new_timing_event()?, self.new_timing_event()?);
            a.record(&self.stream)?;
            let mut launch = self.stream.launch_builder(&self.device.read_bandwidth);
            launch.arg(&src).arg(&n).arg(&sink_ptr);
            unsafe { launch.launch(cfg) }?;
            b.record(&self.stream)?;
            wait_for(&b, "the bandwidth probe")?;
            if i > 0 {
                times.push(a.elapsed_ms(&b)? as f64); // the first run is warm-up
            }
        }
        Ok((words * 16) as f64 / (median(&mut times) * 1e-3))
    }

    /// Bytes one decode step must read at `position`: every weight once and
    /// the KV cache up to that position.
    pub fn bytes_per_step(&self, position: usize) -> usize {
        let layers = 2 * NUM_LAYERS * crate::kernel_dims::layer_layout::STRIDE;
        let head = 2 * self.vocab * HIDDEN;
        layers + head + KV_BYTES_PER_POSITION * (position + 1)
    }
}

pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => 0.5 * (values[n / 2 - 1] + values[n / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A made-up profile of three blocks, one step: every phase of every
    /// layer takes 10 ns to get its inputs and 100 ns of work in block 0;
    /// block 2 ends every phase 40 ns after the others, and only blocks 0
    /// and 1 have attention tasks.
    fn words() -> Vec<u64> {
        let blocks = 3;
        let mut w = vec![0u64; blocks * PHASE_STAMPS + PROFILE_CLOCKS];
        for b in 0..blocks {
            let stamps = &mut w[b * PHASE_STAMPS..(b + 1) * PHASE_STAMPS];
            stamps[0] = 1_000;
            for k in 0..5 * NUM_LAYERS {
                let t = 1_000 + 110 * k as u64;
                if k % 5 != 1 || b < 2 {
                    stamps[1 + 2 * k] = t + 10;
                }
                stamps[2 + 2 * k] = t + 110 + if b == 2 { 40 } else { 0 };
            }
        }
        let clocks = &mut w[blocks * PHASE_STAMPS..];
        clocks.copy_from_slice(&[1000, 450, 400, 2000, 100]);
        w
    }

    #[test]
    fn profile_reads_block_zero_phases_and_every_blocks_handoffs() {
        let p = Profile::from_words(&words(), 3);
        for phase in p.phase_us {
            assert!(
                (phase[0] - 0.010).abs() < 1e-9 && (phase[1] - 0.100).abs() < 1e-9,
                "{phase:?}"
            );
        }
        // B's writers are blocks 0 and 1 (they end together); the others'
        // last writer is block 2, 40 ns after the median.
        assert_eq!(p.handoffs[1].last_writers, vec![(0, 1.0)]);
        assert!(p.handoffs[1].straggle_us.abs() < 1e-9);
        for i in [0, 2, 3, 4] {
            assert_eq!(p.handoffs[i].last_writers, vec![(2, 1.0)]);
            assert!((p.handoffs[i].straggle_us - 0.040).abs() < 1e-9);
            // The median reader has its inputs 10 ns after the median
            // writer's end: 30 ns before the last writer's.
            assert!(
                (p.handoffs[i].latency_us + 0.030).abs() < 1e-9,
                "{}",
                p.handoffs[i].latency_us
            );
        }
        assert!(
            (p.producer_waits[0] - 0.45).abs() < 1e-12
                && (p.producer_waits[1] - 0.40).abs() < 1e-12
        );
        assert!((p.consumer_ring_wait - 0.05).abs() < 1e-12);
        // Block 2 ends the last phase 40 ns late; one step has no next one.
        let span = (110 * 5 * NUM_LAYERS + 40) as f64 / 1e3;
        assert!(
            (p.kernel_span_us - span).abs() < 1e-9,
            "{}",
            p.kernel_span_us
        );
        assert!(p.between_kernels_us.is_nan());
    }

    #[test]
    fn profile_times_the_gap_between_steps() {
        // The same step twice, the second starting 7 us after the first ended.
        let one = words();
        let end = one[3 * PHASE_STAMPS - 1];
        let shift = end + 7_000 - one[0];
        let mut second = one.clone();
        for b in 0..3 {
            for w in &mut second[b * PHASE_STAMPS..(b + 1) * PHASE_STAMPS] {
                if *w != 0 {
                    *w += shift;
                }
            }
        }
        let p = Profile::from_words(&[one, second].concat(), 3);
        assert!(
            (p.between_kernels_us - 7.0).abs() < 1e-9,
            "{}",
            p.between_kernels_us
        );
    }
}
