//! What `qwen-mk bench` measures on the decoder: the device's read bandwidth,
//! per-phase kernel times, random KV-cache contents for long positions, and
//! the bytes a step must read.

use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{ptr, wait_for, GpuDecoder, KV_BYTES_PER_POSITION, PHASE_STAMPS, PROFILE_WORDS};
use crate::kernel_dims::{HEAD_DIM, HIDDEN, NUM_KV_HEADS, NUM_LAYERS};

/// Where a decode step's time goes, from the kernel's own clocks.
pub struct Profile {
    /// Mean time of each phase (A..E) per layer in microseconds, as block 0
    /// sees it: waiting for its inputs, then working.
    pub phase_us: [[f64; 2]; 5],
    /// Shares of block 0's producer time spent waiting for a slot the
    /// consumers still read, and for the copy in flight.
    pub producer_waits: [f64; 2],
    /// Share of block 0's first consumer thread's time spent waiting for
    /// weight rows to land in the ring.
    pub consumer_ring_wait: f64,
}

impl GpuDecoder {
    /// Runs `steps` decode steps from the current state with the kernel's
    /// profiling on.
    pub fn profile(&self, steps: usize) -> Result<Profile> {
        let words = self.stream.alloc_zeros::<u64>(steps * PROFILE_WORDS)?;
        let base = ptr(&words, &self.stream);
        for step in 0..steps {
            let mut params = self.decode_params;
            params.phase_times = base + (step * PROFILE_WORDS * 8) as u64;
            self.launch_decode(&params)?;
            self.enqueue_lm_head(false)?;
        }
        self.synchronize()?;
        let words = self.stream.clone_dtoh(&words)?;
        let mut totals = [[0f64; 2]; 5];
        let mut producer = [0f64; 3];
        let mut consumer = [0f64; 2];
        for step in words.chunks_exact(PROFILE_WORDS) {
            let (stamps, clock) = step.split_at(PHASE_STAMPS);
            let mut done = stamps[0];
            for (i, pair) in stamps[1..].chunks_exact(2).enumerate() {
                // A block with no attention task never stamps B's inputs.
                let ready = if pair[0] == 0 { done } else { pair[0] };
                totals[i % 5][0] += ready.saturating_sub(done) as f64;
                totals[i % 5][1] += pair[1].saturating_sub(ready) as f64;
                done = pair[1];
            }
            for (sum, &count) in producer.iter_mut().zip(&clock[..3]) {
                *sum += count as f64;
            }
            for (sum, &count) in consumer.iter_mut().zip(&clock[3..]) {
                *sum += count as f64;
            }
        }
        let per_layer = (steps * NUM_LAYERS) as f64 * 1e3; // ns -> us
        let total = producer[0].max(1.0);
        Ok(Profile {
            phase_us: totals.map(|t| t.map(|ns| ns / per_layer)),
            producer_waits: [producer[1] / total, producer[2] / total],
            consumer_ring_wait: consumer[1] / consumer[0].max(1.0),
        })
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
