//! Captured training steps. On a GPU a step is captured into a CUDA graph once and replayed: one
//! launch per step instead of ~120, with no host work per kernel. In the emulator the same
//! capture records the step's launches, copies and memsets (arguments frozen, as a graph freezes
//! them) and a replay runs the record, so the emulator tests show that a replayed step computes
//! what an eager one does.
//!
//! What makes a step replayable: every buffer it touches keeps its address (they are allocated
//! before the capture and scratch buffers are pooled, never freed), and everything that changes
//! from step to step (the step number of the RNG counters, the learning rate) is read by the
//! kernels from device memory ([`Cuda::step_vals`]), written by the host before each replay.
//! During a capture anything that would break this (an allocation, a host read, an upload, a
//! per-step scalar that differs from the one set before the capture) panics with its name.

use super::{Cuda, Exec};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, LaunchConfig};
use std::ffi::c_void;
use std::sync::atomic::Ordering;

/// One recorded operation of the emulator (device addresses are host addresses there).
pub(super) enum EmuOp {
    Launch {
        name: &'static str,
        cfg: LaunchConfig,
        /// Each argument's value, in 8-byte words (aligned for any argument type).
        args: Vec<Vec<u64>>,
    },
    Copy {
        src: u64,
        dst: u64,
        bytes: usize,
    },
    Zero {
        dst: u64,
        bytes: usize,
    },
}

/// A captured step: replay it with [`Cuda::replay`].
pub struct CudaStepGraph {
    inner: Inner,
}

enum Inner {
    Gpu(CudaGraph),
    Emu(Vec<EmuOp>),
}

impl Cuda {
    /// Whether a capture is in progress.
    pub(super) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Panics inside a capture: `what` cannot be part of a replayed step.
    pub(super) fn forbid_in_capture(&self, what: &str) {
        if self.capturing() {
            panic!("{what} inside a captured training step (a replay would not repeat it)");
        }
    }

    /// In the emulator during a capture: record `op` instead of running it (true when recorded).
    pub(super) fn emu_record(&self, op: impl FnOnce() -> EmuOp) -> bool {
        if !self.capturing() || !matches!(self.exec, Exec::Emu(_)) {
            return false;
        }
        self.emu_tape
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op());
        true
    }

    /// The emulator's record of a launch: each argument's bytes copied now (`sizes[i]` bytes
    /// at `args[i]`), as a graph node copies its parameters at capture.
    pub(super) fn emu_launch_op(
        name: &'static str,
        cfg: LaunchConfig,
        args: &[*mut c_void],
        sizes: &[usize],
    ) -> EmuOp {
        let args = args
            .iter()
            .zip(sizes)
            .map(|(&p, &size)| {
                let mut words = vec![0u64; size.div_ceil(8)];
                // SAFETY: `p` points at a live argument value of `size` bytes (the launch
                // macro's contract), and `words` holds at least `size` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        p as *const u8,
                        words.as_mut_ptr() as *mut u8,
                        size,
                    )
                };
                words
            })
            .collect();
        EmuOp::Launch { name, cfg, args }
    }

    /// Start capturing: the work queued from now on is recorded, not run, until
    /// [`Cuda::capture_end`]. Err when the device cannot capture (nothing was started then).
    pub fn capture_begin(&self) -> Result<(), String> {
        if self.capturing() {
            return Err("a capture is already in progress".into());
        }
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                .map_err(|e| format!("CUDA stream capture: {e:?}"))?,
            Exec::Emu(_) => self
                .emu_tape
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear(),
        }
        self.capturing.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// End the capture and return the step it recorded (instantiated, ready to replay). The
    /// recorded work has not run: replay it once for the step that was captured.
    pub fn capture_end(&self) -> Result<CudaStepGraph, String> {
        if !self.capturing() {
            return Err("no capture in progress".into());
        }
        self.capturing.store(false, Ordering::Relaxed);
        let inner = match &self.exec {
            Exec::Gpu(g) => {
                let graph = g
                    .stream
                    .end_capture(CUgraphInstantiate_flags(0))
                    .map_err(|e| format!("CUDA graph capture/instantiation: {e:?}"))?
                    .ok_or("the CUDA graph capture recorded nothing")?;
                // Move the graph's resources to the device now, not on the first replay.
                graph
                    .upload()
                    .map_err(|e| format!("CUDA graph upload: {e:?}"))?;
                Inner::Gpu(graph)
            }
            Exec::Emu(_) => Inner::Emu(std::mem::take(
                &mut *self.emu_tape.lock().unwrap_or_else(|e| e.into_inner()),
            )),
        };
        Ok(CudaStepGraph { inner })
    }

    /// Run a captured step again (queued like any other work).
    pub fn replay(&self, graph: &CudaStepGraph) -> Result<(), String> {
        self.forbid_in_capture("a replay");
        self.replays.fetch_add(1, Ordering::Relaxed);
        match (&self.exec, &graph.inner) {
            (Exec::Gpu(_), Inner::Gpu(g)) => {
                g.launch().map_err(|e| format!("CUDA graph launch: {e:?}"))
            }
            (Exec::Emu(emu), Inner::Emu(ops)) => {
                for op in ops {
                    match op {
                        EmuOp::Launch { name, cfg, args } => {
                            let mut ptrs: Vec<*mut c_void> =
                                args.iter().map(|w| w.as_ptr() as *mut c_void).collect();
                            emu.launch(
                                name,
                                cfg.grid_dim,
                                cfg.block_dim,
                                cfg.shared_mem_bytes,
                                &mut ptrs,
                            )
                            .map_err(|e| format!("replayed launch of {name}: {e}"))?;
                        }
                        // SAFETY: the addresses are of emulator buffers that the recorded step
                        // used; they live as long as the backend (pooled or owned by the
                        // caller, who keeps them for as long as it replays).
                        EmuOp::Copy { src, dst, bytes } => unsafe {
                            std::ptr::copy_nonoverlapping(
                                *src as *const u8,
                                *dst as *mut u8,
                                *bytes,
                            )
                        },
                        EmuOp::Zero { dst, bytes } => unsafe {
                            std::ptr::write_bytes(*dst as *mut u8, 0, *bytes)
                        },
                    }
                }
                Ok(())
            }
            _ => Err("a step graph of another executor".into()),
        }
    }

    /// How many captured steps have been replayed.
    pub fn replays(&self) -> u64 {
        self.replays.load(Ordering::Relaxed)
    }
}
