//! Per-kernel timing (`slotfix bench --kernels`): while it is on, every launch is bracketed by
//! two timing events on the backend's stream (in the emulator, by the host clock), and the
//! spans are summed per kernel name when read. A diagnostic: the events cost a little device
//! and host time per launch, and a captured step cannot carry them, so profiled steps run
//! eagerly.

use super::{Cuda, Exec};
use crate::backend::{KernelProfile, KernelTime};
use cudarc::driver::CudaEvent;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Where a launch started.
pub(super) enum Mark {
    Gpu(CudaEvent),
    Host(Instant),
}

/// One timed launch.
pub(super) enum Span {
    Gpu(CudaEvent, CudaEvent),
    Host(Duration),
}

impl Cuda {
    /// Before a launch: its start mark while profiling (never inside a capture, whose launches
    /// run later; an event that cannot be recorded leaves this launch untimed).
    pub(super) fn profile_mark(&self) -> Option<Mark> {
        if !self.profiling.load(Ordering::Relaxed) || self.capturing() {
            return None;
        }
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .record_event(Some(timing_flags()))
                .ok()
                .map(Mark::Gpu),
            Exec::Emu(_) => Some(Mark::Host(Instant::now())),
        }
    }

    /// After the launch of `name` that `mark` started.
    pub(super) fn profile_record(&self, name: &'static str, mark: Option<Mark>) {
        let span = match (mark, &self.exec) {
            (None, _) => return,
            (Some(Mark::Host(t)), _) => Span::Host(t.elapsed()),
            (Some(Mark::Gpu(start)), Exec::Gpu(g)) => {
                match g.stream.record_event(Some(timing_flags())) {
                    Ok(end) => Span::Gpu(start, end),
                    Err(_) => return,
                }
            }
            (Some(Mark::Gpu(_)), Exec::Emu(_)) => unreachable!("a GPU event in the emulator"),
        };
        self.profile
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, span));
    }

    /// Start (clearing what was timed before) or stop timing each launch.
    pub fn profile_kernels(&self, on: bool) {
        if on {
            self.profile
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
        self.profiling.store(on, Ordering::Relaxed);
    }

    /// The launches timed so far, summed per kernel and sorted slowest first; clears them.
    /// Waits for the device to finish them.
    pub fn kernel_profile(&self) -> Result<KernelProfile, String> {
        let spans = std::mem::take(&mut *self.profile.lock().unwrap_or_else(|e| e.into_inner()));
        let mut by_name: std::collections::BTreeMap<&'static str, (u64, f64)> = Default::default();
        for (name, span) in spans {
            let ms = match span {
                Span::Host(d) => d.as_secs_f64() * 1e3,
                Span::Gpu(start, end) => start
                    .elapsed_ms(&end)
                    .map_err(|e| format!("timing {name}: {e:?}"))?
                    as f64,
            };
            let e = by_name.entry(name).or_default();
            e.0 += 1;
            e.1 += ms;
        }
        let mut out: Vec<KernelTime> = by_name
            .into_iter()
            .map(|(name, (launches, ms))| KernelTime { name, launches, ms })
            .collect();
        out.sort_by(|a, b| b.ms.total_cmp(&a.ms).then(a.name.cmp(b.name)));
        Ok(KernelProfile {
            kernels: out,
            host_clock: matches!(self.exec, Exec::Emu(_)),
        })
    }
}

/// Events that record time (cudarc's default events do not).
pub(super) fn timing_flags() -> cudarc::driver::sys::CUevent_flags {
    cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT
}
