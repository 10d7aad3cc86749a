//! Opening the GPU: a clear error when there is no driver, no device, or a
//! device this build has no machine code for; the embedded kernels loaded.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::Ptx;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub name: String,
    pub sm_count: u32,
    pub compute_capability: (i32, i32),
    _modules: Vec<Arc<CudaModule>>,
    pub decode_step: CudaFunction,
    pub lm_head: CudaFunction,
    pub sample: CudaFunction,
    pub fill_random_bf16: CudaFunction,
    pub read_bandwidth: CudaFunction,
    pub prefill: PrefillKernels,
}

/// The kernels of batched prefill (kernels/prefill.cu, prefill_attention*.cu).
pub struct PrefillKernels {
    pub embed: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_table: CudaFunction,
    pub qk_norm_rope: CudaFunction,
    pub silu_mul: CudaFunction,
    pub attention: CudaFunction,
    /// Combines attention's key splits (prefill_attention_merge).
    pub attention_merge: CudaFunction,
    /// Which attention kernel `attention` is (for reports).
    pub attention_name: &'static str,
}

/// Set to `mma` to run prefill attention on the mma.sync kernel on Hopper
/// too (comparisons, or a fallback).
pub const ATTENTION_ENV: &str = "QWEN_MK_PREFILL_ATTENTION";

/// The two prefill attention kernels: each lives in its own fatbin.
#[derive(Clone, Copy, Debug)]
enum AttentionKernel {
    /// kernels/prefill_attention.cu: every target.
    MmaSync,
    /// kernels/prefill_attention_hopper.cu: real code in sm_90a only.
    Wgmma,
}

impl AttentionKernel {
    /// The kernel for compute capability `major`, given the value of
    /// `QWEN_MK_PREFILL_ATTENTION` if set.
    fn choose(major: i32, choice: Option<&str>) -> Result<Self> {
        match choice {
            None | Some("") if major == 9 => Ok(Self::Wgmma),
            None | Some("") | Some("mma") => Ok(Self::MmaSync),
            Some("wgmma") if major == 9 => Ok(Self::Wgmma),
            Some(other) => bail!(
                "{ATTENTION_ENV}={other} is not a choice here: use mma{}",
                if major == 9 { " or wgmma" } else { "" }
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::MmaSync => "prefill_attention",
            Self::Wgmma => "prefill_attention_wgmma",
        }
    }

    fn image(self) -> &'static [u8] {
        match self {
            Self::MmaSync => embedded::PREFILL_ATTENTION,
            Self::Wgmma => embedded::PREFILL_ATTENTION_HOPPER,
        }
    }
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Self> {
        // cudarc panics when libcuda is missing: look first.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no NVIDIA driver found (libcuda.so is not loadable); --device cuda needs an NVIDIA GPU, use --device cpu otherwise");
        }
        let count = CudaContext::device_count().map_err(|e| {
            anyhow::anyhow!(
                "the NVIDIA driver reports an error ({e}); no usable GPU, use --device cpu"
            )
        })?;
        if count <= 0 {
            bail!("no CUDA GPU is visible; use --device cpu");
        }
        if ordinal >= count as usize {
            bail!("--gpu {ordinal} does not exist: {count} GPU(s) visible");
        }
        let ctx = CudaContext::new(ordinal).context("cannot create a CUDA context")?;
        // One stream, raw pointers inside kernel parameter structs: cudarc's
        // per-buffer event tracking would only add work.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".to_string());
        let compute_capability = ctx.compute_capability()?;
        let (major, minor) = compute_capability;
        let arch = format!("{major}{minor}");
        let built_for: Vec<&str> = embedded::CUDA_ARCHS
            .split(',')
            .map(|a| a.trim().trim_end_matches('a'))
            .collect();
        if major < 9 {
            bail!(
                "{name} is sm_{arch}; qwen-mk's kernels need compute capability 9.0 or newer (H100/H200, RTX 5090); use --device cpu"
            );
        }
        if !built_for.contains(&arch.as_str()) {
            bail!(
                "{name} is sm_{arch}, but this build of qwen-mk has machine code for sm_{} only; rebuild with QWEN_MK_CUDA_ARCHS={arch}a",
                embedded::CUDA_ARCHS.replace(',', ", sm_")
            );
        }
        let sm_count =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let load = |image: &[u8]| {
            ctx.load_module(Ptx::from_binary(image.to_vec()))
                .context("cannot load the embedded CUDA kernels")
        };
        let decode_module = load(embedded::DECODE_MEGAKERNEL)?;
        let lm_head_module = load(embedded::LM_HEAD)?;
        let sample_module = load(embedded::SAMPLE)?;
        let bench_module = load(embedded::BENCH_KERNELS)?;
        let prefill_module = load(embedded::PREFILL)?;
        let attention =
            AttentionKernel::choose(major, super::env_setting(ATTENTION_ENV)?.as_deref())?;
        let attention_module = load(attention.image())?;
        let prefill = PrefillKernels {
            embed: prefill_module.load_function("prefill_embed")?,
            rms_norm: prefill_module.load_function("prefill_rms_norm")?,
            rope_table: prefill_module.load_function("prefill_rope_table")?,
            qk_norm_rope: prefill_module.load_function("prefill_qk_norm_rope")?,
            silu_mul: prefill_module.load_function("prefill_silu_mul")?,
            attention_merge: prefill_module.load_function("prefill_attention_merge")?,
            attention: attention_module.load_function(attention.name())?,
            attention_name: attention.name(),
        };
        Ok(Self {
            decode_step: decode_module.load_function("decode_step")?,
            lm_head: lm_head_module.load_function("lm_head")?,
            sample: sample_module.load_function("sample_token")?,
            fill_random_bf16: bench_module.load_function("fill_random_bf16")?,
            read_bandwidth: bench_module.load_function("read_bandwidth")?,
            prefill,
            _modules: vec![
                decode_module,
                lm_head_module,
                sample_module,
                bench_module,
                prefill_module,
                attention_module,
            ],
            ctx,
            name,
            sm_count,
            compute_capability,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::AttentionKernel;

    fn name(major: i32, choice: Option<&str>) -> &'static str {
        AttentionKernel::choose(major, choice).unwrap().name()
    }

    #[test]
    fn hopper_gets_the_wgmma_attention_and_others_mma() {
        assert_eq!(name(9, None), "prefill_attention_wgmma");
        assert_eq!(name(12, None), "prefill_attention");
        assert_eq!(name(9, Some("mma")), "prefill_attention");
        assert_eq!(name(9, Some("")), "prefill_attention_wgmma");
    }

    #[test]
    fn an_attention_choice_the_gpu_lacks_is_an_error() {
        let err = AttentionKernel::choose(12, Some("wgmma"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("QWEN_MK_PREFILL_ATTENTION=wgmma") && err.contains("use mma"),
            "{err}"
        );
        assert!(AttentionKernel::choose(9, Some("fast")).is_err());
    }
}
