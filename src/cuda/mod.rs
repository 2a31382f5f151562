//! The CUDA backend: hand-written kernels (`kernels/*.cu`) for every op of the model. With
//! `precision: f32` the convolutions and linear layers use exact-f32 kernels (version 1, the
//! parity reference); with `tf32` they run as implicit GEMMs on the tensor cores
//! (`kernels/conv_tc*.cu`: versions 2 to 6 by shape, `conv.rs` says which). `benches/NOTES.md`
//! has each kernel's floor, predictions and version log.
//!
//! Everything runs in order on one stream (a stream of its own: the legacy default stream cannot
//! be captured into a CUDA graph, see `graph.rs`). The kernels are compiled with NVRTC for the
//! device's own architecture, in parallel, and the PTX is kept on disk for the next process
//! ([`kcache`]); they include no CUDA headers, so the GPU machine needs only the driver
//! (`libcuda.so.1`) and `libnvrtc.so.13`.
//! Semantics are those of [`crate::cpu::Cpu`]: forward outputs are overwritten, backward
//! gradients are accumulated (`+=`). Weight-gradient reductions use fixed-order block reductions
//! (no atomics), so every result is deterministic for a given shape. The host reads
//! (`download`, `sum_squares`, `rel_change`) synchronize; nothing else does.
//!
//! The same backend can run its kernels in the emulator ([`emu`], [`Cuda::emulated`]): the kernel
//! sources compiled by the host C++ compiler and run on the CPU, with buffers in host memory.
//! That is how the launchers and kernels are tested on machines without a GPU.
//!
//! Every failure to launch is a panic (the [`Backend`] trait has no error channel); everything
//! that can fail before the first launch (no driver, no device, NVRTC errors) is an `Err` of
//! [`Cuda::new`].
//!
//! Where things are: this file holds the buffers, the launch machinery and the launchers of the
//! small ops (elementwise, norms, position embedding, gates, loss); each larger op's launchers
//! sit in a file of their own named after its kernel file: `conv.rs` (conv.cu, conv_tc*.cu; the
//! linear layers reuse it), `attention.rs`, `tokens.rs`, `slotcell.rs`, `bcastconv.rs` and
//! `optim.rs`. `nvrtc.rs` and [`kcache`] compile the kernels, `graph.rs` captures a step,
//! [`fastpaths`] switches fast paths off, and [`emu`] runs every kernel on the CPU.

pub mod emu;
pub mod fastpaths;
mod graph;
pub mod kcache;
pub mod kernels;
mod nvrtc;

pub use fastpaths::FastPaths;
pub use graph::CudaStepGraph;
pub use kcache::KernelCache;
pub use nvrtc::{
    compile_checked, compile_cubin, compile_file, device_count, driver_available, nvrtc_available,
    CheckedCompile, KernelResources,
};
pub use optim::CudaOptState;

use crate::backend::{AdamStep, Backend, KernelProfile};
use crate::config::Precision;
use crate::ops::attention::AttnDims;
use crate::ops::bcastconv::{
    bcast_conv_bwd_by_ops, bcast_conv_fwd_by_ops, BcastConvDims, BcastConvGrads, BcastConvParams,
};
use crate::ops::conv::ConvGeom;
use crate::ops::elementwise::DropoutMask;
use crate::ops::layernorm::LN_EPS;
use crate::ops::slotcell::{
    slot_query_bwd_by_ops, slot_query_fwd_by_ops, slot_update_bwd_by_ops, slot_update_fwd_by_ops,
    SlotCellDims, SlotQueryGrads, SlotQueryOut, SlotQueryParams, SlotQueryTape, SlotUpdateGrads,
    SlotUpdateOut, SlotUpdateParams, SlotUpdateScratch, SlotUpdateTape,
};
use crate::ops::tokens::{
    tokens_bwd_by_ops, tokens_fwd_by_ops, TokenActs, TokenDims, TokenGradActs, TokenGrads,
    TokenOutGrads, TokenParams,
};
use crate::optim::{OptHyper, OptReport};
use crate::rng::Philox;
use conv::{check_conv_range, ConvDwGemmC, ConvGemmC, ConvGeomC};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use kernels::{KernelFile, KERNEL_FILES};
use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::catch_unwind;
use std::sync::{Arc, Mutex};

/// Element types of device buffers.
pub trait Elem: DeviceRepr + cudarc::driver::ValidAsZeroBits + bytemuck::Pod + Default {
    /// What the emulator fills guard zones and fresh scratch with: a signalling NaN, so that a
    /// read shows as NaN and any arithmetic result written back (a quiet NaN) differs from it.
    fn poison() -> Self;
    /// The backend's free scratch buffers of this type.
    fn pool(p: &ScratchPools) -> &Mutex<Vec<DevBuf<Self>>>;
}
impl Elem for f32 {
    /// (`cuemu_prefetch` in emu/cuemu.h tests for this pattern; a unit test checks they agree.)
    fn poison() -> f32 {
        f32::from_bits(0x7fa5_a5a5)
    }
    fn pool(p: &ScratchPools) -> &Mutex<Vec<DevBuf<f32>>> {
        &p.f32
    }
}
impl Elem for f64 {
    fn poison() -> f64 {
        f64::from_bits(0x7ff4_a5a5_a5a5_a5a5)
    }
    fn pool(p: &ScratchPools) -> &Mutex<Vec<DevBuf<f64>>> {
        &p.f64
    }
}
/// Device addresses and lengths (the multi-tensor tables).
impl Elem for u64 {
    fn poison() -> u64 {
        0xa5a5_a5a5_a5a5_a5a5
    }
    fn pool(p: &ScratchPools) -> &Mutex<Vec<DevBuf<u64>>> {
        &p.u64
    }
}

/// Scratch buffers given back after use, reused by size: a training step allocates nothing
/// after the first one. Reuse is safe without waiting: every kernel runs in order on one stream,
/// so a later user's kernels run after the earlier user's.
#[derive(Default)]
pub struct ScratchPools {
    f32: Mutex<Vec<DevBuf<f32>>>,
    f64: Mutex<Vec<DevBuf<f64>>>,
    u64: Mutex<Vec<DevBuf<u64>>>,
}

/// A scratch buffer borrowed from the pool; it goes back when dropped.
struct Scratch<'a, T: Elem> {
    buf: Option<DevBuf<T>>,
    pools: &'a ScratchPools,
}

impl<T: Elem> std::ops::Deref for Scratch<'_, T> {
    type Target = DevBuf<T>;
    fn deref(&self) -> &DevBuf<T> {
        self.buf.as_ref().expect("present until dropped")
    }
}

impl<T: Elem> std::ops::DerefMut for Scratch<'_, T> {
    fn deref_mut(&mut self) -> &mut DevBuf<T> {
        self.buf.as_mut().expect("present until dropped")
    }
}

impl<T: Elem> Drop for Scratch<'_, T> {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            T::pool(self.pools)
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(b);
        }
    }
}

/// A device buffer: GPU memory, or host memory when the kernels run in the emulator.
pub struct DevBuf<T: Elem> {
    mem: Mem<T>,
}

enum Mem<T: Elem> {
    Gpu(CudaSlice<T>),
    Host(HostMem<T>),
}

/// The buffer type of the CUDA backend.
pub type Buf = DevBuf<f32>;

impl<T: Elem> DevBuf<T> {
    pub fn len(&self) -> usize {
        match &self.mem {
            Mem::Gpu(s) => s.len(),
            Mem::Host(h) => h.len,
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn gpu(&self) -> &CudaSlice<T> {
        match &self.mem {
            Mem::Gpu(s) => s,
            Mem::Host(_) => panic!("an emulator buffer passed to the GPU"),
        }
    }
    fn gpu_mut(&mut self) -> &mut CudaSlice<T> {
        match &mut self.mem {
            Mem::Gpu(s) => s,
            Mem::Host(_) => panic!("an emulator buffer passed to the GPU"),
        }
    }
    fn host(&self) -> &HostMem<T> {
        match &self.mem {
            Mem::Host(h) => h,
            Mem::Gpu(_) => panic!("a GPU buffer passed to the emulator"),
        }
    }
    fn host_mut(&mut self) -> &mut HostMem<T> {
        match &mut self.mem {
            Mem::Host(h) => h,
            Mem::Gpu(_) => panic!("a GPU buffer passed to the emulator"),
        }
    }
}

/// Elements of poison on each side of an emulator buffer.
const GUARD: usize = 64;

/// An emulator buffer: `len` elements between two guard zones of [`Elem::poison`].
struct HostMem<T> {
    data: Vec<T>,
    len: usize,
    /// Address of the first element: the pointer value a kernel receives (an argument slot
    /// must point at it).
    addr: u64,
}

impl<T: Elem> HostMem<T> {
    /// Zeros, or poison when `zeroed` is false.
    fn new(len: usize, zeroed: bool) -> Self {
        let mut data: Vec<T> = vec![T::poison(); len + 2 * GUARD];
        if zeroed {
            data[GUARD..GUARD + len].fill(T::default());
        }
        let addr = data[GUARD..].as_mut_ptr() as u64;
        HostMem { data, len, addr }
    }
    fn slice(&self) -> &[T] {
        &self.data[GUARD..GUARD + self.len]
    }
    fn slice_mut(&mut self) -> &mut [T] {
        &mut self.data[GUARD..GUARD + self.len]
    }
    /// The offset (from the first element) of the first guard byte a kernel overwrote.
    fn guard_damage(&self) -> Option<isize> {
        let poison_value = T::poison();
        let poison = bytemuck::bytes_of(&poison_value);
        let damaged = |v: &T| bytemuck::bytes_of(v) != poison;
        if let Some(i) = self.data[..GUARD].iter().position(damaged) {
            return Some(i as isize - GUARD as isize);
        }
        self.data[GUARD + self.len..]
            .iter()
            .position(damaged)
            .map(|i| (self.len + i) as isize)
    }
}

/// A kernel argument: a buffer or a plain value, for either executor.
trait Arg {
    fn push_gpu<'a>(&'a self, b: &mut LaunchArgs<'a>);
    /// Pointer to the argument's value (for a buffer: to its address), as the emulator's
    /// argument array wants it.
    fn emu_ptr(&self) -> *mut c_void;
    /// Bytes at [`Arg::emu_ptr`] (what a capture copies).
    fn emu_size(&self) -> usize;
    /// For a buffer: which element outside it the last emulated launch wrote.
    fn emu_guard_damage(&self) -> Option<String> {
        None
    }
    /// For a buffer in the emulator: its bytes, as `[start, end)` addresses.
    fn emu_range(&self) -> Option<(u64, u64)> {
        None
    }
}

impl<T: Elem> Arg for DevBuf<T> {
    fn push_gpu<'a>(&'a self, b: &mut LaunchArgs<'a>) {
        b.arg(self.gpu());
    }
    fn emu_ptr(&self) -> *mut c_void {
        &self.host().addr as *const u64 as *mut c_void
    }
    fn emu_size(&self) -> usize {
        std::mem::size_of::<u64>()
    }
    fn emu_guard_damage(&self) -> Option<String> {
        let h = self.host();
        h.guard_damage()
            .map(|at| format!("element {at}, outside its {} elements", h.len))
    }
    fn emu_range(&self) -> Option<(u64, u64)> {
        let h = self.host();
        Some((h.addr, h.addr + (h.len * std::mem::size_of::<T>()) as u64))
    }
}

macro_rules! value_arg {
    ($($t:ty),*) => {$(
        impl Arg for $t {
            fn push_gpu<'a>(&'a self, b: &mut LaunchArgs<'a>) {
                b.arg(self);
            }
            fn emu_ptr(&self) -> *mut c_void {
                self as *const $t as *mut c_void
            }
            fn emu_size(&self) -> usize {
                std::mem::size_of::<$t>()
            }
        }
    )*};
}
value_arg!(
    i32,
    u32,
    u64,
    f32,
    f64,
    ConvGeomC,
    ConvGemmC,
    ConvDwGemmC,
    attention::AttnDimsC,
    tokens::TokenDimsC,
    slotcell::SlotCellDimsC
);

/// Threads per block of the 1-D kernels and of the block reductions (a multiple of 32).
const BLOCK: u32 = 256;
/// Blocks the column-sum kernels aim for (`*_partial_f32`, `broadcast_pos_bwd_dz_f32`).
const COL_SUM_BLOCKS: usize = 1024;
// Those kernels reduce over exactly 8 warps (`column_sum_8warps` in common.cuh).
const _: () = assert!(BLOCK == 256);
/// Side of the square tiles of the linear-layer kernels (must match `TS` in linear.cu).
const TILE: u32 = 16;
/// Rows per partial product of the linear weight gradient (at least; see `linear_bwd`).
const DW_ROW_CHUNK: usize = 1024;

/// A size as the kernels' `int` (all index arithmetic is 32-bit; larger buffers are refused).
fn i(n: usize) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| {
        panic!("CUDA backend v1: size {n} exceeds the 32-bit index range of its kernels")
    })
}

/// Blocks and rows per block of the column-sum kernels over `m` rows (`*_partial_f32`): at most
/// about COL_SUM_BLOCKS blocks of at least 64 rows, from the sizes alone (the same summation
/// order on every device).
fn col_chunks(m: usize) -> (usize, usize) {
    let chunk = m.div_ceil(COL_SUM_BLOCKS).max(64).next_multiple_of(8);
    (m.div_ceil(chunk).max(1), chunk)
}

/// The second pass of a two-pass sum over `columns` columns (common.cuh, `rs_combine`): RS_COLS
/// columns per block of RS_THREADS.
pub(super) fn rs_grid(columns: usize) -> LaunchConfig {
    const RS_COLS: usize = 32;
    const RS_THREADS: u32 = 256;
    LaunchConfig {
        grid_dim: (columns.div_ceil(RS_COLS) as u32, 1, 1),
        block_dim: (RS_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Threads of composite_loss_f32's one block (composite.cu).
const COMPOSITE_LOSS_THREADS: u32 = 1024;

/// One thread per element, `BLOCK` threads per block.
fn per_elem(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK as usize) as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `n` blocks of `BLOCK` threads (one block per reduced element).
fn per_block(n: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes,
    }
}

/// One warp per row.
fn per_warp(rows: usize) -> LaunchConfig {
    per_elem(rows * 32)
}

/// 2-D tiles of `TILE`² threads over an `a × b` output (a on grid.x).
fn tiles(a: usize, b: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            a.div_ceil(TILE as usize) as u32,
            b.div_ceil(TILE as usize) as u32,
            z as u32,
        ),
        block_dim: (TILE, TILE, 1),
        shared_mem_bytes: 0,
    }
}

/// Launch kernel `$name` with config `$cfg` and the given arguments (references; scalars must
/// be named locals so that they outlive the launch). Panics on a launch error. In the emulator,
/// a kernel that wrote outside one of its buffers panics too.
macro_rules! launch {
    ($cu:expr, $name:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let cfg: cudarc::driver::LaunchConfig = $cfg;
        $cu.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &$cu.exec {
            $crate::cuda::Exec::Gpu(gpu) => {
                let mut b = gpu.stream.launch_builder(gpu.func($name));
                $( ($arg).push_gpu(&mut b); )*
                let mark = $cu.profile_mark();
                unsafe { b.launch(cfg) }
                    .unwrap_or_else(|e| panic!("CUDA launch of {} failed: {e:?}", $name));
                $cu.profile_record($name, mark);
            }
            $crate::cuda::Exec::Emu(emu) => {
                *$cu.emu_launched.lock().unwrap_or_else(|e| e.into_inner()).entry($name).or_insert(0) += 1;
                $crate::cuda::Cuda::emu_check_launch($name, &cfg, &[$( ($arg).emu_range() ),*]);
                let mut args: Vec<*mut std::ffi::c_void> = vec![$( ($arg).emu_ptr() ),*];
                let recorded = $cu.emu_record(|| {
                    $crate::cuda::Cuda::emu_launch_op($name, cfg, &args, &[$( ($arg).emu_size() ),*])
                });
                if !recorded {
                    let mark = $cu.profile_mark();
                    emu.launch($name, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, &mut args)
                        .unwrap_or_else(|e| panic!("emulated launch of {} failed: {e}", $name));
                    $cu.profile_record($name, mark);
                    $(
                        if let Some(at) = ($arg).emu_guard_damage() {
                            panic!("emulated kernel {} wrote `{}` at {at}", $name, stringify!($arg));
                        }
                    )*
                }
            }
        }
    }};
}

mod attention;
mod bcastconv;
mod conv;
mod optim;
mod profile;
mod slotcell;
mod tokens;

/// Where the kernels run.
enum Exec {
    Gpu(Gpu),
    Emu(emu::Emulator),
}

/// One device, one stream, every kernel compiled and loaded.
struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
}

impl Gpu {
    fn func(&self, name: &'static str) -> &CudaFunction {
        self.funcs
            .get(name)
            .unwrap_or_else(|| panic!("CUDA kernel {name} is not loaded"))
    }
}

/// The CUDA backend.
pub struct Cuda {
    exec: Exec,
    name: String,
    arch: &'static str,
    precision: Precision,
    /// Host reads of device memory so far (each one waits for the queued work).
    host_reads: std::sync::atomic::AtomicU64,
    /// Device allocations so far.
    allocations: std::sync::atomic::AtomicU64,
    /// Bytes of every device buffer allocated so far (freed ones included).
    allocated_bytes: std::sync::atomic::AtomicU64,
    /// Kernel launches so far (memsets and copies not included; a replayed step counts as
    /// none, see `replays`).
    launches: std::sync::atomic::AtomicU64,
    pools: ScratchPools,
    /// The per-step scalars the kernels read (`STEP_VAL_*` in common.cuh).
    step_vals: Mutex<StepVals>,
    /// A capture is in progress ([`graph`]); in the emulator, what it has recorded so far.
    capturing: std::sync::atomic::AtomicBool,
    emu_tape: Mutex<Vec<graph::EmuOp>>,
    /// Captured steps replayed so far.
    replays: std::sync::atomic::AtomicU64,
    /// The fast paths this backend may take (all by default; see [`fastpaths`]).
    fast: FastPaths,
    /// The kernels of [`conv::LARGE_SHARED`] the device refused their shared memory: never
    /// launched, whatever `fast` says (empty in the emulator).
    shared_refused: Vec<&'static str>,
    /// Why this device's `wgmma` kernels are not used although they loaded: the check of one
    /// product against the CPU when the backend opened it failed ([`Cuda::check_wgmma`]).
    wgmma_refused: Option<String>,
    /// In the emulator: launches so far per kernel name (tests check which kernels ran).
    emu_launched: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Whether each launch is timed ([`profile`]), and the launches timed so far.
    profiling: std::sync::atomic::AtomicBool,
    profile: Mutex<Vec<(&'static str, profile::Span)>>,
}

/// Slots of the per-step scalars (`STEP_VAL_*` in common.cuh).
mod step_val {
    pub const STEP: usize = 0;
    pub const LR: usize = 1;
    pub const DECAY: usize = 2;
}
const STEP_VALS_LEN: usize = 4;

/// The per-step scalars on the device and what they hold.
struct StepVals {
    buf: DevBuf<f64>,
    host: [f64; STEP_VALS_LEN],
}

/// The most dynamic shared memory a `wgmma_probe_tf32` launch takes ([`Cuda::wgmma_probe`]):
/// opted in to, as the other kernels launched with more than 48 KiB.
pub const WGMMA_PROBE_SHARED: u32 = 96 << 10;

/// Load one kernel file's module. A cached PTX entry the driver rejects is compiled again; PTX
/// the driver refuses outright (a driver older than libnvrtc rejects its newer PTX version) is
/// replaced by machine code that NVRTC compiles for the device's own architecture, with a note.
fn load_module(
    ctx: &Arc<CudaContext>,
    f: &'static KernelFile,
    ptx: Ptx,
    cached: bool,
    arch: &'static str,
    cache: &KernelCache,
) -> Result<Arc<cudarc::driver::CudaModule>, String> {
    let mut refused = match ctx.load_module(ptx) {
        Ok(m) => return Ok(m),
        Err(e) => format!("{e:?}"),
    };
    if cached {
        match ctx.load_module(kcache::recompile(f, arch, cache)?) {
            Ok(m) => return Ok(m),
            Err(e) => refused = format!("{e:?}"),
        }
    }
    let cubin = nvrtc::compile_cubin(f, arch)?;
    let m = ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| {
        format!(
            "loading kernels/{} ({arch}): the driver refused NVRTC's PTX ({refused}) and its \
             machine code ({e:?})",
            f.name
        )
    })?;
    eprintln!(
        "note: the CUDA driver refused NVRTC's PTX of kernels/{} ({refused}); loaded machine code \
         compiled by NVRTC for {arch} instead",
        f.name
    );
    Ok(m)
}

/// Raise the dynamic shared-memory limit of the kernels that launch with more than the 48 KiB
/// every kernel gets ([`conv::LARGE_SHARED`]), once, to what they take. Returns the kernels that
/// did not get it; for each of them (a device that gives a block less: sm_86 and sm_89 give
/// 99 KiB, sm_80 163 KiB, sm_90 227 KiB), a warning, and the backend runs its fallback.
fn opt_in_shared(
    ctx: &CudaContext,
    funcs: &HashMap<&'static str, CudaFunction>,
    device: &str,
) -> Vec<&'static str> {
    use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
    let most = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .unwrap_or(48 * 1024);
    let mut refused = Vec::new();
    for (name, bytes) in conv::LARGE_SHARED {
        // (The kernels of an sm_90a file are loaded on 9.0 devices only.)
        let sm90a_only = KERNEL_FILES
            .iter()
            .any(|f| f.sm90a && f.kernels.contains(&name));
        if sm90a_only && !funcs.contains_key(name) {
            continue;
        }
        let result = if bytes as i64 > most as i64 {
            Err(format!("{device} gives a block at most {most} bytes"))
        } else {
            match funcs.get(name) {
                None => Err("not loaded".into()),
                Some(func) => func
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        bytes as i32,
                    )
                    .map_err(|e| format!("{device} refused it: {e:?}")),
            }
        };
        if let Err(e) = result {
            eprintln!(
                "warning: kernel {name} needs {bytes} bytes of shared memory: {e}; its fallback runs"
            );
            refused.push(name);
        }
    }
    refused
}

impl Cuda {
    /// Open device `ordinal` and compile every kernel file for its architecture. Never panics:
    /// no driver, no device or a compile error is an `Err` with a readable message.
    pub fn new(ordinal: usize) -> Result<Cuda, String> {
        if !catch_unwind(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false) {
            return Err("no CUDA driver found (libcuda.so.1 cannot be loaded)".into());
        }
        if !nvrtc_available() {
            return Err(
                "libnvrtc cannot be loaded (install nvidia-cuda-nvrtc and put its lib folder on \
                 LD_LIBRARY_PATH)"
                    .into(),
            );
        }
        let ctx = match catch_unwind(|| CudaContext::new(ordinal)) {
            Ok(Ok(ctx)) => ctx,
            Ok(Err(e)) => return Err(format!("no usable CUDA device {ordinal}: {e:?}")),
            Err(_) => return Err(format!("opening CUDA device {ordinal} panicked")),
        };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| format!("CUDA device {ordinal}: compute capability: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if major < 8 {
            // TF32 mma.sync (m16n8k8) and the other sm_80 instructions in the kernels.
            return Err(format!(
                "CUDA device {ordinal} ({name}) has compute capability {major}.{minor}; \
                 slotfix's CUDA kernels need 8.0 or newer (Ampere, Ada, Hopper)"
            ));
        }
        // CompileOptions wants a &'static str; one short string per process is leaked.
        let arch: &'static str = Box::leak(kcache::arch_of(major, minor).into_boxed_str());
        // One stream of our own (capturable, unlike the legacy default stream). Every buffer
        // is used on that stream only, so cudarc's cross-stream event tracking (which would
        // record events on every launch, and cannot wait on them inside a capture) is off.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| format!("CUDA device {ordinal}: creating a stream: {e:?}"))?;
        let mut funcs = HashMap::new();
        let cache = KernelCache::from_env();
        let started = std::time::Instant::now();
        let mut compiling = false;
        // One compile at a time in a process: backends opened together (tests on parallel
        // threads) then find the first one's output in the cache instead of all compiling.
        static COMPILE: Mutex<()> = Mutex::new(());
        let files = {
            let _one = COMPILE.lock().unwrap_or_else(|e| e.into_inner());
            kcache::ptx_for_all(KERNEL_FILES, arch, &cache, |n| {
                compiling = true;
                eprint!("compiling {n} CUDA kernel files for {arch} with NVRTC … ");
            })?
        };
        if compiling {
            match cache.dir() {
                Some(d) => eprintln!(
                    "{:.1} s (kept in {} for later runs)",
                    started.elapsed().as_secs_f64(),
                    d.display()
                ),
                None => eprintln!("{:.1} s", started.elapsed().as_secs_f64()),
            }
        }
        let loading = std::time::Instant::now();
        for kcache::FilePtx {
            file: f,
            ptx,
            cached,
        } in files
        {
            let file_arch = f.arch_for(arch).unwrap_or(arch);
            let module = load_module(&ctx, f, ptx, cached, file_arch, &cache)?;
            for &k in f.kernels {
                let func = module
                    .load_function(k)
                    .map_err(|e| format!("kernels/{}: function {k}: {e:?}", f.name))?;
                funcs.insert(k, func);
            }
        }
        // The driver turns the PTX into machine code on the first load (ptxas: a fifth of the
        // NVRTC compile) and keeps it in its own JIT cache; a slow load says which happened.
        // Written to stderr itself rather than by eprintln!, which a test harness captures: on a
        // bare GPU machine the first process is the test binary, the one that pays the JIT.
        let loaded = loading.elapsed().as_secs_f64();
        if loaded > 1.0 {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "loading the kernels took {loaded:.1} s (the CUDA driver compiling the PTX for \
                 {arch}, which its JIT cache normally keeps for later runs)"
            );
        }
        // A fast path that cannot be switched on is no reason to lose the GPU: its kernels say
        // so, and their fallbacks run.
        let refused = opt_in_shared(&ctx, &funcs, &name);
        let mut cu = Cuda::with_exec(Exec::Gpu(Gpu { ctx, stream, funcs }), name, arch);
        cu.shared_refused = refused;
        // The wgmma kernels' one check, unless SLOTFIX_CUDA_DISABLE switches them off (so that
        // a driver on which the check itself fails can still be used). A wrong product leaves
        // them out; a launch that fails outright leaves the context unusable: no device then.
        let wgmma_wanted = FastPaths::from_env().map_or(true, |f| f.conv_wgmma || f.dw_wgmma);
        if cu.has_wgmma() && wgmma_wanted {
            match catch_unwind(std::panic::AssertUnwindSafe(|| cu.check_wgmma())) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    eprintln!("warning: {e}; the wgmma kernels are not used on this device");
                    cu.wgmma_refused = Some(e);
                }
                Err(_) => {
                    return Err(format!(
                        "CUDA device {ordinal} ({}): the check of its wgmma kernels failed to \
                         run (SLOTFIX_CUDA_DISABLE=conv_wgmma,dw_wgmma skips it and them)",
                        cu.name
                    ))
                }
            }
        }
        Ok(cu)
    }

    fn with_exec(exec: Exec, name: String, arch: &'static str) -> Cuda {
        let mut cu = Cuda {
            exec,
            name,
            arch,
            precision: Precision::F32,
            host_reads: Default::default(),
            allocations: Default::default(),
            allocated_bytes: Default::default(),
            launches: Default::default(),
            pools: Default::default(),
            // Replaced just below, once the executor can allocate.
            step_vals: Mutex::new(StepVals {
                buf: DevBuf {
                    mem: Mem::Host(HostMem::new(0, true)),
                },
                host: [0.0; STEP_VALS_LEN],
            }),
            capturing: Default::default(),
            emu_tape: Default::default(),
            replays: Default::default(),
            fast: FastPaths::ALL,
            shared_refused: Vec::new(),
            wgmma_refused: None,
            emu_launched: Default::default(),
            profiling: Default::default(),
            profile: Default::default(),
        };
        let buf = cu.alloc_any(STEP_VALS_LEN, true);
        cu.step_vals
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .buf = buf;
        cu
    }

    /// The backend with its kernels run by the emulator on the CPU (for tests). Err when no C++
    /// compiler is found or this is not x86-64 Linux.
    pub fn emulated() -> Result<Cuda, String> {
        Ok(Cuda::with_exec(
            Exec::Emu(emu::Emulator::new()?),
            "kernel emulator on the CPU".into(),
            "emulated",
        ))
    }

    /// The precision of the convolutions and linear layers: `F32` (the default: exact f32, v1
    /// kernels) or `Tf32` (tensor cores, `kernels/conv_tc*.cu`; a linear layer runs as a 1×1
    /// convolution). Everything else (attention, norms, gates, the loss, Adam) is f32 in both.
    pub fn with_precision(mut self, precision: Precision) -> Cuda {
        self.precision = precision;
        self
    }

    /// Which version of the tensor-core passes (`kernels/conv_tc*.cu`: activations and weight
    /// gradients) runs where both apply: 3 (the default, with the later versions where they
    /// apply) or 2 everywhere, for benchmarks that compare them.
    pub fn with_conv_tc_version(mut self, version: u8) -> Cuda {
        assert!(version == 2 || version == 3, "conv_tc versions are 2 and 3");
        let v3 = version == 3;
        self.fast.conv_v3 = v3;
        self.fast.dw_v3 = v3;
        if !v3 {
            self.fast.conv_k32 = false;
            self.fast.conv_v5 = false;
            self.fast.conv_v6 = false;
            self.fast.conv_c4 = false;
            self.fast.conv_n8s = false;
            self.fast.dw_v4 = false;
            self.fast.dw_units = false;
            self.fast.dw_v5 = false;
            self.fast.dw_c4 = false;
            self.fast.dw_c4_tc = false;
            self.fast.dw_k1 = false;
        }
        self
    }

    /// See [`Cuda::with_conv_tc_version`] (3 when the activation passes' version 3 is on).
    pub fn conv_tc_version(&self) -> u8 {
        if self.fast.conv_v3 {
            3
        } else {
            2
        }
    }

    /// Whether kernel `name` may launch: false only for a kernel of [`conv::LARGE_SHARED`] the
    /// device refused its shared memory.
    fn may_launch(&self, name: &str) -> bool {
        !self.shared_refused.contains(&name)
    }

    /// How many blocks of kernel `name` (`threads` each, `shared_bytes` of dynamic shared
    /// memory) the device runs at once: its SMs times the driver's occupancy (at least 1). A
    /// persistent kernel's grid; in the emulator 2, so that the tests' blocks walk several
    /// tiles.
    fn resident_blocks(&self, name: &'static str, threads: u32, shared_bytes: u32) -> usize {
        match &self.exec {
            Exec::Gpu(gpu) => {
                use cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT;
                let sms = gpu
                    .ctx
                    .attribute(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .unwrap_or(1);
                let per_sm = gpu
                    .func(name)
                    .occupancy_max_active_blocks_per_multiprocessor(
                        threads,
                        shared_bytes as usize,
                        None,
                    )
                    .unwrap_or(1);
                (sms.max(1) as usize) * (per_sm.max(1) as usize)
            }
            Exec::Emu(_) => 2,
        }
    }

    /// The fast paths this backend may take; the others run their fallbacks ([`fastpaths`]).
    pub fn with_fast_paths(mut self, fast: FastPaths) -> Cuda {
        self.fast = fast;
        self
    }

    pub fn fast_paths(&self) -> FastPaths {
        self.fast
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// In the emulator: run the tensor-core kernels with full f32 operands instead of TF32
    /// ([`emu::Emulator::set_exact_tf32`]), so that `precision: tf32` can be checked against the
    /// f32 reference at f32 tolerances. No effect on a GPU.
    pub fn with_emulator_exact_tf32(mut self) -> Cuda {
        if let Exec::Emu(e) = &mut self.exec {
            e.set_exact_tf32(true);
        }
        self
    }

    /// Whether the kernels run in the emulator.
    pub fn is_emulated(&self) -> bool {
        matches!(self.exec, Exec::Emu(_))
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> &str {
        &self.name
    }

    /// The architecture the kernels were compiled for, e.g. "sm_90".
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The kernels that need more than 48 KiB of shared memory and did not get it from this
    /// device (their fallbacks run instead; empty in the emulator).
    pub fn shared_opt_in_refused(&self) -> Vec<&'static str> {
        self.shared_refused.clone()
    }

    /// Wait for all queued work; reports any asynchronous error.
    pub fn synchronize(&self) -> Result<(), String> {
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .synchronize()
                .map_err(|e| format!("CUDA synchronize: {e:?}")),
            Exec::Emu(_) => Ok(()),
        }
    }

    /// Set every element of `buf` to `value` (e.g. NaN, to poison outputs in tests).
    pub fn fill_value(&self, buf: &mut Buf, value: f32) {
        let n = buf.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        launch!(self, "fill_f32", per_elem(n); &ni, &value, buf);
    }

    /// A new device buffer of `len` elements: zeros, or uninitialised when `zeroed` is false
    /// (poison in the emulator, so that a read of an unwritten element shows).
    fn alloc_any<T: Elem>(&self, len: usize, zeroed: bool) -> DevBuf<T> {
        self.forbid_in_capture("a device allocation");
        self.allocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.allocated_bytes.fetch_add(
            (len * std::mem::size_of::<T>()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        let mem = match &self.exec {
            Exec::Gpu(g) => Mem::Gpu(
                if len == 0 {
                    g.stream.null::<T>()
                } else if zeroed {
                    g.stream.alloc_zeros::<T>(len)
                } else {
                    unsafe { g.stream.alloc::<T>(len) }
                }
                .unwrap_or_else(|e| panic!("CUDA alloc of {len} elements: {e:?}")),
            ),
            Exec::Emu(_) => Mem::Host(HostMem::new(len, zeroed)),
        };
        DevBuf { mem }
    }

    /// How many kernels this backend has launched.
    pub fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// In the emulator, before a launch, what would make it fail or misbehave on a GPU only:
    /// more threads per block than the kernel's `__launch_bounds__`, more than 48 KiB of
    /// dynamic shared memory (or, for the kernels the backend opts in, more than it opts in
    /// to: [`conv::LARGE_SHARED`]), a different number of
    /// arguments than parameters, or two buffer arguments that overlap where the kernel's
    /// signature makes that undefined behaviour ([`emu::restrict_violations`]). Panics.
    fn emu_check_launch(name: &str, cfg: &LaunchConfig, ranges: &[Option<(u64, u64)>]) {
        let sig = emu::sig_of(name)
            .unwrap_or_else(|| panic!("emulator: no signature parsed for kernel {name}"));
        // The device's launch limits (every CUDA GPU since sm_30): a launch past them fails
        // with CUDA_ERROR_INVALID_VALUE on the GPU, while the emulator would run it.
        let (gx, gy, gz) = cfg.grid_dim;
        assert!(
            (1..=i32::MAX as u32).contains(&gx)
                && (1..=65_535).contains(&gy)
                && (1..=65_535).contains(&gz),
            "kernel {name}: grid {:?} (each dimension at least 1; y and z at most 65535)",
            cfg.grid_dim
        );
        let (x, y, z) = cfg.block_dim;
        assert!(
            x >= 1 && y >= 1 && (1..=64).contains(&z) && x * y * z <= 1024,
            "kernel {name}: block {:?} (at most 1024 threads, z at most 64)",
            cfg.block_dim
        );
        if let Some(max) = sig.max_threads {
            assert!(
                x * y * z <= max,
                "kernel {name}: launched with {} threads per block, its __launch_bounds__ is {max}",
                x * y * z
            );
        }
        let (limit, why) = match conv::LARGE_SHARED.iter().find(|(k, _)| *k == name) {
            Some(&(_, bytes)) => (bytes, "what the backend opts this kernel in to"),
            None => (48 * 1024, "the limit without an opt-in"),
        };
        assert!(
            cfg.shared_mem_bytes <= limit,
            "kernel {name}: {} bytes of dynamic shared memory ({why} is {limit})",
            cfg.shared_mem_bytes
        );
        assert_eq!(
            sig.params.len(),
            ranges.len(),
            "kernel {name}: {} arguments launched, its signature has {}",
            ranges.len(),
            sig.params.len()
        );
        let bad = emu::restrict_violations(&sig.params, ranges);
        assert!(
            bad.is_empty(),
            "kernel {name}: arguments {bad:?} (0-based) overlap in memory, but the kernel declares \
             one of each pair __restrict__ and writes through one of them"
        );
    }

    /// In the emulator: how many times each kernel has been launched so far (empty on a GPU,
    /// where launches are not recorded by name).
    pub fn emu_kernel_launches(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.emu_launched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many device buffers this backend has allocated: a training step after the first
    /// must allocate none.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes of every device buffer this backend has allocated (freed ones included).
    pub fn allocated_bytes(&self) -> u64 {
        self.allocated_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A scratch buffer of at least one element (`len.max(1)`), for data that a kernel
    /// overwrites completely: from the pool when one of that size is free, else new. In the
    /// emulator it is re-poisoned, so that a read of an element not yet written shows.
    fn scratch<T: Elem>(&self, len: usize) -> Scratch<'_, T> {
        let len = len.max(1);
        let reused = {
            let mut pool = T::pool(&self.pools)
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            pool.iter()
                .position(|b| b.len() == len)
                .map(|at| pool.swap_remove(at))
        };
        let mut buf = reused.unwrap_or_else(|| self.alloc_any(len, false));
        // (Not while capturing: the poison would land now, not when the replay runs.)
        if let (Mem::Host(h), false) = (&mut buf.mem, self.capturing()) {
            h.slice_mut().fill(T::poison());
        }
        Scratch {
            buf: Some(buf),
            pools: &self.pools,
        }
    }

    /// Milliseconds per run of `f` on the device: `reps` runs between two CUDA events, after
    /// one warm-up run. Err in the emulator (it has no clock worth reading).
    pub fn time_ms(&self, reps: usize, mut f: impl FnMut()) -> Result<f64, String> {
        let Exec::Gpu(g) = &self.exec else {
            return Err("timing needs a GPU (the emulator only checks results)".into());
        };
        f();
        let err = |e| format!("CUDA event: {e:?}");
        let start = g
            .stream
            .record_event(Some(profile::timing_flags()))
            .map_err(err)?;
        for _ in 0..reps.max(1) {
            f();
        }
        let end = g
            .stream
            .record_event(Some(profile::timing_flags()))
            .map_err(err)?;
        let ms = start.elapsed_ms(&end).map_err(err)?;
        Ok(ms as f64 / reps.max(1) as f64)
    }

    /// The TF32 tensor-core throughput this device reaches with `mma.sync` (TFLOP/s), measured
    /// by `kernels/peak.cu`; Err in the emulator.
    pub fn measure_tf32_peak(&self) -> Result<f64, String> {
        // Per warp and iteration: 8 mma m16n8k8.
        self.measure_peak(
            "mma_peak_tf32",
            132 * 16,
            128,
            0,
            4096,
            32,
            8.0 * 2.0 * 16.0 * 8.0 * 8.0,
        )
    }

    /// The throughput (TFLOP/s) of a tensor-core probe kernel `name(iters, out)` that writes one
    /// finite sum per thread: `blocks` of `threads`, each group of `group` threads doing `flops`
    /// per iteration; timed over 3 launches after a warm-up. Err in the emulator.
    #[allow(clippy::too_many_arguments)]
    fn measure_peak(
        &self,
        name: &'static str,
        blocks: usize,
        threads: usize,
        shared_bytes: u32,
        iters: i32,
        group: usize,
        flops: f64,
    ) -> Result<f64, String> {
        let mut out = self.scratch::<f32>(blocks * threads);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: shared_bytes,
        };
        let ms = self.time_ms(3, || {
            launch!(self, name, cfg; &iters, &mut out);
        })?;
        if self.read(&out).iter().any(|v| !v.is_finite()) {
            return Err(format!("the peak probe {name} produced a non-finite value"));
        }
        Ok((blocks * threads / group) as f64 * iters as f64 * flops / (ms * 1e-3) / 1e12)
    }

    /// The per-thread sums of `l2_read_peak_f32` (`kernels/peak.cu`) over `buf` (a power of two
    /// of float4s): `blocks` of `threads`, each thread reading `iters` float4s through L2 only;
    /// with `reps`, its time in ms too (mean of `reps` launches after a warm-up; GPU only).
    pub fn l2_read_probe(
        &self,
        buf: &[f32],
        iters: i32,
        blocks: usize,
        threads: usize,
        reps: Option<usize>,
    ) -> Result<(Vec<f32>, Option<f64>), String> {
        let n4 = buf.len() / 4;
        assert!(
            buf.len() % 4 == 0 && n4.is_power_of_two(),
            "a power of two of float4s"
        );
        let mut src: DevBuf<f32> = self.alloc_any(buf.len(), false);
        self.upload_any(buf, &mut src);
        let mut out: DevBuf<f32> = self.alloc_any(blocks * threads, false);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let n4i = i(n4);
        let ms = match reps {
            Some(reps) => Some(self.time_ms(reps, || {
                launch!(self, "l2_read_peak_f32", cfg; &iters, &src, &n4i, &mut out);
            })?),
            None => {
                launch!(self, "l2_read_peak_f32", cfg; &iters, &src, &n4i, &mut out);
                None
            }
        };
        Ok((self.read(&out), ms))
    }

    /// The read bandwidth of this device's L2 cache (GB/s): every SM reading a 16 MiB buffer
    /// (which an H100's or H200's L2 holds) through L2 only, by `l2_read_probe`; Err in the
    /// emulator.
    pub fn measure_l2_read_bw(&self) -> Result<f64, String> {
        let (blocks, threads, iters) = (132 * 8, 256, 512);
        let buf = vec![1.0f32; 1 << 22];
        let (sums, ms) = self.l2_read_probe(&buf, iters, blocks, threads, Some(3))?;
        if sums.iter().any(|&s| s != 4.0 * iters as f32) {
            return Err("the L2 probe read wrong values".into());
        }
        let bytes = 16.0 * (blocks * threads) as f64 * iters as f64;
        Ok(bytes / (ms.unwrap_or(f64::NAN) * 1e-3) / 1e9)
    }

    /// Whether this backend has the warpgroup MMA kernels (`kernels/wgmma.cu`, sm_90a): on a
    /// device of compute capability 9.0, and in the emulator.
    pub fn has_wgmma(&self) -> bool {
        self.wgmma_refused.is_none()
            && match &self.exec {
                Exec::Gpu(g) => g.funcs.contains_key("wgmma_probe_tf32"),
                Exec::Emu(_) => true,
            }
    }

    /// One `wgmma` product of the probe (one k8 step, A in registers, B in the layout of the
    /// convolutions' halo: K halves far apart, row groups 192 bytes apart) against the CPU. Its operands are
    /// multiples of 1/8 in [−1, 1], exact in TF32, and so are its products and sums: the
    /// result must be exact. What it guards: the backend's reading of the PTX ISA's layouts,
    /// which only a GPU can confirm (the emulator implements the same reading).
    pub fn check_wgmma(&self) -> Result<(), String> {
        let val = |i: usize, m: usize| ((i * m) % 17) as f32 / 8.0 - 1.0;
        let a: Vec<f32> = (0..64 * 8).map(|i| val(i, 7)).collect();
        let b: Vec<f32> = (0..128 * 8).map(|i| val(i, 11)).collect();
        let d = self.wgmma_probe(&a, &b, (3088, 192), false, false)?;
        for r in 0..64 {
            for c in 0..128 {
                let want: f32 = (0..8).map(|k| a[r * 8 + k] * b[c * 8 + k]).sum();
                let got = d[r * 128 + c];
                if got != want {
                    return Err(format!(
                        "the wgmma check on {} gave D[{r}][{c}] = {got}, the CPU {want}",
                        self.name
                    ));
                }
            }
        }
        Ok(())
    }

    /// The TF32 throughput of `wgmma` m64n128k8 (A in registers, B from shared memory) on this
    /// device (TFLOP/s), measured by `kernels/wgmma.cu`; Err in the emulator and on devices
    /// without sm_90a.
    pub fn measure_wgmma_tf32_peak(&self) -> Result<f64, String> {
        if !self.has_wgmma() {
            return Err(format!("no wgmma on {} ({})", self.name, self.arch));
        }
        // Per warpgroup and iteration: 8 wgmma m64n128k8.
        let flops = 8.0 * 2.0 * 64.0 * 128.0 * 8.0;
        self.measure_peak("wgmma_peak_tf32", 132 * 4, 256, 4096, 2048, 128, flops)
    }

    /// d (64 × 128, row-major) = a · bᵀ for a of 64 × k and b of 128 × k (row-major; k = 8, 16,
    /// 24 or 32), by one warpgroup's `wgmma` m64n128k8 steps (`wgmma_probe_tf32`), its operands
    /// staged in shared memory in the K-major layout with leading and stride byte offsets `lbo`
    /// and `sbo` (`kernels/wgmma.cuh`); with `a_from_smem`, A through a descriptor too instead
    /// of registers. `fields_swapped`: the descriptors carry the two offsets in each other's
    /// fields (a test's diagnosis, when the documented reading fails, of whether the device
    /// reads them the other way round). Each k8 slice is sized for either reading, so that a
    /// device that reads them the other way round reads no shared memory past the launch's:
    /// at most [`WGMMA_PROBE_SHARED`] bytes in all. Err where [`Cuda::has_wgmma`] is false.
    pub fn wgmma_probe(
        &self,
        a: &[f32],
        b: &[f32],
        (lbo, sbo): (i32, i32),
        a_from_smem: bool,
        fields_swapped: bool,
    ) -> Result<Vec<f32>, String> {
        const ROWS: usize = 64;
        const COLS: usize = 128;
        if !self.has_wgmma() {
            return Err(format!("no wgmma on {} ({})", self.name, self.arch));
        }
        let k = a.len() / ROWS;
        assert!(
            a.len() == ROWS * k && b.len() == COLS * k && k % 8 == 0 && (8..=32).contains(&k),
            "a is 64 × k, b 128 × k, k = 8, 16, 24 or 32"
        );
        assert!(lbo % 16 == 0 && sbo % 16 == 0 && lbo > 0 && sbo > 0);
        let mut abuf: DevBuf<f32> = self.alloc_any(a.len(), false);
        let mut bbuf: DevBuf<f32> = self.alloc_any(b.len(), false);
        self.upload_any(a, &mut abuf);
        self.upload_any(b, &mut bbuf);
        let mut d: DevBuf<f32> = self.alloc_any(ROWS * COLS, false);
        self.upload_any(&vec![f32::NAN; ROWS * COLS], &mut d);
        // (wgmma_probe_span in kernels/wgmma.cu: the bytes of one 128 × k8 slice.)
        let span_of = |l: i32, s: i32| 15 * s + 7 * 16 + l + 16;
        let span = span_of(lbo, sbo).max(span_of(sbo, lbo));
        let (steps, operands) = ((k / 8) as i32, if a_from_smem { 2 } else { 1 });
        let bytes = (operands * steps * span) as u32;
        assert!(
            bytes <= WGMMA_PROBE_SHARED,
            "{bytes} bytes of shared memory"
        );
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: bytes,
        };
        let (a_smem, swapped) = (a_from_smem as i32, fields_swapped as i32);
        launch!(self, "wgmma_probe_tf32", cfg;
            &abuf, &bbuf, &mut d, &steps, &lbo, &sbo, &a_smem, &swapped);
        Ok(self.read(&d))
    }

    /// How many host reads of device memory (each a synchronization) this backend has made: a
    /// training step must make none.
    pub fn host_reads(&self) -> u64 {
        self.host_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Copy a buffer to the host (waits for the queued work).
    fn read<T: Elem>(&self, src: &DevBuf<T>) -> Vec<T> {
        self.forbid_in_capture("a host read of device memory");
        self.host_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.exec {
            Exec::Gpu(g) => {
                let v = g
                    .stream
                    .clone_dtoh(src.gpu())
                    .unwrap_or_else(|e| panic!("CUDA download: {e:?}"));
                self.synchronize().unwrap_or_else(|e| panic!("{e}"));
                v
            }
            Exec::Emu(_) => src.host().slice().to_vec(),
        }
    }

    /// Σ x² (or Σ (x − y)²) in double: per-block partials, then one block sums them.
    fn reduce_squares(&self, x: &Buf, y: Option<&Buf>) -> f64 {
        let n = x.len();
        if n == 0 {
            return 0.0;
        }
        let nb = n.div_ceil(BLOCK as usize).min(1024);
        let mut partial = self.scratch::<f64>(nb);
        let mut out = self.scratch::<f64>(1);
        let ni = i(n);
        match y {
            None => {
                launch!(self, "sum_squares_partial_f32", per_block(nb, 0); &ni, x, &mut partial)
            }
            Some(y) => {
                assert_eq!(y.len(), n);
                launch!(self, "diff_squares_partial_f32", per_block(nb, 0); &ni, x, y, &mut partial)
            }
        }
        let nbi = i(nb);
        launch!(self, "sum_partials_f64", per_block(1, 0); &nbi, &partial, &mut out);
        self.read(&out)[0]
    }

    /// db[col] += Σ_rows g[row, col] over `[m, n]` with g = dy masked by y > 0 when `relu`: block
    /// partials over fixed row chunks, added in chunk order (deterministic).
    fn col_sums(&self, m: usize, n: usize, y: &Buf, relu: bool, dy: &Buf, db: &mut Buf) {
        assert_eq!(dy.len(), m * n);
        assert_eq!(db.len(), n);
        if m == 0 || n == 0 {
            return;
        }
        let (nblk, chunk) = col_chunks(m);
        let mut partial = self.scratch::<f32>(nblk * n);
        let (mi, ni, ci, ri) = (i(m), i(n), i(chunk), relu as i32);
        launch!(self, "col_sum_partial_f32", per_block(nblk, 0);
            &mi, &ni, &ci, y, dy, &ri, &mut partial);
        let nb = i(nblk);
        launch!(self, "sum_partials_f32", rs_grid(n); &nb, &ni, &partial, db);
    }

    /// dW and db of the pos-embedding Linear(4 → c) from dy `[nimg, h, w, c]`.
    #[allow(clippy::too_many_arguments)]
    fn posembed_params_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Buf,
        dwp: &mut Buf,
        dbp: &mut Buf,
    ) {
        assert_eq!(dy.len() % (h * w * c), 0);
        assert_eq!(dwp.len(), c * 4);
        assert_eq!(dbp.len(), c);
        let (hi, wi, ci) = (i(h), i(w), i(c));
        let m = dy.len() / c;
        let (nblk, chunk) = col_chunks(m);
        let mut pw = self.scratch::<f32>(nblk * c * 4);
        let mut pb = self.scratch::<f32>(nblk * c);
        let (mi, chi) = (i(m), i(chunk));
        launch!(self, "posembed_params_partial_f32", per_block(nblk, 0);
            &mi, &hi, &wi, &ci, &chi, dy, &mut pw, &mut pb);
        let (nb, c4) = (i(nblk), i(c * 4));
        launch!(self, "sum_partials_f32", rs_grid(c * 4); &nb, &c4, &pw, dwp);
        launch!(self, "sum_partials_f32", rs_grid(c); &nb, &ci, &pb, dbp);
    }

    fn dropout(&self, mask: &DropoutMask, x: &mut Buf) {
        let n = x.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        let a = self.dropout_args(mask);
        let sv = self.step_vals();
        launch!(self, "dropout_f32", per_elem(n);
            &ni, &a.seed_lo, &a.seed_hi, &a.stream, &sv.buf, &a.p, &a.scale, x);
    }

    /// A dropout mask as the kernels take it (dropout_f32, slot_update_fwd_f32), with the
    /// per-step scalars' RNG counter set to its step.
    fn dropout_args(&self, mask: &DropoutMask) -> DropoutArgs {
        self.set_step_counter(mask.step);
        DropoutArgs {
            seed_lo: mask.rng.seed as u32,
            seed_hi: (mask.rng.seed >> 32) as u32,
            stream: mask.stream,
            p: mask.p,
            scale: mask.scale() as f32,
        }
    }

    /// Make the per-step scalars hold `vals`: an upload (a host-to-device copy, no
    /// synchronization) only when they changed. During a capture they must not change: the
    /// host sets them before it captures or replays a step.
    fn set_step_vals(&self, vals: [f64; STEP_VALS_LEN]) {
        let mut sv = self.step_vals();
        let same = sv
            .host
            .iter()
            .zip(&vals)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same {
            self.forbid_in_capture("a change of the per-step scalars (step, lr)");
            // In stream order: kernels queued before read the old values, later ones the new.
            self.upload_any(&vals, &mut sv.buf);
            sv.host = vals;
        }
    }

    fn step_vals(&self) -> std::sync::MutexGuard<'_, StepVals> {
        self.step_vals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Make the RNG counter of the per-step scalars `step` (the low 32 bits are what the
    /// kernels use), keeping the learning rate.
    fn set_step_counter(&self, step: u32) {
        let mut vals = self.step_vals().host;
        if vals[step_val::STEP] as u64 as u32 != step {
            vals[step_val::STEP] = step as f64;
            self.set_step_vals(vals);
        }
    }

    /// The per-step scalars of a training step with hyper-parameters `h`.
    fn step_vals_for(h: &OptHyper) -> [f64; STEP_VALS_LEN] {
        let mut vals = [0.0; STEP_VALS_LEN];
        vals[step_val::STEP] = h.step as f64;
        vals[step_val::LR] = h.lr;
        vals[step_val::DECAY] = 1.0 - h.lr * h.weight_decay;
        vals
    }
}

/// See [`Cuda::dropout_args`].
struct DropoutArgs {
    seed_lo: u32,
    seed_hi: u32,
    stream: u32,
    p: f64,
    scale: f32,
}

impl Cuda {
    /// The device address of a buffer as a kernel sees it.
    fn addr<T: Elem>(&self, b: &DevBuf<T>) -> u64 {
        match (&self.exec, &b.mem) {
            (Exec::Gpu(g), Mem::Gpu(s)) => {
                use cudarc::driver::DevicePtr;
                let (p, _record) = s.device_ptr(&g.stream);
                p
            }
            (Exec::Emu(_), Mem::Host(h)) => h.addr,
            _ => panic!("a buffer of the other executor"),
        }
    }

    fn upload_any<T: Elem>(&self, src: &[T], dst: &mut DevBuf<T>) {
        assert_eq!(src.len(), dst.len());
        if src.is_empty() {
            return;
        }
        self.forbid_in_capture("a host-to-device copy");
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .memcpy_htod(src, dst.gpu_mut())
                .unwrap_or_else(|e| panic!("CUDA upload: {e:?}")),
            Exec::Emu(_) => dst.host_mut().slice_mut().copy_from_slice(src),
        }
    }
}

impl Backend for Cuda {
    type Buf = Buf;
    type OptState = CudaOptState;
    type StepGraph = CudaStepGraph;

    fn describe(&self) -> String {
        let p = match self.precision {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32 convolutions and linear layers, f32 elsewhere",
        };
        let off = self.fast.off();
        let off = if off.is_empty() {
            String::new()
        } else {
            format!("; fast paths off: {}", off.join(", "))
        };
        format!("cuda ({}, {}, {p}{off})", self.name, self.arch)
    }
    fn alloc(&self, len: usize) -> Buf {
        self.alloc_any(len, true)
    }
    fn len(&self, buf: &Buf) -> usize {
        buf.len()
    }
    fn upload_f64(&self, src: &[f64], dst: &mut Buf) {
        let v: Vec<f32> = src.iter().map(|&x| x as f32).collect();
        self.upload_f32(&v, dst);
    }
    fn upload_f32(&self, src: &[f32], dst: &mut Buf) {
        self.upload_any(src, dst);
    }
    fn download(&self, src: &Buf) -> Vec<f64> {
        self.download_f32(src)
            .into_iter()
            .map(|v| v as f64)
            .collect()
    }
    fn download_f32(&self, src: &Buf) -> Vec<f32> {
        if src.is_empty() {
            return Vec::new();
        }
        self.read(src)
    }
    fn fill_zero(&self, buf: &mut Buf) {
        if buf.is_empty() {
            return;
        }
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .memset_zeros(buf.gpu_mut())
                .unwrap_or_else(|e| panic!("CUDA memset: {e:?}")),
            Exec::Emu(_) => {
                let zero = graph::EmuOp::Zero {
                    dst: buf.host().addr,
                    bytes: 4 * buf.len(),
                };
                if !self.emu_record(|| zero) {
                    buf.host_mut().slice_mut().fill(0.0)
                }
            }
        }
    }
    fn copy(&self, src: &Buf, dst: &mut Buf) {
        assert_eq!(src.len(), dst.len());
        if src.is_empty() {
            return;
        }
        match &self.exec {
            Exec::Gpu(g) => g
                .stream
                .memcpy_dtod(src.gpu(), dst.gpu_mut())
                .unwrap_or_else(|e| panic!("CUDA copy: {e:?}")),
            Exec::Emu(_) => {
                let op = || graph::EmuOp::Copy {
                    src: src.host().addr,
                    dst: dst.host().addr,
                    bytes: 4 * src.len(),
                };
                if !self.emu_record(op) {
                    dst.host_mut()
                        .slice_mut()
                        .copy_from_slice(src.host().slice())
                }
            }
        }
    }
    fn add_assign(&self, y: &mut Buf, x: &Buf) {
        assert_eq!(y.len(), x.len());
        let n = y.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        launch!(self, "add_assign_f32", per_elem(n); &ni, y, x);
    }
    fn scale(&self, x: &mut Buf, a: f64) {
        let n = x.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        let af = a as f32;
        launch!(self, "scale_f32", per_elem(n); &ni, &af, x);
    }
    fn sum_squares(&self, x: &Buf) -> f64 {
        self.reduce_squares(x, None)
    }
    fn rel_change(&self, new: &Buf, old: &Buf) -> f64 {
        let num = self.reduce_squares(new, Some(old));
        (num / self.sum_squares(old).max(1e-300)).sqrt()
    }
    fn fill_normal(&self, rng: Philox, stream: u32, step: u32, buf: &mut Buf) {
        let n = buf.len();
        if n == 0 {
            return;
        }
        let ni = i(n);
        let (lo, hi) = (rng.seed as u32, (rng.seed >> 32) as u32);
        self.set_step_counter(step);
        let sv = self.step_vals();
        launch!(self, "fill_normal_f32", per_elem(n); &ni, &lo, &hi, &stream, &sv.buf, buf);
    }

    fn conv2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        relu: bool,
        y: &mut Buf,
    ) {
        self.conv_fwd_common(false, g, batch, x, w, b, relu, y, false);
    }
    fn conv2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
    ) {
        self.conv_bwd_common(false, g, batch, x, w, y, relu, dy, dx, false, dw, db, false);
    }
    fn conv_t2d_fwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        relu: bool,
        y: &mut Buf,
    ) {
        self.conv_fwd_common(true, g, batch, x, w, b, relu, y, false);
    }
    fn conv_t2d_bwd(
        &self,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
    ) {
        self.conv_bwd_common(true, g, batch, x, w, y, relu, dy, dx, false, dw, db, false);
    }
    fn conv_bwd_set_dx(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: &mut Buf,
        dw: &mut Buf,
        db: &mut Buf,
    ) {
        self.conv_bwd_common(
            transposed,
            g,
            batch,
            x,
            w,
            y,
            relu,
            dy,
            Some(dx),
            true,
            dw,
            db,
            false,
        );
    }
    fn linear_fwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Buf,
        w: &Buf,
        b: Option<&Buf>,
        relu: bool,
        y: &mut Buf,
    ) {
        assert_eq!(x.len(), rows * n_in);
        assert_eq!(w.len(), n_out * n_in);
        assert_eq!(y.len(), rows * n_out);
        if let Some(b) = b {
            assert_eq!(b.len(), n_out);
        }
        if rows == 0 || n_out == 0 {
            return;
        }
        if self.precision == Precision::Tf32 {
            // A linear layer is a 1×1 convolution over `rows` one-pixel images.
            let g = ConvGeom::same(1, 1, n_in, n_out, 1);
            check_conv_range(&g, rows);
            return self.conv_tc_fwd(false, &g, rows, x, w, b, relu, y, false);
        }
        let (ri, ii, oi) = (i(rows), i(n_in), i(n_out));
        let has_bias = b.is_some() as i32;
        let relu_i = relu as i32;
        // Without a bias the kernel never reads `b`; any valid pointer will do.
        let bias = b.unwrap_or(w);
        launch!(self, "linear_fwd_f32", tiles(rows, n_out, 1);
            &ri, &ii, &oi, x, w, bias, &has_bias, &relu_i, y);
    }
    fn linear_bwd(
        &self,
        rows: usize,
        n_in: usize,
        n_out: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: Option<&mut Buf>,
    ) {
        assert_eq!(x.len(), rows * n_in);
        assert_eq!(w.len(), n_out * n_in);
        assert_eq!(y.len(), rows * n_out);
        assert_eq!(dy.len(), rows * n_out);
        assert_eq!(dw.len(), n_out * n_in);
        if rows == 0 || n_out == 0 || n_in == 0 {
            return;
        }
        if self.precision == Precision::Tf32 {
            let g = ConvGeom::same(1, 1, n_in, n_out, 1);
            check_conv_range(&g, rows);
            if let Some(dx) = dx {
                assert_eq!(dx.len(), rows * n_in);
                self.conv_tc_dx(false, &g, rows, w, y, relu, dy, dx, false, false);
            }
            self.conv_tc_dw(false, &g, rows, x, y, relu, dy, dw, db);
            return;
        }
        let (ri, ii, oi) = (i(rows), i(n_in), i(n_out));
        // g = dy with the ReLU derivative applied.
        let masked;
        let g: &Buf = if relu {
            let n = rows * n_out;
            let ni = i(n);
            let mut m = self.scratch::<f32>(n);
            launch!(self, "relu_mask_f32", per_elem(n); &ni, dy, y, &mut m);
            masked = m;
            &masked
        } else {
            dy
        };
        if let Some(dx) = dx {
            assert_eq!(dx.len(), rows * n_in);
            launch!(self, "linear_bwd_dx_f32", tiles(rows, n_in, 1); &ri, &ii, &oi, g, w, dx);
        }
        // dW: partial products over fixed row chunks (grid.z ≤ 65535), summed in chunk order.
        let chunk = DW_ROW_CHUNK.max(rows.div_ceil(65_535));
        let nch = rows.div_ceil(chunk);
        let wl = n_out * n_in;
        let mut partial = self.scratch::<f32>(nch * wl);
        let chunk_i = i(chunk);
        launch!(self, "linear_bwd_dw_partial_f32", tiles(n_in, n_out, nch);
            &ri, &ii, &oi, &chunk_i, g, x, &mut partial);
        let (nch_i, wl_i) = (i(nch), i(wl));
        launch!(self, "sum_partials_f32", rs_grid(wl); &nch_i, &wl_i, &partial, dw);
        if let Some(db) = db {
            assert_eq!(db.len(), n_out);
            self.col_sums(rows, n_out, g, false, g, db);
        }
    }
    fn layernorm_fwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        y: &mut Buf,
        mean: &mut Buf,
        rstd: &mut Buf,
    ) {
        assert_eq!(x.len(), rows * dim);
        assert_eq!(y.len(), rows * dim);
        assert_eq!(gamma.len(), dim);
        assert_eq!(beta.len(), dim);
        assert_eq!(mean.len(), rows);
        assert_eq!(rstd.len(), rows);
        if rows == 0 {
            return;
        }
        let (ri, di) = (i(rows), i(dim));
        let eps = LN_EPS as f32;
        launch!(self, "layernorm_fwd_f32", per_warp(rows);
            &ri, &di, x, gamma, beta, &eps, y, mean, rstd);
    }
    fn layernorm_bwd(
        &self,
        rows: usize,
        dim: usize,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        rstd: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
    ) {
        assert_eq!(x.len(), rows * dim);
        assert_eq!(dy.len(), rows * dim);
        assert_eq!(dx.len(), rows * dim);
        assert_eq!(dgamma.len(), dim);
        assert_eq!(dbeta.len(), dim);
        if rows == 0 || dim == 0 {
            return;
        }
        let (ri, di) = (i(rows), i(dim));
        launch!(self, "layernorm_bwd_dx_f32", per_warp(rows);
            &ri, &di, x, gamma, mean, rstd, dy, dx);
        let (nblk, chunk) = col_chunks(rows);
        let mut pg = self.scratch::<f32>(nblk * dim);
        let mut pb = self.scratch::<f32>(nblk * dim);
        let chi = i(chunk);
        launch!(self, "layernorm_params_partial_f32", per_block(nblk, 0);
            &ri, &di, &chi, x, mean, rstd, dy, &mut pg, &mut pb);
        let nb = i(nblk);
        launch!(self, "sum_partials_f32", rs_grid(dim); &nb, &di, &pg, dgamma);
        launch!(self, "sum_partials_f32", rs_grid(dim); &nb, &di, &pb, dbeta);
    }
    fn tokens_fwd(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Buf>,
        enc_out: &Buf,
        acts: &mut TokenActs<Buf>,
    ) {
        if self.fast.tokens && Self::tokens_fusable(dims, p) {
            self.tokens_fwd_fused(dims, p, enc_out, acts)
        } else {
            tokens_fwd_by_ops(self, dims, p, enc_out, acts)
        }
    }
    fn tokens_bwd(
        &self,
        dims: &TokenDims,
        p: &TokenParams<'_, Buf>,
        acts: &TokenActs<Buf>,
        up: TokenOutGrads<'_, Buf>,
        d: &mut TokenGradActs<Buf>,
        g: &mut TokenGrads<'_, Buf>,
    ) {
        if self.fast.tokens && Self::tokens_fusable(dims, p) {
            self.tokens_bwd_fused(dims, p, acts, up, d, g)
        } else {
            tokens_bwd_by_ops(self, dims, p, acts, up, d, g)
        }
    }
    fn folds_kv(&self) -> bool {
        self.fast.kv_fold
    }
    fn matmul_small(
        &self,
        m: usize,
        n: usize,
        kd: usize,
        a: &Buf,
        a_t: bool,
        b: &Buf,
        b_t: bool,
        c: &mut Buf,
        accumulate: bool,
    ) {
        assert_eq!(a.len(), m * kd);
        assert_eq!(b.len(), kd * n);
        assert_eq!(c.len(), m * n);
        if m * n == 0 {
            return;
        }
        let (mi, ni, ki) = (i(m), i(n), i(kd));
        let (at, bt, acc) = (i32::from(a_t), i32::from(b_t), i32::from(accumulate));
        launch!(self, "matmul_small_f32", per_elem(m * n);
            &mi, &ni, &ki, a, &at, b, &bt, c, &acc);
    }
    fn bcast_conv_splits(&self, dims: &BcastConvDims) -> bool {
        self.fast.bcast_split && dims.splits()
    }
    fn bcast_conv_fwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Buf>,
        z: &Buf,
        x: &mut Buf,
        y: &mut Buf,
    ) {
        if self.bcast_conv_splits(dims) {
            self.bcast_conv_fwd_split(dims, p, z, y)
        } else {
            bcast_conv_fwd_by_ops(self, dims, p, z, x, y)
        }
    }
    fn bcast_conv_bwd(
        &self,
        dims: &BcastConvDims,
        p: &BcastConvParams<'_, Buf>,
        z: &Buf,
        x: &Buf,
        y: &Buf,
        dy: &Buf,
        dx: &mut Buf,
        dz: &mut Buf,
        g: BcastConvGrads<'_, Buf>,
    ) {
        if self.bcast_conv_splits(dims) {
            self.bcast_conv_bwd_split(dims, p, z, y, dy, dz, g)
        } else {
            bcast_conv_bwd_by_ops(self, dims, p, z, x, y, dy, dx, dz, g)
        }
    }
    fn slot_query_fwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Buf>,
        slots: &Buf,
        o: SlotQueryOut<'_, Buf>,
    ) {
        if self.fast.slot_cell && Self::slot_cell_fusable(dims) {
            self.slot_query_fwd_fused(dims, p, slots, o)
        } else {
            slot_query_fwd_by_ops(self, dims, p, slots, o)
        }
    }
    fn slot_update_fwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Buf>,
        upd: &Buf,
        slots: &Buf,
        dropout: Option<&DropoutMask>,
        o: SlotUpdateOut<'_, Buf>,
    ) {
        if self.fast.slot_cell && Self::slot_cell_fusable(dims) {
            self.slot_update_fwd_fused(dims, p, upd, slots, dropout, o)
        } else {
            slot_update_fwd_by_ops(self, dims, p, upd, slots, dropout, o)
        }
    }
    fn slot_update_bwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotUpdateParams<'_, Buf>,
        t: &SlotUpdateTape<'_, Buf>,
        dropout: Option<&DropoutMask>,
        d_out: &Buf,
        s: SlotUpdateScratch<'_, Buf>,
        d_upd: &mut Buf,
        d_in: &mut Buf,
        g: SlotUpdateGrads<'_, Buf>,
    ) {
        if self.fast.slot_cell && Self::slot_cell_fusable(dims) {
            self.slot_update_bwd_fused(dims, p, t, dropout, d_out, s, d_upd, d_in, g)
        } else {
            slot_update_bwd_by_ops(self, dims, p, t, dropout, d_out, s, d_upd, d_in, g)
        }
    }
    fn slot_query_bwd(
        &self,
        dims: &SlotCellDims,
        p: &SlotQueryParams<'_, Buf>,
        t: &SlotQueryTape<'_, Buf>,
        dq: &Buf,
        dln: &mut Buf,
        d_in: &mut Buf,
        g: SlotQueryGrads<'_, Buf>,
    ) {
        if self.fast.slot_cell && Self::slot_cell_fusable(dims) {
            self.slot_query_bwd_fused(dims, p, t, dq, dln, d_in, g)
        } else {
            slot_query_bwd_by_ops(self, dims, p, t, dq, dln, d_in, g)
        }
    }
    fn softpos_add_fwd(&self, h: usize, w: usize, c: usize, wp: &Buf, bp: &Buf, x: &mut Buf) {
        assert_eq!(x.len() % (h * w * c), 0);
        assert_eq!(wp.len(), c * 4);
        assert_eq!(bp.len(), c);
        let n = x.len();
        if n == 0 {
            return;
        }
        let (ni, hi, wi, ci) = (i(n), i(h), i(w), i(c));
        launch!(self, "softpos_add_fwd_f32", per_elem(n); &ni, &hi, &wi, &ci, wp, bp, x);
    }
    fn softpos_add_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Buf,
        dwp: &mut Buf,
        dbp: &mut Buf,
    ) {
        self.posembed_params_bwd(h, w, c, dy, dwp, dbp);
    }
    fn broadcast_pos_fwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        z: &Buf,
        wp: &Buf,
        bp: &Buf,
        y: &mut Buf,
    ) {
        assert_eq!(y.len() % (h * w * c), 0);
        assert_eq!(z.len(), y.len() / (h * w));
        assert_eq!(wp.len(), c * 4);
        assert_eq!(bp.len(), c);
        let n = y.len();
        if n == 0 {
            return;
        }
        let (ni, hi, wi, ci) = (i(n), i(h), i(w), i(c));
        launch!(self, "broadcast_pos_fwd_f32", per_elem(n); &ni, &hi, &wi, &ci, z, wp, bp, y);
    }
    fn broadcast_pos_bwd(
        &self,
        h: usize,
        w: usize,
        c: usize,
        dy: &Buf,
        dz: &mut Buf,
        dwp: &mut Buf,
        dbp: &mut Buf,
    ) {
        assert_eq!(dy.len() % (h * w * c), 0);
        let nimg = dy.len() / (h * w * c);
        assert_eq!(dz.len(), nimg * c);
        if nimg == 0 {
            return;
        }
        let (hwi, ci) = (i(h * w), i(c));
        launch!(self, "broadcast_pos_bwd_dz_f32", per_block(nimg, 0); &hwi, &ci, dy, dz);
        self.posembed_params_bwd(h, w, c, dy, dwp, dbp);
    }
    fn attention_fwd(
        &self,
        dm: &AttnDims,
        k: &Buf,
        v: &Buf,
        q: &Buf,
        attn: &mut Buf,
        upd: &mut Buf,
    ) {
        self.attention_fwd_kernels(dm, k, v, q, attn, upd)
    }
    fn attention_bwd(
        &self,
        dm: &AttnDims,
        k: &Buf,
        v: &Buf,
        q: &Buf,
        attn: &Buf,
        dupd: &Buf,
        dk: &mut Buf,
        dv: &mut Buf,
        dq: &mut Buf,
    ) {
        self.attention_bwd_kernels(dm, k, v, q, attn, dupd, dk, Some(dv), dq)
    }
    fn attention_bwd_same_kv(
        &self,
        dm: &AttnDims,
        x: &Buf,
        q: &Buf,
        attn: &Buf,
        dupd: &Buf,
        dx: &mut Buf,
        dq: &mut Buf,
    ) {
        self.attention_bwd_kernels(dm, x, x, q, attn, dupd, dx, None, dq)
    }
    fn gru_gates_fwd(&self, d: usize, gi: &Buf, gh: &Buf, h: &Buf, h_new: &mut Buf) {
        let n = h_new.len();
        assert_eq!(h.len(), n);
        assert_eq!(gi.len(), 3 * n);
        assert_eq!(gh.len(), 3 * n);
        if n == 0 {
            return;
        }
        let (ni, di) = (i(n), i(d));
        launch!(self, "gru_gates_fwd_f32", per_elem(n); &ni, &di, gi, gh, h, h_new);
    }
    fn gru_gates_bwd(
        &self,
        d: usize,
        gi: &Buf,
        gh: &Buf,
        h: &Buf,
        dh_new: &Buf,
        dgi: &mut Buf,
        dgh: &mut Buf,
        dh: &mut Buf,
    ) {
        let n = dh_new.len();
        assert_eq!(h.len(), n);
        assert_eq!(dh.len(), n);
        assert_eq!(gi.len(), 3 * n);
        assert_eq!(dgi.len(), 3 * n);
        assert_eq!(dgh.len(), 3 * n);
        if n == 0 {
            return;
        }
        let (ni, di) = (i(n), i(d));
        launch!(self, "gru_gates_bwd_f32", per_elem(n);
            &ni, &di, gi, gh, h, dh_new, dgi, dgh, dh);
    }
    fn slot_init_fwd(&self, d: usize, mu: &Buf, log_sigma: &Buf, noise: &Buf, slots: &mut Buf) {
        let n = slots.len();
        assert_eq!(noise.len(), n);
        assert_eq!(mu.len(), d);
        assert_eq!(log_sigma.len(), d);
        if n == 0 {
            return;
        }
        let (ni, di) = (i(n), i(d));
        launch!(self, "slot_init_fwd_f32", per_elem(n); &ni, &di, mu, log_sigma, noise, slots);
    }
    fn slot_init_bwd(
        &self,
        d: usize,
        log_sigma: &Buf,
        noise: &Buf,
        dslots: &Buf,
        dmu: &mut Buf,
        dlog_sigma: &mut Buf,
    ) {
        assert_eq!(dslots.len() % d, 0);
        assert_eq!(noise.len(), dslots.len());
        assert_eq!(dmu.len(), d);
        assert_eq!(dlog_sigma.len(), d);
        if d == 0 {
            return;
        }
        let (ri, di) = (i(dslots.len() / d), i(d));
        launch!(self, "slot_init_bwd_f32", per_elem(d);
            &ri, &di, log_sigma, noise, dslots, dmu, dlog_sigma);
    }
    fn dropout_fwd(&self, mask: &DropoutMask, x: &mut Buf) {
        self.dropout(mask, x);
    }
    fn dropout_bwd(&self, mask: &DropoutMask, dx: &mut Buf) {
        self.dropout(mask, dx);
    }
    fn composite_mse_fwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Buf,
        target: &Buf,
        masks: &mut Buf,
        recon: &mut Buf,
        loss: &mut Buf,
    ) {
        assert_eq!(dec.len(), batch * k * p * 4);
        assert_eq!(target.len(), batch * p * 3);
        assert_eq!(masks.len(), batch * k * p);
        assert_eq!(recon.len(), batch * p * 3);
        assert_eq!(loss.len(), 1);
        let n = batch * p;
        // The forward's blocks' sums of squared errors, then one block adds them up.
        let cfg = per_elem(n);
        let parts = cfg.grid_dim.0 as usize;
        let mut sse_part = self.scratch::<f32>(parts.max(1));
        let (bi, ki, pi, parts_i) = (i(batch), i(k), i(p), i(parts));
        if n > 0 {
            launch!(self, "composite_fwd_f32", cfg;
                &bi, &ki, &pi, dec, target, masks, recon, &mut sse_part);
        }
        // As on the CPU: a float sum divided by the f32 count (NaN for an empty batch).
        let count = (n * 3) as f64 as f32;
        let one_block = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (COMPOSITE_LOSS_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        launch!(self, "composite_loss_f32", one_block; &parts_i, &count, &sse_part, loss);
    }
    fn composite_mse_bwd(
        &self,
        batch: usize,
        k: usize,
        p: usize,
        dec: &Buf,
        target: &Buf,
        masks: &Buf,
        recon: &Buf,
        dloss: f64,
        ddec: &mut Buf,
    ) {
        assert_eq!(dec.len(), batch * k * p * 4);
        assert_eq!(ddec.len(), batch * k * p * 4);
        assert_eq!(target.len(), batch * p * 3);
        assert_eq!(masks.len(), batch * k * p);
        assert_eq!(recon.len(), batch * p * 3);
        let n = batch * p;
        if n == 0 {
            return;
        }
        // The CPU's T::from(dloss) · T::from(2 / count), both rounded to f32 first.
        let scale = (dloss as f32) * ((2.0 / (n * 3) as f64) as f32);
        let (bi, ki, pi) = (i(batch), i(k), i(p));
        launch!(self, "composite_bwd_f32", per_elem(n);
            &bi, &ki, &pi, dec, target, masks, recon, &scale, ddec);
    }
    fn adam_step(&self, s: &AdamStep, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf) {
        self.adam_step_one(s, param, grad, m, v)
    }
    /// Device memory in use (total − free, bytes, all processes), or None in the emulator.
    fn device_memory_used(&self) -> Option<u64> {
        match &self.exec {
            Exec::Gpu(g) => {
                g.ctx.bind_to_thread().ok()?;
                let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
                Some((total - free) as u64)
            }
            Exec::Emu(_) => None,
        }
    }
    fn memory_available(&self) -> Option<(u64, &'static str)> {
        match &self.exec {
            Exec::Gpu(g) => g
                .ctx
                .mem_get_info()
                .ok()
                .map(|(free, _)| (free as u64, "GPU")),
            Exec::Emu(_) => None,
        }
    }

    fn opt_state(&self, grad_lens: &[usize], start: &OptReport) -> CudaOptState {
        self.opt_state_alloc(grad_lens, start)
    }
    fn opt_step(
        &self,
        h: &OptHyper,
        loss: &Buf,
        params: &mut [Buf],
        grads: &[Buf],
        m: &mut [Buf],
        v: &mut [Buf],
        st: &mut CudaOptState,
    ) {
        self.opt_step_launch(h, loss, params, grads, m, v, st)
    }
    fn opt_report(&self, st: &CudaOptState) -> OptReport {
        self.opt_report_read(st)
    }
    fn begin_step(&self, h: &OptHyper) {
        self.set_step_vals(Self::step_vals_for(h));
    }
    fn can_capture(&self) -> bool {
        true
    }
    fn capture_begin(&self) -> Result<(), String> {
        Cuda::capture_begin(self)
    }
    fn capture_end(&self) -> Result<CudaStepGraph, String> {
        Cuda::capture_end(self)
    }
    fn replay(&self, graph: &CudaStepGraph) -> Result<(), String> {
        Cuda::replay(self, graph)
    }
    fn profile_kernels(&self, on: bool) -> bool {
        Cuda::profile_kernels(self, on);
        true
    }
    fn kernel_profile(&self) -> Result<KernelProfile, String> {
        Cuda::kernel_profile(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_guards_show_writes_outside_a_buffer() {
        let mut h = HostMem::<f32>::new(10, true);
        assert_eq!(h.guard_damage(), None);
        assert!(h.data[GUARD - 1].is_nan() && h.data[GUARD + 10].is_nan());
        // What a kernel's arithmetic would write: a quiet NaN, not the poison itself.
        h.data[GUARD + 10] += 1.0;
        assert_eq!(h.guard_damage(), Some(10));
        let mut h = HostMem::<f64>::new(3, false);
        assert!(h.slice().iter().all(|v| v.is_nan()));
        h.data[GUARD - 2] = 0.0;
        assert_eq!(h.guard_damage(), Some(-2));
    }

    #[test]
    fn no_driver_is_an_error_not_a_panic() {
        if driver_available() {
            return;
        }
        assert!(Cuda::new(0).is_err());
        assert_eq!(device_count(), 0);
    }
}
