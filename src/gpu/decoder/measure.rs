//! What `qwen-mk bench` measures on the decoder: the device's read bandwidth,
//! per-phase kernel times, random KV-cache contents for long positions, and
//! the bytes a step must read.

use anyhow::Result;
use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{ptr, wait_for, GpuDecoder, KV_BYTES_PER_POSITION, PHASE_STAMPS};
use crate::kernel_dims::{HEAD_DIM, HIDDEN, NUM_KV_HEADS, NUM_LAYERS};

impl GpuDecoder {
    /// Runs `steps` decode steps from the current state with the kernel's
    /// phase timestamps on; returns the mean time of each phase (A..E) per
    /// layer, in microseconds. Block 0 stamps each boundary after the barrier,
    /// so a phase's time includes its barrier.
    pub fn profile_phases(&self, steps: usize) -> Result<[f64; 5]> {
        let stamps = self.stream.alloc_zeros::<u64>(steps * PHASE_STAMPS)?;
        let base = ptr(&stamps, &self.stream);
        for step in 0..steps {
            let mut params = self.decode_params;
            params.phase_times = base + (step * PHASE_STAMPS * 8) as u64;
            self.launch_decode(&params)?;
            self.enqueue_lm_head(false)?;
        }
        self.synchronize()?;
        let stamps = self.stream.clone_dtoh(&stamps)?;
        let mut totals = [0f64; 5];
        for step in stamps.chunks_exact(PHASE_STAMPS) {
            for (i, pair) in step.windows(2).enumerate() {
                totals[i % 5] += pair[1].saturating_sub(pair[0]) as f64;
            }
        }
        let per_layer = (steps * NUM_LAYERS) as f64 * 1e3; // ns -> us
        Ok(totals.map(|t| t / per_layer))
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
