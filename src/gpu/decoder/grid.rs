//! The decode kernel's grid: one block per SM (a block takes a whole SM's
//! registers), or fewer with `QWEN_MK_DECODE_BLOCKS`, so that the kernel can
//! be checked on this GPU at the sizes other GPUs give it.

use anyhow::{bail, Result};

use crate::kernel_dims::{DECODE_RESIDUAL_MAX_ROWS, HIDDEN};

/// The fewest blocks the kernel runs on: each keeps at most
/// DECODE_RESIDUAL_MAX_ROWS rows of the residual stream.
const MIN_BLOCKS: usize = HIDDEN.div_ceil(DECODE_RESIDUAL_MAX_ROWS);

/// Blocks of the decode kernel on `gpu`, which has `sm_count` SMs.
pub(super) fn decode_blocks(gpu: &str, sm_count: u32) -> Result<u32> {
    decode_blocks_with(gpu, sm_count, crate::gpu::env_setting)
}

/// The same with the setting read by `read` (the environment, or a test's).
fn decode_blocks_with(
    gpu: &str,
    sm_count: u32,
    read: impl Fn(&str) -> Result<Option<String>>,
) -> Result<u32> {
    let sm_count = sm_count as usize;
    if sm_count < MIN_BLOCKS {
        bail!("{gpu} has {sm_count} SMs; the decode kernel needs at least {MIN_BLOCKS}");
    }
    const NAME: &str = "QWEN_MK_DECODE_BLOCKS";
    let Some(text) = read(NAME)? else {
        return Ok(sm_count as u32);
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (MIN_BLOCKS..=sm_count).contains(&n) => Ok(n as u32),
        _ => bail!(
            "{NAME}={text:?} is not a number of blocks from {MIN_BLOCKS} to {sm_count} (this GPU's SMs); unset it or pick one"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(value: &'static str) -> impl Fn(&str) -> Result<Option<String>> {
        move |name| Ok((name == "QWEN_MK_DECODE_BLOCKS").then(|| value.to_string()))
    }

    #[test]
    fn one_block_per_sm_unless_told_fewer() {
        let unset = |_: &str| Ok(None);
        assert_eq!(decode_blocks_with("H100", 132, unset).unwrap(), 132);
        assert_eq!(decode_blocks_with("RTX 5090", 170, unset).unwrap(), 170);
        assert_eq!(decode_blocks_with("H100", 132, set("66")).unwrap(), 66);
        assert_eq!(decode_blocks_with("H100", 132, set(" 8 ")).unwrap(), 8);
        assert_eq!(decode_blocks_with("H100", 132, set("132")).unwrap(), 132);
    }

    #[test]
    fn a_grid_the_kernel_cannot_run_is_refused_by_name() {
        // More blocks than SMs cannot all be resident; fewer than 8 cannot
        // hold the residual stream.
        for bad in ["133", "7", "0", "-1", "many", ""] {
            let err = decode_blocks_with("H100", 132, set(bad))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("QWEN_MK_DECODE_BLOCKS") && err.contains("from 8 to 132"),
                "{bad}: {err}"
            );
        }
        let err = decode_blocks_with("tiny GPU", 4, |_: &str| Ok(None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("tiny GPU has 4 SMs"), "{err}");
    }
}
