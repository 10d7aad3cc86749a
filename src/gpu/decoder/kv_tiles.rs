//! The tensor maps through which the decode kernel's producer copies
//! attention tiles (kernels/decode_stream_ring.cuh, `copy_tile`): each cache
//! seen as rows of HEAD_DIM bf16 (every layer, KV head and position, in the
//! cache's order), read in boxes of DECODE_KV_TILE rows by half a row with
//! the 128-byte swizzle, the layout the tensor cores' loads read without
//! bank conflicts (kernels/tensor_core.cuh).

use anyhow::{bail, Context, Result};
use cudarc::driver::sys;

use crate::kernel_dims::{DECODE_KV_TILE, HEAD_DIM};

/// 64-bit words of one tensor map (CUtensorMap).
pub(super) const TENSOR_MAP_WORDS: usize = 16;

/// The tensor map of a cache of `rows` rows of HEAD_DIM bf16 at device
/// address `cache`.
pub(super) fn kv_tile_map(cache: u64, rows: usize) -> Result<[u64; TENSOR_MAP_WORDS]> {
    // The kernel's row coordinates are 32-bit signed.
    if rows > i32::MAX as usize {
        bail!("a KV cache of {rows} rows is more than the decode kernel addresses; use a shorter context");
    }
    let dims: [u64; 2] = [HEAD_DIM as u64, rows as u64];
    let row_bytes: [u64; 1] = [(HEAD_DIM * 2) as u64];
    let box_dims: [u32; 2] = [(HEAD_DIM / 2) as u32, DECODE_KV_TILE as u32];
    let element_strides: [u32; 2] = [1, 1];
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call and hold the rank's entries; the
    // driver writes the whole map, which is plain data.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            cache as *mut std::ffi::c_void,
            dims.as_ptr(),
            row_bytes.as_ptr(),
            box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .context(
            "the driver cannot describe the KV cache to the copy unit (cuTensorMapEncodeTiled)",
        )?;
        Ok(map.assume_init().opaque)
    }
}
