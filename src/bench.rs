//! `qwen-mk bench`: decode speed on the GPU, timed with CUDA events (median
//! of repeats), against the floor set by the bytes a step must read and the
//! read bandwidth measured on the same device.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Result};
use serde_json::json;

use crate::checkpoint::Checkpoint;
use crate::cli::BenchArgs;
use crate::gpu::decoder::{median, Profile, GRAPH_STEPS};
use crate::gpu::GpuDecoder;
use crate::model_source;

/// A token id to start from; any valid id does.
const START_TOKEN: u32 = 785;

/// Positions the KV cache must hold: the timed steps from the last position,
/// replayed from graphs of GRAPH_STEPS steps (a whole graph even when
/// `steps` is not a multiple: a run past the cache's end would stop early
/// and report its idle steps as fast ones), or the longest timed prompt.
/// None when the sum overflows (sizes from the command line can be
/// anything).
fn context_needed(max_position: usize, steps: usize, longest_prompt: usize) -> Option<usize> {
    let graph_steps = steps.div_ceil(GRAPH_STEPS).checked_mul(GRAPH_STEPS)?;
    let decode = max_position.checked_add(graph_steps)?.checked_add(1)?;
    Some(decode.max(longest_prompt.checked_add(1)?))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.steps == 0 || args.repeats == 0 || args.positions.is_empty() {
        bail!("--steps, --repeats and --positions must be non-empty and positive");
    }
    let dir = model_source::resolve(&args.model.model)?;
    let checkpoint = Checkpoint::open(&dir)?;
    let max_position = *args.positions.iter().max().unwrap_or(&0);
    let prefill_lengths: Vec<usize> = args
        .prefill_lengths
        .iter()
        .copied()
        .filter(|&n| n > 0)
        .collect();
    let longest_prompt = prefill_lengths.iter().copied().max().unwrap_or(0);
    let limit = checkpoint.config.max_position_embeddings;
    let needed = context_needed(max_position, args.steps, longest_prompt);
    let Some(context) = needed.filter(|&context| context <= limit) else {
        let positions = needed.map_or("more than can be counted".to_string(), |c| {
            (c - 1).to_string()
        });
        bail!(
            "position {max_position} plus {} steps (replayed in CUDA graphs of {GRAPH_STEPS}, so {positions} positions), or a prompt of {longest_prompt}, exceeds the model's context of {limit} tokens; ask for an earlier position or fewer steps",
            args.steps,
        );
    };
    let mut decoder = GpuDecoder::new(&checkpoint, context, args.model.gpu)?;
    let measured = measure(&mut decoder, args, &prefill_lengths)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        write_json(&mut out, &decoder, args, &measured)
    } else {
        write_tables(&mut out, &decoder, args, &dir, &measured)
    }
}

/// What one `bench` run measured.
struct Measured {
    /// Read bandwidth of the GPU in bytes a second (the floor's divisor).
    bandwidth: f64,
    positions: Vec<PositionTiming>,
    /// Each kernel alone, ms a step, at position 0.
    decode_ms: f64,
    lm_head_ms: f64,
    /// (prompt tokens, ms to the first token).
    prefill: Vec<(usize, f64)>,
    /// `--profile`: (position, what block 0 and the handoffs saw).
    profiles: Vec<(usize, Profile)>,
}

/// Decode steps from one position, per token.
struct PositionTiming {
    position: usize,
    ms: f64,
    /// The same steps replayed from CUDA graphs (NaN without graphs).
    graph_ms: f64,
    /// Host time to enqueue a step.
    host_ms: f64,
    /// The bytes a step reads there, and their time at the read bandwidth.
    bytes: usize,
    floor_ms: f64,
}

/// Times the decode steps at each of `args.positions` (queued and from
/// CUDA graphs), each kernel alone, the prompts of `prefill_lengths`, and
/// `--profile`'s phases, on a cache of random keys and values.
fn measure(
    decoder: &mut GpuDecoder,
    args: &BenchArgs,
    prefill_lengths: &[usize],
) -> Result<Measured> {
    decoder.fill_cache_random(7)?;
    let bandwidth = decoder.measure_read_bandwidth(2 << 30, 10)?;

    // Steps queued one launch at a time, and the same steps replayed from a
    // CUDA graph of GRAPH_STEPS steps (when the driver can capture them).
    let graph = decoder.capture_steps(GRAPH_STEPS)?;
    let graph_launches = args.steps.div_ceil(GRAPH_STEPS);
    let mut positions = Vec::new();
    for &position in &args.positions {
        let (ms, host_ms) = median_per_step(args.repeats, args.steps, || {
            timed_run(decoder, position, args.steps, |d| d.enqueue_step(false))
        })?;
        let graph_ms = match &graph {
            Some(g) => {
                median_per_step(args.repeats, graph_launches * GRAPH_STEPS, || {
                    timed_run(decoder, position, graph_launches, |_| Ok(g.launch()?))
                })?
                .0
            }
            None => f64::NAN,
        };
        // The average position of the timed steps sets the KV bytes read.
        let bytes = decoder.bytes_per_step(position + args.steps / 2);
        positions.push(PositionTiming {
            position,
            ms,
            graph_ms,
            host_ms,
            bytes,
            floor_ms: bytes as f64 / bandwidth * 1e3,
        });
    }

    // Each kernel alone at position 0, for where-the-time-goes (launched
    // back to back, the decode kernel stays there: the LM head is what
    // moves a sequence on).
    let (decode_ms, _) = median_per_step(args.repeats, args.steps, || {
        timed_run(decoder, 0, args.steps, GpuDecoder::enqueue_decode)
    })?;
    let (lm_head_ms, _) = median_per_step(args.repeats, args.steps, || {
        timed_run(decoder, 0, args.steps, |d| d.enqueue_lm_head(false))
    })?;
    let prefill = time_prefill(decoder, prefill_lengths, args.repeats)?;
    let mut profiles = Vec::new();
    if args.profile {
        for &position in &args.positions {
            decoder.reset(&vec![START_TOKEN; position + 1], 0, position, None)?;
            profiles.push((position, decoder.profile(args.steps)?));
        }
    }
    Ok(Measured {
        bandwidth,
        positions,
        decode_ms,
        lm_head_ms,
        prefill,
        profiles,
    })
}

/// `--json`: one object.
fn write_json(
    out: &mut impl Write,
    decoder: &GpuDecoder,
    args: &BenchArgs,
    m: &Measured,
) -> Result<()> {
    let report = json!({
        "gpu": decoder.device.name,
        "sm_count": decoder.device.sm_count,
        "decode_blocks": decoder.decode_blocks,
        "lm_head_blocks": decoder.lm_head_blocks,
        "read_bandwidth_gb_s": m.bandwidth / 1e9,
        "steps": args.steps,
        "repeats": args.repeats,
        "positions": m.positions.iter().map(|t| json!({
            "position": t.position, "ms_per_token": t.ms, "tokens_per_s": 1e3 / t.ms,
            "graph_ms_per_token": t.graph_ms, "host_enqueue_ms_per_token": t.host_ms,
            "bytes_per_step": t.bytes, "floor_ms": t.floor_ms, "percent_of_floor": 100.0 * t.floor_ms / t.ms,
        })).collect::<Vec<_>>(),
        "prefill": m.prefill.iter().map(|(n, ms)| json!({
            "prompt_tokens": n, "ms_to_first_token": ms, "prompt_tokens_per_s": *n as f64 / ms * 1e3,
            "tflop_per_s": prefill_flops(*n, decoder.vocab) / ms * 1e-9,
        })).collect::<Vec<_>>(),
        "decode_kernel_ms": m.decode_ms,
        "lm_head_kernel_ms": m.lm_head_ms,
        "phase_us_per_layer": m.profiles.iter().map(|(p, prof)| { let t = &prof.phase_us; json!({"position": p,
            "wait_work": {"A_qkv": t[0], "B_attention": t[1], "C_o_proj": t[2], "D_gate_up": t[3], "E_down": t[4]},
            "producer_wait_slot": prof.producer_waits[0], "producer_wait_copy": prof.producer_waits[1], "consumer_ring_wait": prof.consumer_ring_wait,
            "kernel_span_us": prof.kernel_span_us, "between_kernels_us": prof.between_kernels_us}) }).collect::<Vec<_>>(),
    });
    writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    Ok(())
}

/// The default report: decode steps by position, each kernel alone, then
/// time to first token and `--profile`'s phases where measured.
fn write_tables(
    out: &mut impl Write,
    decoder: &GpuDecoder,
    args: &BenchArgs,
    dir: &Path,
    m: &Measured,
) -> Result<()> {
    writeln!(
        out,
        "{} ({} SMs), read bandwidth {:.0} GB/s; {} steps x {} repeats, median; model {}",
        decoder.device.name,
        decoder.device.sm_count,
        m.bandwidth / 1e9,
        args.steps,
        args.repeats,
        dir.display()
    )?;
    writeln!(
        out,
        "{:>9} {:>10} {:>9} {:>11} {:>10} {:>8} {:>10} {:>10}",
        "position", "ms/token", "tok/s", "MB/step", "floor ms", "% floor", "graph ms", "host ms"
    )?;
    for t in &m.positions {
        writeln!(
            out,
            "{:>9} {:>10.4} {:>9.1} {:>11.1} {:>10.4} {:>7.1}% {:>10.4} {:>10.4}",
            t.position,
            t.ms,
            1e3 / t.ms,
            t.bytes as f64 / 1e6,
            t.floor_ms,
            100.0 * t.floor_ms / t.ms,
            t.graph_ms,
            t.host_ms
        )?;
    }
    writeln!(out, "(graph ms: the same steps replayed from a {GRAPH_STEPS}-step CUDA graph; host ms: time to enqueue one step)")?;
    // Without the LM head, which advances the position, every decode step
    // of the run is at position 0: no cached keys to attend to.
    writeln!(
        out,
        "decode kernel alone {:.4} ms, LM head alone {:.4} ms (every step at position 0)",
        m.decode_ms, m.lm_head_ms
    )?;
    if !m.prefill.is_empty() {
        writeln!(
            out,
            "time to first token (prompt ids on the GPU -> batched prefill -> LM head -> token), attention kernel {}:",
            decoder.device.prefill.attention_name
        )?;
        writeln!(
            out,
            "{:>14} {:>10} {:>14} {:>9}",
            "prompt tokens", "ms", "prompt tok/s", "TFLOP/s"
        )?;
        for (n, ms) in &m.prefill {
            writeln!(
                out,
                "{n:>14} {ms:>10.3} {:>14.0} {:>9.1}",
                *n as f64 / ms * 1e3,
                prefill_flops(*n, decoder.vocab) / ms * 1e-9
            )?;
        }
    }
    if !m.profiles.is_empty() {
        write_profiles(out, &m.profiles)?;
    }
    Ok(())
}

/// `--profile`: where block 0's time goes in each phase, and how each
/// phase's output reaches the next over all blocks.
fn write_profiles(out: &mut impl Write, profiles: &[(usize, Profile)]) -> Result<()> {
    writeln!(
        out,
        "decode kernel phases, us per layer as block 0 sees them: waiting for inputs + working"
    )?;
    writeln!(
        out,
        "{:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>7} {:>18} {:>11}",
        "position",
        "A qkv",
        "B attn",
        "C o",
        "D gate/up",
        "E down",
        "layer",
        "producer waits",
        "rows late"
    )?;
    for (position, profile) in profiles {
        let t = &profile.phase_us;
        let cell = |i: usize| format!("{:.2}+{:.2}", t[i][0], t[i][1]);
        let [slot, copy] = profile.producer_waits;
        writeln!(
            out,
            "{position:>9} {:>11} {:>11} {:>11} {:>11} {:>11} {:>7.2}   slot {:>3.0}% copy {:>3.0}% {:>10.0}%",
            cell(0),
            cell(1),
            cell(2),
            cell(3),
            cell(4),
            t.iter().flatten().sum::<f64>(),
            slot * 100.0,
            copy * 100.0,
            profile.consumer_ring_wait * 100.0
        )?;
    }
    for (position, profile) in profiles {
        writeln!(
            out,
            "{position:>9} decode kernel {:.1} us from the first block's start to the last block's end, then {:.1} us to the next step's start (LM head and launches)",
            profile.kernel_span_us, profile.between_kernels_us
        )?;
    }
    writeln!(out, "(producer waits: share of block 0's weight-stream time spent waiting for a ring slot the consumers still read, and for the copy in flight; rows late: share of its first consumer thread's time spent waiting for weight rows to land)")?;
    writeln!(out, "handoffs over all blocks, us per layer: the last writer's end after the median writer's (straggle), and the median reader's inputs after the last writer's end (latency); the writers most often last")?;
    for (position, profile) in profiles {
        for (name, h) in ["A qkv", "B attn", "C o", "D gate/up", "E down"]
            .iter()
            .zip(&profile.handoffs)
        {
            let last: Vec<String> = h
                .last_writers
                .iter()
                .map(|(b, share)| format!("{b} ({:.0}%)", share * 100.0))
                .collect();
            writeln!(
                out,
                "{position:>9} {name:>11}   straggle {:>5.2}   latency {:>5.2}   last: {}",
                h.straggle_us,
                h.latency_us,
                last.join(", ")
            )?;
        }
    }
    Ok(())
}

/// Median time to first token (ms) for each prompt length: prompt ids on
/// the GPU, then batched prefill and the LM head, between CUDA events.
fn time_prefill(
    decoder: &mut GpuDecoder,
    lengths: &[usize],
    repeats: usize,
) -> Result<Vec<(usize, f64)>> {
    if lengths.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(why) = decoder.prefill_unavailable() {
        crate::status!("note: prefill not timed: {why}");
        return Ok(Vec::new());
    }
    let mut rows = Vec::new();
    for &n in lengths {
        // Any valid ids do; these vary so no row is special.
        let prompt: Vec<u32> = (0..n as u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % decoder.vocab as u32)
            .collect();
        let (ms, _) = median_per_step(repeats, 1, || {
            decoder.reset(&prompt, n, n - 1, None)?;
            let (start, end) = (decoder.new_timing_event()?, decoder.new_timing_event()?);
            start.record(&decoder.stream)?;
            decoder.enqueue_prefill(0, n)?;
            decoder.enqueue_lm_head(false)?;
            end.record(&decoder.stream)?;
            decoder.wait(&end)?;
            Ok((start.elapsed_ms(&end)? as f64, 0.0))
        })?;
        rows.push((n, ms));
    }
    Ok(rows)
}

/// Floating-point operations of a prefill of `n` positions: the layer
/// projections, causal attention (scores and P.V over n(n+1)/2 pairs per
/// head) and the LM head for the last position.
fn prefill_flops(n: usize, vocab: usize) -> f64 {
    use crate::kernel_dims::{
        HEAD_DIM, HIDDEN, INTERMEDIATE, NUM_LAYERS, NUM_Q_HEADS, QKV_ROWS, Q_DIM,
    };
    let layer_params = HIDDEN * QKV_ROWS + Q_DIM * HIDDEN + 3 * HIDDEN * INTERMEDIATE;
    let pairs = (n * (n + 1) / 2) as f64;
    let projections = 2.0 * (layer_params * NUM_LAYERS * n) as f64;
    let attention = 4.0 * (HEAD_DIM * NUM_Q_HEADS * NUM_LAYERS) as f64 * pairs;
    projections + attention + 2.0 * (HIDDEN * vocab) as f64
}

/// One timed run from `position`: `launches` calls of `enqueue`, between two
/// CUDA events. Returns (GPU ms, host ms spent enqueueing) for the whole run.
fn timed_run(
    decoder: &mut GpuDecoder,
    position: usize,
    launches: usize,
    mut enqueue: impl FnMut(&GpuDecoder) -> Result<()>,
) -> Result<(f64, f64)> {
    decoder.reset(&vec![START_TOKEN; position + 1], 0, position, None)?;
    let (start, end) = (decoder.new_timing_event()?, decoder.new_timing_event()?);
    let host_start = std::time::Instant::now();
    start.record(&decoder.stream)?;
    for _ in 0..launches {
        enqueue(decoder)?;
    }
    end.record(&decoder.stream)?;
    let host_ms = host_start.elapsed().as_secs_f64() * 1e3;
    decoder.wait(&end)?;
    Ok((start.elapsed_ms(&end)? as f64, host_ms))
}

/// Medians over `repeats` runs (after one warm-up run) of (GPU ms, host ms)
/// per step, for runs of `steps` steps each.
fn median_per_step(
    repeats: usize,
    steps: usize,
    mut run: impl FnMut() -> Result<(f64, f64)>,
) -> Result<(f64, f64)> {
    run()?; // warm-up
    let (mut gpu, mut host) = (Vec::new(), Vec::new());
    for _ in 0..repeats {
        let (g, h) = run()?;
        gpu.push(g / steps as f64);
        host.push(h / steps as f64);
    }
    Ok((median(&mut gpu), median(&mut host)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_holds_every_step_the_graph_replay_runs() {
        // 24 steps are replayed as two graphs of 16: 32 steps from 232.
        assert_eq!(context_needed(232, 24, 0), Some(232 + 32 + 1));
        assert_eq!(context_needed(0, 256, 0), Some(257));
        assert_eq!(context_needed(16384, 1, 0), Some(16384 + 16 + 1));
        // A longer prompt sets it.
        assert_eq!(context_needed(0, 256, 8192), Some(8193));
        // Sizes past usize are no context at all.
        assert_eq!(context_needed(usize::MAX, 16, 0), None);
        assert_eq!(context_needed(0, usize::MAX, 0), None);
        assert_eq!(context_needed(0, 16, usize::MAX), None);
    }
}
