//! The decode kernel's grid: one block per SM (a block takes a whole SM's
//! registers), or fewer with `QWEN_MK_DECODE_BLOCKS`, so that the kernel can
//! be checked on this GPU at the sizes other GPUs give it.

use anyhow::{bail, Result};
use cudarc::driver::sys::CUfunction_attribute;

use super::ring::{ring_in_flight, ring_slots, InFlight};
use crate::gpu::device::Device;
use crate::kernel_dims::{
    DECODE_RESIDUAL_MAX_ROWS, DECODE_THREADS, HIDDEN, INTERMEDIATE, Q_DIM, RING_SLOT_BYTES,
};

/// How the decode kernel is launched on a GPU.
pub(super) struct DecodeGrid {
    pub blocks: u32,
    /// Slots of the weight ring each block has in shared memory.
    pub ring_slots: usize,
    /// Copies its producer keeps in flight.
    pub in_flight: InFlight,
}

/// The decode kernel's grid on `device`: one resident block per SM (or
/// fewer, `QWEN_MK_DECODE_BLOCKS`), checked by the occupancy API and
/// enforced by the cooperative launch; the weight ring takes the shared
/// memory a block can have beyond the kernel's static part.
pub(super) fn decode_grid(device: &Device) -> Result<DecodeGrid> {
    let ring_slots = ring_slots(device)?;
    let ring_bytes = ring_slots * RING_SLOT_BYTES;
    device.decode_step.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        ring_bytes as i32,
    )?;
    let per_sm = device
        .decode_step
        .occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS as u32, ring_bytes, None)?;
    if per_sm == 0 {
        bail!(
            "the decode kernel cannot be resident on {} (occupancy 0)",
            device.name
        );
    }
    Ok(DecodeGrid {
        blocks: decode_blocks(&device.name, device.sm_count, ring_slots)?,
        ring_slots,
        in_flight: ring_in_flight(ring_slots)?,
    })
}

/// The fewest blocks the decode kernel runs on with a ring of `ring_slots`.
/// Each block keeps at most DECODE_RESIDUAL_MAX_ROWS rows of the residual
/// stream, and its rows of the O and down projections must fit its ring at
/// once: those phases (split by K, every warp a slice of every row) give
/// their slots back only at the phase's end. Giving them back a group of
/// rows at a time ends that limit but made a step 0.2-0.9% slower on 132
/// SMs (RESULTS.md, session 28); with 16 slots (Hopper) it asks for 32
/// blocks, with the 6 of sm_120a for 86: the RTX 5090 has 170 SMs.
fn min_blocks(ring_slots: usize) -> usize {
    let rows_a_slot = |k: usize| RING_SLOT_BYTES / (2 * k);
    let fits = |blocks: usize| {
        let rows = HIDDEN.div_ceil(blocks);
        rows <= DECODE_RESIDUAL_MAX_ROWS
            && rows.div_ceil(rows_a_slot(Q_DIM)) <= ring_slots
            && rows.div_ceil(rows_a_slot(INTERMEDIATE)) <= ring_slots
    };
    (1..=HIDDEN).find(|&blocks| fits(blocks)).unwrap_or(HIDDEN)
}

/// Blocks of the decode kernel on `gpu`, which has `sm_count` SMs and gives
/// the kernel a ring of `ring_slots`.
fn decode_blocks(gpu: &str, sm_count: u32, ring_slots: usize) -> Result<u32> {
    decode_blocks_with(gpu, sm_count, ring_slots, crate::gpu::env_setting)
}

/// The same with the setting read by `read` (the environment, or a test's).
fn decode_blocks_with(
    gpu: &str,
    sm_count: u32,
    ring_slots: usize,
    read: impl Fn(&str) -> Result<Option<String>>,
) -> Result<u32> {
    let sm_count = sm_count as usize;
    let min = min_blocks(ring_slots);
    if sm_count < min {
        bail!(
            "{gpu} has {sm_count} SMs; with the {ring_slots} weight-ring slots a block has on it, the decode kernel needs at least {min} (`--device cpu` runs anywhere)"
        );
    }
    const NAME: &str = "QWEN_MK_DECODE_BLOCKS";
    let Some(text) = read(NAME)? else {
        return Ok(sm_count as u32);
    };
    Ok(crate::gpu::count_setting(NAME, &text, min..=sm_count, "blocks")? as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel_dims::{RING_SLOTS_SM120, RING_SLOTS_SM90};

    fn set(value: &'static str) -> impl Fn(&str) -> Result<Option<String>> {
        move |name| Ok((name == "QWEN_MK_DECODE_BLOCKS").then(|| value.to_string()))
    }

    #[test]
    fn the_fewest_blocks_hold_their_split_k_rows_in_the_ring() {
        // Hopper's 16 slots: 32 rows a block, 16 slots of down rows (2 a slot).
        assert_eq!(min_blocks(RING_SLOTS_SM90), 32);
        // sm_120a's 6 slots: 12 rows a block (HIDDEN / 85 rounds up to 13).
        assert_eq!(min_blocks(RING_SLOTS_SM120), 86);
        // Measured on the H200 (session 28): 17 blocks with 16 slots hung.
        assert!(min_blocks(16) > 17);
        // A ring big enough for anything: the residual rows bound it.
        assert_eq!(min_blocks(1000), HIDDEN.div_ceil(DECODE_RESIDUAL_MAX_ROWS));
    }

    #[test]
    fn one_block_per_sm_unless_told_fewer() {
        let unset = |_: &str| Ok(None);
        assert_eq!(decode_blocks_with("H100", 132, 16, unset).unwrap(), 132);
        assert_eq!(decode_blocks_with("RTX 5090", 170, 6, unset).unwrap(), 170);
        assert_eq!(decode_blocks_with("H100", 132, 16, set("66")).unwrap(), 66);
        assert_eq!(
            decode_blocks_with("H100", 132, 16, set(" 32 ")).unwrap(),
            32
        );
        assert_eq!(
            decode_blocks_with("H100", 132, 16, set("132")).unwrap(),
            132
        );
    }

    #[test]
    fn a_grid_the_kernel_cannot_run_is_refused_by_name() {
        // More blocks than SMs cannot all be resident; fewer than 32 would
        // not hold their rows of the down projection in 16 slots.
        for bad in ["133", "31", "8", "0", "-1", "many", ""] {
            let err = decode_blocks_with("H100", 132, 16, set(bad))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("QWEN_MK_DECODE_BLOCKS") && err.contains("from 32 to 132"),
                "{bad}: {err}"
            );
        }
        // An sm_120 GPU smaller than the RTX 5090 (an RTX 5080: 84 SMs).
        let err = decode_blocks_with("RTX 5080", 84, 6, |_: &str| Ok(None))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RTX 5080 has 84 SMs") && err.contains("at least 86"),
            "{err}"
        );
    }
}
