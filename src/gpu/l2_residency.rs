//! The LM head's first rows kept in L2 from one decode step to the next.
//!
//! The LM head reads 311 MB a step and is bound by HBM bandwidth, and between
//! two LM heads the decode kernel streams 881 MB of layer weights through L2,
//! which leaves nothing of the last step's head there. A GPU can set part of
//! its L2 aside for lines marked persisting, which other accesses do not
//! evict (CUDA's L2 access management): the LM head's launch marks its first
//! rows persisting with an access-policy window, so from the second step on
//! they come from L2, and the kernel spreads them over its blocks
//! (kernels/lm_head.cu). The decode kernel keeps the rest of L2, more than
//! its handed-on vectors and prefetched ring slots need.
//!
//! `QWEN_MK_L2_RESIDENT_MB` sets how many MiB (0: none); by default, as many
//! as the GPU lets persist.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::CudaContext;

pub const RESIDENT_ENV: &str = "QWEN_MK_L2_RESIDENT_MB";

pub struct L2Residency {
    ctx: Arc<CudaContext>,
    /// Rows at the head's start that persist in L2.
    pub rows: usize,
    window: sys::CUaccessPolicyWindow,
}

impl L2Residency {
    /// Sets aside L2 for the first rows of `head` (`vocab` rows of
    /// `row_bytes`), as many as the GPU allows or the setting asks.
    pub fn set_aside(
        ctx: &Arc<CudaContext>,
        head: u64,
        vocab: usize,
        row_bytes: usize,
    ) -> Result<Self> {
        let max_persisting =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_PERSISTING_L2_CACHE_SIZE)?;
        let max_window =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_ACCESS_POLICY_WINDOW_SIZE)?;
        let requested = parse_mib(super::env_setting(RESIDENT_ENV)?.as_deref())?;
        let rows = resident_rows(
            max_persisting.max(0) as usize,
            max_window.max(0) as usize,
            requested,
            vocab,
            row_bytes,
        );
        let bytes = rows * row_bytes;
        if rows > 0 {
            ctx.set_limit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, bytes)
                .context("cannot set aside L2 for the LM head")?;
        }
        Ok(Self {
            ctx: ctx.clone(),
            rows,
            window: sys::CUaccessPolicyWindow {
                base_ptr: head as *mut std::ffi::c_void,
                num_bytes: bytes,
                hitRatio: 1.0,
                hitProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_PERSISTING,
                missProp: sys::CUaccessProperty::CU_ACCESS_PROPERTY_STREAMING,
            },
        })
    }

    /// Bytes set aside.
    pub fn bytes(&self) -> usize {
        self.window.num_bytes
    }

    /// The launch attributes that mark the rows persisting: none when no
    /// rows are.
    pub fn launch_attributes(&self) -> Vec<sys::CUlaunchAttribute> {
        if self.rows == 0 {
            return Vec::new();
        }
        // SAFETY: an all-zero attribute is valid plain data; its id and the
        // union member it names are set next.
        let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attribute.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_ACCESS_POLICY_WINDOW;
        attribute.value.accessPolicyWindow = self.window;
        vec![attribute]
    }
}

impl Drop for L2Residency {
    /// Gives the set-aside L2 back to the rest of the process.
    fn drop(&mut self) {
        if self.rows > 0 && self.ctx.bind_to_thread().is_ok() {
            let _ = self
                .ctx
                .set_limit(sys::CUlimit::CU_LIMIT_PERSISTING_L2_CACHE_SIZE, 0);
            // SAFETY: no arguments; it only demotes this context's persisting lines.
            let _ = unsafe { sys::cuCtxResetPersistingL2Cache() };
        }
    }
}

/// Whole rows of `row_bytes` that persist: what was asked (all that may
/// persist, if nothing was), within what the GPU allows for persisting lines
/// and for one window, and within the head.
fn resident_rows(
    max_persisting: usize,
    max_window: usize,
    requested: Option<usize>,
    vocab: usize,
    row_bytes: usize,
) -> usize {
    let bytes = requested
        .unwrap_or(max_persisting)
        .min(max_persisting)
        .min(max_window);
    (bytes / row_bytes).min(vocab)
}

/// `QWEN_MK_L2_RESIDENT_MB`'s value in bytes.
fn parse_mib(setting: Option<&str>) -> Result<Option<usize>> {
    let Some(text) = setting else {
        return Ok(None);
    };
    match text.trim().parse::<usize>() {
        Ok(mib) if mib <= 1 << 20 => Ok(Some(mib << 20)),
        _ => bail!(
            "{RESIDENT_ENV}={text:?} is not a whole number of MiB; unset it (all the GPU allows) or give one, 0 for none"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_mib, resident_rows};

    const ROW: usize = 2048;

    #[test]
    fn the_rows_are_what_may_persist_in_whole_rows() {
        // A GPU that lets 30 MiB persist.
        let gpu = 30 << 20;
        assert_eq!(resident_rows(gpu, 128 << 20, None, 151_936, ROW), 15_360);
        // Asked for less: less; for more: still only what may persist.
        assert_eq!(
            resident_rows(gpu, 128 << 20, Some(8 << 20), 151_936, ROW),
            4_096
        );
        assert_eq!(
            resident_rows(gpu, 128 << 20, Some(64 << 20), 151_936, ROW),
            15_360
        );
        // A smaller window limit, a GPU without persisting lines, a small head.
        assert_eq!(resident_rows(gpu, 1 << 20, None, 151_936, ROW), 512);
        assert_eq!(resident_rows(0, 0, None, 151_936, ROW), 0);
        assert_eq!(resident_rows(gpu, 128 << 20, None, 1_000, ROW), 1_000);
        assert_eq!(resident_rows(gpu, 128 << 20, Some(0), 151_936, ROW), 0);
    }

    #[test]
    fn the_setting_is_whole_mib() {
        assert_eq!(parse_mib(None).unwrap(), None);
        assert_eq!(parse_mib(Some("0")).unwrap(), Some(0));
        assert_eq!(parse_mib(Some(" 24 ")).unwrap(), Some(24 << 20));
        for bad in ["-1", "1.5", "lots", ""] {
            let err = parse_mib(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("QWEN_MK_L2_RESIDENT_MB"), "{bad}: {err}");
        }
    }
}
