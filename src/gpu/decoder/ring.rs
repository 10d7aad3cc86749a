//! The decode kernel's weight ring, sized for the GPU it runs on: how many
//! 12 KB slots a block's shared memory holds (or the count compiled into the
//! kernel for this architecture), and how many slot copies the producer
//! keeps in flight.

use anyhow::{bail, Result};
use cudarc::driver::sys;

use crate::gpu::device::Device;
use crate::kernel_dims::{
    RING_IN_FLIGHT, RING_KV_IN_FLIGHT, RING_MAX_SLOTS, RING_MIN_SLOTS, RING_ONE_CHUNK_IN_FLIGHT,
    RING_SLOTS_SM120, RING_SLOTS_SM90, RING_SLOT_BYTES,
};

/// Weight-ring slots of the decode kernel on this GPU: as many as fit the
/// shared memory a block may opt into, beside the kernel's static shared
/// memory, up to RING_MAX_SLOTS; on an architecture whose kernel has the
/// count compiled in, exactly that many.
pub(super) fn ring_slots(device: &Device) -> Result<usize> {
    let opt_in = device
        .ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
        as usize;
    let fixed = device.decode_step.shared_size_bytes()? as usize;
    let fit = slots_that_fit(&device.name, opt_in, fixed)?;
    compiled_slots(&device.name, device.compute_capability, fit)
}

/// The architectures whose decode kernel has the ring's slot count compiled
/// in (kernels/decode_stream_ring.cuh, RING_FIXED_SLOTS): compute
/// capability, the build's name for it, the count.
const COMPILED_RING_SLOTS: [((i32, i32), &str, usize); 2] = [
    ((9, 0), "90a", RING_SLOTS_SM90),
    ((12, 0), "120a", RING_SLOTS_SM120),
];

/// The ring's slot count for a GPU of compute capability `cc` on which
/// `fit` slots fit: the count compiled into its kernel, where there is one,
/// else `fit`.
fn compiled_slots(gpu: &str, cc: (i32, i32), fit: usize) -> Result<usize> {
    let Some(&(_, _, compiled)) = COMPILED_RING_SLOTS.iter().find(|(c, _, _)| *c == cc) else {
        return Ok(fit);
    };
    if fit < compiled {
        bail!(
            "{gpu} fits {fit} weight-ring slots in a block's shared memory, but the decode kernel for compute capability {}.{} is built for {compiled}; lower RING_SLOTS_SM{}{} in src/kernel_dims.rs and rebuild",
            cc.0,
            cc.1,
            cc.0,
            cc.1
        );
    }
    Ok(compiled)
}

fn slots_that_fit(gpu: &str, opt_in: usize, fixed: usize) -> Result<usize> {
    let slots = (opt_in.saturating_sub(fixed) / RING_SLOT_BYTES).min(RING_MAX_SLOTS);
    if slots < RING_MIN_SLOTS {
        bail!(
            "{gpu} gives a block {opt_in} bytes of shared memory; the decode kernel needs {}",
            fixed + RING_MIN_SLOTS * RING_SLOT_BYTES
        );
    }
    Ok(slots)
}

/// Slot copies the decode kernel's producer keeps in flight
/// (src/kernel_dims.rs says why each is what it is).
pub(super) struct InFlight {
    pub weights: usize,
    /// For an attention chunk's tiles once the block's consumers read them
    /// (a chunk that is not its head's whole cache).
    pub chunk_read: usize,
    /// While it streams a chunk that is its head's whole cache.
    pub one_chunk: usize,
}

/// The copies in flight for a ring of `ring_slots`:
/// `QWEN_MK_DECODE_IN_FLIGHT`, `QWEN_MK_DECODE_KV_IN_FLIGHT` and
/// `QWEN_MK_DECODE_ONE_CHUNK_IN_FLIGHT` (1 to the ring's slots) override
/// them, for tuning.
pub(super) fn ring_in_flight(ring_slots: usize) -> Result<InFlight> {
    in_flight_with(ring_slots, crate::gpu::env_setting)
}

/// The same with the settings read by `read` (the environment, or a test's).
fn in_flight_with(
    ring_slots: usize,
    read: impl Fn(&str) -> Result<Option<String>>,
) -> Result<InFlight> {
    let setting = |name: &str, default: usize| -> Result<usize> {
        parse_in_flight(
            name,
            read(name)?.as_deref(),
            default.min(ring_slots),
            ring_slots,
        )
    };
    Ok(InFlight {
        weights: setting("QWEN_MK_DECODE_IN_FLIGHT", RING_IN_FLIGHT)?,
        chunk_read: setting("QWEN_MK_DECODE_KV_IN_FLIGHT", RING_KV_IN_FLIGHT)?,
        one_chunk: setting(
            "QWEN_MK_DECODE_ONE_CHUNK_IN_FLIGHT",
            RING_ONE_CHUNK_IN_FLIGHT,
        )?,
    })
}

fn parse_in_flight(
    name: &str,
    setting: Option<&str>,
    default: usize,
    ring_slots: usize,
) -> Result<usize> {
    let Some(text) = setting else {
        return Ok(default);
    };
    crate::gpu::count_setting(name, text, 1..=ring_slots, "slots")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_takes_the_shared_memory_a_block_may_have() {
        // The decode kernel's static shared memory as ptxas reports it (the
        // next test reads this build's).
        let fixed = 21_504;
        // H100 / H200: 227 KB a block: the ring's limit of 16 slots.
        assert_eq!(slots_that_fit("H100", 232_448, fixed).unwrap(), 16);
        // RTX 5090: 99 KB a block: 6 slots of 12 KB.
        assert_eq!(slots_that_fit("RTX 5090", 101_376, fixed).unwrap(), 6);
        let err = slots_that_fit("small", 48 * 1024, fixed).unwrap_err();
        assert!(
            err.to_string().contains("small gives a block 49152 bytes"),
            "{err}"
        );
    }

    /// ptxas's report of this build's kernels (build.rs).
    const PTXAS_REPORT: &str = include_str!(concat!(env!("OUT_DIR"), "/kernel-resources.txt"));

    /// Static shared memory of `function` compiled for `arch`, as ptxas
    /// reports it (what the driver's SHARED_SIZE_BYTES gives the host).
    fn static_shared_memory(function: &str, arch: &str) -> Option<usize> {
        let entry = format!("Compiling entry function '{function}' for '{arch}'");
        let rest = &PTXAS_REPORT[PTXAS_REPORT.find(&entry)?..];
        let usage = rest.lines().find(|line| line.contains("bytes smem"))?;
        usage
            .split(',')
            .find_map(|part| part.trim().strip_suffix(" bytes smem")?.parse().ok())
    }

    #[test]
    fn the_compiled_slot_counts_fit_beside_the_kernels_static_shared_memory() {
        let mut checked = 0;
        for (cc, arch, compiled) in COMPILED_RING_SLOTS {
            // The shared memory a block may opt into on that architecture.
            let opt_in = match arch {
                "90a" => 232_448,
                "120a" => 101_376,
                _ => panic!("no shared-memory limit known for sm_{arch}"),
            };
            // An architecture this build leaves out (QWEN_MK_CUDA_ARCHS) has
            // no kernel to check.
            let Some(fixed) = static_shared_memory("decode_step", &format!("sm_{arch}")) else {
                continue;
            };
            let fit = slots_that_fit(arch, opt_in, fixed).unwrap();
            assert_eq!(
                compiled_slots(arch, cc, fit).unwrap(),
                compiled,
                "sm_{arch}: {fixed} bytes of static shared memory leave room for {fit} slots"
            );
            checked += 1;
        }
        assert!(checked > 0, "this build has neither sm_90a nor sm_120a");
    }

    #[test]
    fn hopper_and_sm120_use_the_compiled_slot_count() {
        assert_eq!(compiled_slots("H100", (9, 0), 16).unwrap(), RING_SLOTS_SM90);
        assert_eq!(
            compiled_slots("RTX 5090", (12, 0), 6).unwrap(),
            RING_SLOTS_SM120
        );
        // More room than the kernel was built for: it uses what it was built for.
        assert_eq!(compiled_slots("big", (12, 0), 9).unwrap(), RING_SLOTS_SM120);
        // Other architectures: whatever fits.
        assert_eq!(compiled_slots("L40S", (8, 9), 7).unwrap(), 7);
        let err = compiled_slots("odd Hopper", (9, 0), 12)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("odd Hopper fits 12 weight-ring slots") && err.contains("RING_SLOTS_SM90"),
            "{err}"
        );
    }

    #[test]
    fn each_stream_has_its_own_copies_in_flight_within_the_ring() {
        let unset = |_: &str| Ok(None);
        // Hopper's 16 slots and the RTX 5090's 6 hold every default.
        for slots in [16, 6] {
            let n = in_flight_with(slots, unset).unwrap();
            assert_eq!(
                (n.weights, n.chunk_read, n.one_chunk),
                (RING_IN_FLIGHT, RING_KV_IN_FLIGHT, RING_ONE_CHUNK_IN_FLIGHT)
            );
        }
        // The fewest slots the kernel runs with: defaults clamp to them.
        let n = in_flight_with(RING_MIN_SLOTS, unset).unwrap();
        assert_eq!(n.one_chunk, RING_MIN_SLOTS.min(RING_ONE_CHUNK_IN_FLIGHT));
        assert!(n.weights <= RING_MIN_SLOTS && n.chunk_read <= RING_MIN_SLOTS);
        // A setting overrides its own stream only, and a bad one names itself.
        let one_chunk_six = |name: &str| {
            Ok((name == "QWEN_MK_DECODE_ONE_CHUNK_IN_FLIGHT").then(|| "6".to_string()))
        };
        let n = in_flight_with(16, one_chunk_six).unwrap();
        assert_eq!(
            (n.weights, n.chunk_read, n.one_chunk),
            (RING_IN_FLIGHT, RING_KV_IN_FLIGHT, 6)
        );
        assert_eq!(in_flight_with(6, one_chunk_six).unwrap().one_chunk, 6);
        let too_many =
            |name: &str| Ok((name == "QWEN_MK_DECODE_KV_IN_FLIGHT").then(|| "7".to_string()));
        let err = match in_flight_with(6, too_many) {
            Ok(_) => panic!("7 copies in flight on a ring of 6 slots was taken"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("QWEN_MK_DECODE_KV_IN_FLIGHT") && err.contains("1 to 6"),
            "{err}"
        );
    }

    #[test]
    fn copies_in_flight_default_and_stay_within_the_ring() {
        let parse =
            |setting, default| parse_in_flight("QWEN_MK_DECODE_IN_FLIGHT", setting, default, 16);
        assert_eq!(parse(None, RING_IN_FLIGHT).unwrap(), RING_IN_FLIGHT);
        assert_eq!(parse(None, 4).unwrap(), 4);
        assert_eq!(parse(Some("3"), 1).unwrap(), 3);
        assert_eq!(parse(Some(" 16 "), 1).unwrap(), 16);
        for bad in ["0", "17", "-1", "two", ""] {
            let err = parse(Some(bad), 1).unwrap_err().to_string();
            assert!(err.contains("QWEN_MK_DECODE_IN_FLIGHT"), "{bad}: {err}");
        }
    }
}
