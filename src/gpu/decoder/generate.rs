//! The host side of generation: the prompt queued (batched prefill, or one
//! token at a time), then decode steps queued ahead of the host, replayed as
//! CUDA graphs where enough are left, and each token handed to the caller
//! as soon as the mapped buffer the LM head writes has it.

use std::collections::VecDeque;

use anyhow::{bail, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaGraph};

use super::watchdog::wait_for;
use super::{GpuDecoder, GRAPH_STEPS};

/// Steps queued ahead of the one whose token the host waits for.
const LOOKAHEAD: usize = 8;

impl GpuDecoder {
    /// Decoding (greedy, or with the sampler `set_sampling` chose): the
    /// prompt from position `cached` on goes through batched prefill (or,
    /// with `batched` false, through the decode kernel one token at a time),
    /// then tokens are generated until an EOS id or `max_new` tokens, calling
    /// `on_token` for each as soon as the GPU has it. The cache must already
    /// hold `prompt[..cached]`, as a previous call left it. Returns (time to
    /// first token, time of the rest) in ms.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        cached: usize,
        max_new: usize,
        eos: &[u32],
        batched: bool,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<(f64, f64)> {
        if prompt.is_empty() || max_new == 0 {
            bail!("generation needs a non-empty prompt and at least one new token");
        }
        anyhow::ensure!(
            cached < prompt.len(),
            "at least the prompt's last position must be computed"
        );
        let total_steps = prompt.len() + max_new - 1;
        if total_steps > self.context {
            bail!(
                "the prompt ({} tokens) plus {max_new} new tokens needs a context of {}, but the cache holds {}",
                prompt.len(),
                total_steps + 1,
                self.context
            );
        }
        let first_output = prompt.len() - 1;
        let start_pos = if batched { first_output } else { cached };
        self.reset(prompt, prompt.len(), start_pos, Some(eos))?;
        // One event per entry that can be pending at once: LOOKAHEAD single
        // steps, then two graphs behind them, and the one being recorded.
        let events: Vec<CudaEvent> = (0..LOOKAHEAD + 3)
            .map(|_| {
                self.device
                    .ctx
                    .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            })
            .collect::<Result<_, _>>()?;
        let start = std::time::Instant::now();
        let mut first_token_ms = 0.0;
        // Every step (or graph of steps) gets an event and at most LOOKAHEAD
        // steps (two graphs) are queued: the GPU never runs dry, and no wait
        // covers more than a few steps, so the watchdog cannot mistake a long
        // prompt for a hang.
        let mut pending: VecDeque<(usize, usize, usize)> = VecDeque::new(); // (first position, steps, event index)
        let mut recorded = 0; // events recorded so far; the next uses slot recorded % len
        let mut launched = cached; // positions whose step is queued (or cached)
        if batched {
            self.enqueue_prefill(cached, prompt.len() - cached)?;
            self.enqueue_lm_head(false)?;
            events[0].record(&self.stream)?;
            pending.push_back((first_output, 1, 0));
            recorded = 1;
            launched = prompt.len();
        }
        // Whole graphs of GRAPH_STEPS steps where that many are left (the
        // host then learns GRAPH_STEPS tokens at a time, every few ms), two
        // in flight; single steps for the rest, or where the driver cannot
        // capture. The graph is captured once the first token is out (so the
        // time to it does not include the capture), while the GPU runs the
        // single steps queued behind it.
        let mut graph: Option<CudaGraph> = None;
        let mut capture_pending = total_steps - launched >= 2 * GRAPH_STEPS + LOOKAHEAD;
        let mut queued: usize = pending.iter().map(|&(_, steps, _)| steps).sum(); // launched, not yet reported
        let mut produced = 0;
        'report: while produced < max_new {
            if capture_pending && produced > 0 {
                capture_pending = false;
                graph = self.capture_steps(GRAPH_STEPS).unwrap_or(None);
            }
            let most_queued = if graph.is_some() {
                2 * GRAPH_STEPS
            } else {
                LOOKAHEAD
            };
            while launched < total_steps && queued < most_queued {
                let steps = match &graph {
                    Some(graph) if total_steps - launched >= GRAPH_STEPS => {
                        graph.launch()?;
                        GRAPH_STEPS
                    }
                    _ => {
                        self.enqueue_step(false)?;
                        1
                    }
                };
                let slot = recorded % events.len();
                events[slot].record(&self.stream)?;
                pending.push_back((launched, steps, slot));
                recorded += 1;
                launched += steps;
                queued += steps;
            }
            let Some((first, steps, slot)) = pending.pop_front() else {
                break;
            };
            wait_for(&events[slot], "a decode step")?;
            queued -= steps;
            let host = self.host_tokens.as_ptr()?;
            for pos in first.max(first_output)..first + steps {
                // SAFETY: the event completed, so the LM head's write to this slot is done.
                let token = unsafe { std::ptr::read_volatile(host.add(pos)) };
                if produced == 0 {
                    first_token_ms = start.elapsed().as_secs_f64() * 1e3;
                }
                produced += 1;
                on_token(token)?;
                if eos.contains(&token) || produced == max_new {
                    break 'report; // queued steps see `done` (or the cache's end) and return at once
                }
            }
        }
        self.synchronize()?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        Ok((first_token_ms, total_ms - first_token_ms))
    }
}
