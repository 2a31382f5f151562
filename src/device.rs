//! Choosing where to compute.

use crate::config::Device;

/// The backend a run will use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chosen {
    Cpu,
}

/// Resolve `Training.device`. This build has the CPU backend only: `auto` falls back to it with a
/// note; `cuda` is an error that says what to do, never a panic.
pub fn select(device: Device) -> Result<(Chosen, Option<String>), String> {
    match device {
        Device::Cpu => Ok((Chosen::Cpu, None)),
        Device::Auto => Ok((
            Chosen::Cpu,
            Some("device: auto → cpu (this build of slotfix has no CUDA backend yet)".into()),
        )),
        Device::Cuda => Err(
            "Training.device = cuda: this build of slotfix has no CUDA backend yet; \
             set device to auto or cpu to train on the CPU"
                .into(),
        ),
    }
}
