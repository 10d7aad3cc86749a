//! Kernel launches with attributes, which cudarc's launch builder does not
//! take: the decode kernel's cooperative launch, and programmatic dependent
//! launch, which lets a step's kernels start before the one before them in
//! the stream has ended (each waits in `wait_for_previous_kernel`,
//! kernels/common.cuh, before reading what that one wrote).
//!
//! `QWEN_MK_EARLY_LAUNCH=0` launches them the ordinary way.

use anyhow::{bail, Context, Result};
use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream};

pub const EARLY_LAUNCH_ENV: &str = "QWEN_MK_EARLY_LAUNCH";

#[derive(Clone, Copy)]
pub struct Launch {
    pub grid: u32,
    pub block: u32,
    pub shared_bytes: u32,
    /// Every block resident at once, checked by the driver.
    pub cooperative: bool,
    /// May start before the previous kernel in the stream has ended.
    pub early: bool,
}

impl Launch {
    /// Queues `function(params)` on `stream`.
    ///
    /// # Safety
    /// `P` must be the kernel's one parameter, by value, and every pointer
    /// in it valid for the kernel's use.
    pub unsafe fn enqueue<P>(
        &self,
        stream: &CudaStream,
        function: &CudaFunction,
        params: &P,
    ) -> Result<()> {
        let mut attributes = Vec::with_capacity(2);
        if self.cooperative {
            attributes.push(attribute(
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_COOPERATIVE,
                |value| value.cooperative = 1,
            ));
        }
        if self.early {
            attributes.push(attribute(
                sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
                |value| value.programmaticStreamSerializationAllowed = 1,
            ));
        }
        let config = sys::CUlaunchConfig {
            gridDimX: self.grid,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: self.block,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.shared_bytes,
            hStream: stream.cu_stream(),
            attrs: attributes.as_mut_ptr(),
            numAttrs: attributes.len() as u32,
        };
        let mut args = [params as *const P as *mut std::ffi::c_void];
        stream.context().bind_to_thread()?;
        // SAFETY: the caller vouches for the parameter; `args` and the
        // attributes outlive the call, which copies them.
        unsafe {
            sys::cuLaunchKernelEx(
                &config,
                function.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        }
        .result()
        .context("kernel launch failed")?;
        Ok(())
    }
}

fn attribute(
    id: sys::CUlaunchAttributeID,
    set: impl FnOnce(&mut sys::CUlaunchAttributeValue),
) -> sys::CUlaunchAttribute {
    // SAFETY: an all-zero attribute is valid plain data; `set` fills the
    // union member `id` names.
    let mut attribute: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attribute.id = id;
    set(&mut attribute.value);
    attribute
}

/// Whether a step's kernels are launched early: yes unless
/// `QWEN_MK_EARLY_LAUNCH` says 0.
pub fn early_launch() -> Result<bool> {
    parse_early_launch(super::env_setting(EARLY_LAUNCH_ENV)?.as_deref())
}

fn parse_early_launch(setting: Option<&str>) -> Result<bool> {
    match setting.map(str::trim) {
        None | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => {
            bail!("{EARLY_LAUNCH_ENV}={other:?} is not 0 or 1; unset it (early launches) or set 0")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_early_launch;

    #[test]
    fn early_launch_is_on_unless_turned_off() {
        assert!(parse_early_launch(None).unwrap());
        assert!(parse_early_launch(Some("1")).unwrap());
        assert!(!parse_early_launch(Some(" 0 ")).unwrap());
        for bad in ["yes", "", "2"] {
            let err = parse_early_launch(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("QWEN_MK_EARLY_LAUNCH"), "{bad}: {err}");
        }
    }
}
