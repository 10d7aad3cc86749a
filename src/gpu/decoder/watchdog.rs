//! Waiting for the GPU under a watchdog: a hung kernel ends the process
//! with an error line instead of hanging it.

use anyhow::{Context, Result};
use cudarc::driver::CudaEvent;

/// How long the host waits for the GPU to reach an event before it calls
/// the kernel hung.
const WATCHDOG: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits for `event`; if the GPU has not reached it within `WATCHDOG`, says
/// so and ends the process. Ending it at once is deliberate: returning an
/// error would drop device buffers, and freeing them waits for the hung
/// kernel forever. So would `std::process::exit`, whose exit handlers tear
/// down the CUDA context (seen on the H100: a hung bench never ended): `_exit`
/// skips them, and the driver reclaims the GPU when the process is gone.
pub(super) fn wait_for(event: &CudaEvent, what: &str) -> Result<()> {
    let start = std::time::Instant::now();
    while !event
        .try_is_complete()
        .with_context(|| format!("the GPU failed during {what}"))?
    {
        if start.elapsed() > WATCHDOG {
            crate::status!(
                "error: the GPU did not finish {what} within {} s; the kernel is hung (a bug: please report it)",
                WATCHDOG.as_secs()
            );
            exit_now(3);
        }
        std::thread::yield_now();
    }
    Ok(())
}

/// Ends the process without running exit handlers (POSIX `_exit`).
fn exit_now(code: i32) -> ! {
    extern "C" {
        fn _exit(code: i32) -> !;
    }
    // SAFETY: _exit takes any status and does not return.
    unsafe { _exit(code) }
}
