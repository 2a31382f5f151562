//! Choosing where to compute.

use crate::config::Device;
use crate::cuda::{Cuda, FastPaths};

/// The backend a run will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Cpu,
    Cuda,
}

/// Whether a CUDA device can be used: the driver and libnvrtc load and at least one device
/// exists. Never panics.
pub fn cuda_present() -> bool {
    crate::cuda::device_count() > 0
}

/// Resolve `Training.device`: `auto` picks CUDA when a driver, libnvrtc and a device are present
/// and otherwise falls back to the CPU with a note; `cuda` without them is an error that says
/// what to do, never a panic. (The kernels passed their parity tests on a GPU in the first GPU
/// session, H200, 2026-11-26: BENCHMARKS.md. Until then `auto` kept to the CPU.)
pub fn select(device: Device) -> Result<(Chosen, Option<String>), String> {
    match device {
        Device::Cpu => Ok((Chosen::Cpu, None)),
        Device::Auto if cuda_present() => Ok((Chosen::Cuda, Some("device: auto → cuda".into()))),
        Device::Auto => Ok((
            Chosen::Cpu,
            Some("device: auto → cpu (no CUDA driver / GPU found)".into()),
        )),
        Device::Cuda if cuda_present() => Ok((Chosen::Cuda, None)),
        Device::Cuda => Err(
            "Training.device = cuda: no CUDA driver / GPU found (or libnvrtc is missing); \
             set device to auto or cpu to train on the CPU"
                .into(),
        ),
    }
}

/// The CUDA backend on device 0 (compiles every kernel not in the kernel cache; an `Err` says why
/// it is unavailable), with `fast` (from `SLOTFIX_CUDA_DISABLE`: [`FastPaths::from_env`]).
pub fn cuda_backend(fast: FastPaths) -> Result<Cuda, String> {
    Ok(Cuda::new(0)?.with_fast_paths(fast))
}
