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

/// Whether the CUDA kernels have passed their parity tests (`tests/cuda.rs`) on a GPU. Until
/// they have, `device: auto` keeps training on the CPU reference and `device: cuda` warns.
/// Set after the first GPU session (H200, 2026-11-26, BENCHMARKS.md): every `gpu_*` test passed,
/// compute-sanitizer's memcheck, racecheck and synccheck found nothing, and a step's loss and
/// gradients agreed with PyTorch in float64 (f32: within 1e-3; TF32: within 5e-2, and at trained
/// parameters every gradient within 2× of PyTorch's own TF32 error).
pub const CUDA_VALIDATED: bool = true;

/// Resolve `Training.device`: `auto` picks CUDA when a driver, libnvrtc and a device are present
/// (and the backend is validated) and otherwise falls back to the CPU with a note; `cuda` without
/// them is an error that says what to do, never a panic.
pub fn select(device: Device) -> Result<(Chosen, Option<String>), String> {
    match device {
        Device::Cpu => Ok((Chosen::Cpu, None)),
        Device::Auto if cuda_present() && CUDA_VALIDATED => {
            Ok((Chosen::Cuda, Some("device: auto → cuda".into())))
        }
        Device::Auto if cuda_present() => Ok((
            Chosen::Cpu,
            Some(
                "device: auto → cpu (a GPU is present, but the CUDA kernels have not passed their \
                 parity tests on a GPU yet; set device: cuda to use them anyway)"
                    .into(),
            ),
        )),
        Device::Auto => Ok((
            Chosen::Cpu,
            Some("device: auto → cpu (no CUDA driver / GPU found)".into()),
        )),
        Device::Cuda if cuda_present() => Ok((
            Chosen::Cuda,
            (!CUDA_VALIDATED).then(|| {
                "warning: the CUDA backend is experimental: its kernels compile, but have not yet \
                 passed their parity tests on a GPU"
                    .to_string()
            }),
        )),
        Device::Cuda => Err(
            "Training.device = cuda: no CUDA driver / GPU found (or libnvrtc is missing); \
             set device to auto or cpu to train on the CPU"
                .into(),
        ),
    }
}

/// The CUDA backend on device 0 (compiles every kernel not in the kernel cache; an `Err` says why
/// it is unavailable),
/// with the fast paths named in `SLOTFIX_CUDA_DISABLE` switched off ([`FastPaths`]).
pub fn cuda_backend() -> Result<Cuda, String> {
    let fast = FastPaths::from_env()?;
    Ok(Cuda::new(0)?.with_fast_paths(fast))
}
