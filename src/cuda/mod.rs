//! The CUDA backend: hand-written kernels (`kernels/*.cu`) for every op of the model. With
//! `precision: f32` the convolutions and linear layers use exact-f32 kernels (version 1, the
//! parity reference); with `tf32` they run as implicit GEMMs on the tensor cores
//! (`kernels/conv_tc.cu`: version 3 for channel counts that are multiples of 16, version 2
//! otherwise). `benches/NOTES.md` has each kernel's floor, predictions and version log.
//!
//! Everything runs in order on one stream (a stream of its own: the legacy default stream cannot
//! be captured into a CUDA graph, see [`graph`]). The kernels are
//! compiled with NVRTC for the device's own architecture, in parallel, and the PTX is kept on
//! disk for the next process ([`kcache`]); they include no headers, so the GPU machine needs
//! only the driver (`libcuda.so.1`) and `libnvrtc.so.13`.
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

pub mod emu;
pub mod fastpaths;
mod graph;
pub mod kcache;
pub mod kernels;

pub use fastpaths::FastPaths;
pub use graph::CudaStepGraph;
pub use kcache::KernelCache;

use crate::backend::{AdamStep, Backend};
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
    TokenParams,
};
use crate::optim::{OptHyper, OptReport};
use crate::rng::Philox;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchArgs, LaunchConfig,
    PushKernelArg,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
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
    AttnDimsC,
    ConvGemmC,
    ConvDwGemmC,
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

/// Whether both the CUDA driver library and libnvrtc can be loaded. Never panics.
pub fn driver_available() -> bool {
    catch_unwind(|| unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present()
    })
    .unwrap_or(false)
}

/// Whether libnvrtc can be loaded (enough to compile kernels; no driver or GPU needed).
pub fn nvrtc_available() -> bool {
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices (0 when there is no driver, no device, or anything fails).
pub fn device_count() -> usize {
    if !driver_available() {
        return 0;
    }
    match catch_unwind(CudaContext::device_count) {
        Ok(Ok(n)) if n > 0 => n as usize,
        _ => 0,
    }
}

/// Compile one kernel file with NVRTC for `arch` (e.g. "sm_90"). The error names the file and
/// carries the compiler log.
pub fn compile_file(file: &KernelFile, arch: &'static str) -> Result<Ptx, String> {
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(file.name.to_string()),
        ..Default::default()
    };
    compile_ptx_with_opts(file.full_source(), opts).map_err(|e| match e {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
        } => format!(
            "NVRTC could not compile kernels/{} for {arch}: {nvrtc:?} (options {options:?})\n{}",
            file.name,
            log.to_string_lossy()
        ),
        other => format!(
            "NVRTC failed on kernels/{} for {arch}: {other:?}",
            file.name
        ),
    })
}

/// What ptxas reports for one kernel compiled to machine code.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelResources {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    /// Per-thread local memory (arrays indexed at run time live there, spills too).
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// The kernels of a `ptxas -v` log: per kernel "Compiling entry function 'NAME' for 'sm_90'",
/// then "N bytes stack frame, S bytes spill stores, L bytes spill loads", then "Used R
/// registers, used 1 barriers, B bytes smem".
fn parse_ptxas_log(log: &str) -> Vec<KernelResources> {
    // The number in the comma-separated part of `line` that names `what`.
    let number_of = |line: &str, what: &str| -> u32 {
        line.split(',')
            .filter(|part| part.contains(what))
            .find_map(|part| part.split_whitespace().find_map(|t| t.parse().ok()))
            .unwrap_or(0)
    };
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            out.push(KernelResources {
                name: rest.split('\'').next().unwrap_or("").to_string(),
                registers: 0,
                shared_bytes: 0,
                stack_bytes: 0,
                spill_store_bytes: 0,
                spill_load_bytes: 0,
            });
        } else if let Some(k) = out.last_mut() {
            if line.contains("spill stores") {
                k.stack_bytes = number_of(line, "stack frame");
                k.spill_store_bytes = number_of(line, "spill stores");
                k.spill_load_bytes = number_of(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                k.registers = number_of(line, "registers");
                k.shared_bytes = number_of(line, "smem");
            }
        }
    }
    out
}

/// Compile `file` to machine code for `arch` (e.g. "sm_90"; no GPU needed) with `ptxas -v` and
/// read each kernel's registers, static shared memory and spills from the log: what decides
/// how many blocks fit on an SM, known before any GPU runs.
pub fn kernel_resources(file: &KernelFile, arch: &str) -> Result<Vec<KernelResources>, String> {
    use cudarc::nvrtc::result;
    let src = std::ffi::CString::new(file.full_source()).map_err(|e| e.to_string())?;
    let name = std::ffi::CString::new(file.name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| format!("{e:?}"))?;
    let opts = [
        format!("--gpu-architecture={arch}"),
        "--ptxas-options=-v".into(),
    ];
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }.map_err(|e| format!("{e:?}"))?;
    let _ = unsafe { result::destroy_program(prog) };
    let log = unsafe { std::ffi::CStr::from_ptr(log.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    compiled.map_err(|e| {
        format!(
            "NVRTC could not compile kernels/{} for {arch}: {e:?}\n{log}",
            file.name
        )
    })?;
    let out = parse_ptxas_log(&log);
    if out.is_empty() {
        return Err(format!(
            "no ptxas report for kernels/{} in the NVRTC log:\n{log}",
            file.name
        ));
    }
    Ok(out)
}

/// Compile every kernel file for `arch` without any GPU (only libnvrtc is needed); returns the
/// number of files compiled.
pub fn compile_all_for(arch: &'static str) -> Result<usize, String> {
    if !nvrtc_available() {
        return Err(
            "libnvrtc cannot be loaded (install nvidia-cuda-nvrtc and put its lib folder on \
             LD_LIBRARY_PATH)"
                .into(),
        );
    }
    for f in KERNEL_FILES {
        compile_file(f, arch)?;
    }
    Ok(KERNEL_FILES.len())
}

/// `ConvGeom` as the kernels see it (struct ConvGeom in conv.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvGeomC {
    h_in: i32,
    w_in: i32,
    c_in: i32,
    h_out: i32,
    w_out: i32,
    c_out: i32,
    k: i32,
    stride: i32,
    pad: i32,
}
unsafe impl DeviceRepr for ConvGeomC {}

impl ConvGeomC {
    fn new(g: &ConvGeom) -> Self {
        Self {
            h_in: i(g.h_in),
            w_in: i(g.w_in),
            c_in: i(g.c_in),
            h_out: i(g.h_out),
            w_out: i(g.w_out),
            c_out: i(g.c_out),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
        }
    }
}

/// The activation-pass GEMM of the tensor-core convolutions (struct ConvGemm in conv_tc.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvGemmC {
    batch: i32,
    hp: i32,
    wp: i32,
    hs: i32,
    ws: i32,
    cs: i32,
    n: i32,
    k: i32,
    stride: i32,
    pad: i32,
    w_nc: i32,
}
unsafe impl DeviceRepr for ConvGemmC {}

/// The weight-gradient GEMM of the tensor-core convolutions (struct ConvDwGemm in conv_tc.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConvDwGemmC {
    rows: i32,
    batch: i32,
    hp: i32,
    wp: i32,
    hs: i32,
    ws: i32,
    cs: i32,
    k: i32,
    stride: i32,
    pad: i32,
    chunk: i32,
}
unsafe impl DeviceRepr for ConvDwGemmC {}

/// Output tile side and threads per block of the tensor-core kernels (TC_BM = TC_BN, TC_THREADS).
const TC_TILE: usize = 64;
const TC_THREADS: u32 = 128;
/// Blocks the split weight-gradient GEMM aims for: two per SM of an H100 (132 SMs).
const TC_DW_TARGET_BLOCKS: usize = 264;

/// `AttnDims` as the kernels see it (struct AttnDims in attention.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AttnDimsC {
    batch: i32,
    n: i32,
    k: i32,
    d: i32,
    heads: i32,
    scale: f32,
    eps: f32,
}
unsafe impl DeviceRepr for AttnDimsC {}

/// A size as the kernels' `int` (all index arithmetic is 32-bit; larger buffers are refused).
fn i(n: usize) -> i32 {
    i32::try_from(n).unwrap_or_else(|_| {
        panic!("CUDA backend v1: size {n} exceeds the 32-bit index range of its kernels")
    })
}

/// The conv kernels compute flat indices over the whole batch in 32-bit ints: refuse sizes past
/// that range instead of letting them overflow.
fn check_conv_range(g: &ConvGeom, batch: usize) {
    i(batch * g.in_len());
    i(batch * g.out_len());
}

/// Blocks and rows per block of the column-sum kernels over `m` rows (`*_partial_f32`): at most
/// about COL_SUM_BLOCKS blocks of at least 64 rows, from the sizes alone (the same summation
/// order on every device).
fn col_chunks(m: usize) -> (usize, usize) {
    let chunk = m.div_ceil(COL_SUM_BLOCKS).max(64).next_multiple_of(8);
    (m.div_ceil(chunk).max(1), chunk)
}

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

/// The taps (bit ky·k + kx) whose direct gathers of a transposed convolution's output, over its
/// input grid, reach every output position exactly once: one tap per output phase q mod s in
/// each axis (tap ky reaches q = s·p − pad + ky for p in [0, n_in)). The column sums of those
/// taps in the dW GEMM add up to the bias gradient. None when a phase has no such tap, or the
/// taps do not fit a 32-bit mask.
fn convt_covering_taps(g: &ConvGeom) -> Option<u32> {
    if g.k * g.k > 32 {
        return None;
    }
    let (s, pad) = (g.stride as isize, g.pad as isize);
    // For each output phase with outputs: the tap that covers all of them.
    let axis = |n_in: usize, n_out: usize| -> Option<Vec<usize>> {
        let (n_in, n_out) = (n_in as isize, n_out as isize);
        (0..s.min(n_out))
            .map(|phase| {
                let last = phase + (n_out - 1 - phase) / s * s;
                (0..g.k).find(|&ky| {
                    let off = phase + pad - ky as isize;
                    off >= 0 && off % s == 0 && (last + pad - ky as isize) / s < n_in
                })
            })
            .collect()
    };
    let (ys, xs) = (axis(g.h_in, g.h_out)?, axis(g.w_in, g.w_out)?);
    Some(
        ys.iter()
            .flat_map(|&ky| xs.iter().map(move |&kx| 1u32 << (ky * g.k + kx)))
            .sum(),
    )
}

/// Threads per block of `conv_dw_partial_v3*_tf32` (DW3_THREADS in conv_tc.cu).
const DW3_THREADS: u32 = 256;

/// Threads per block of version 3 of the tensor-core activation passes (V3_THREADS in
/// conv_tc.cu).
const V3_THREADS: u32 = 256;

/// The kernel and grid of version 3 of an activation pass: 128 × 64 tiles, or 256 × 32 tiles
/// (`*_v3n32_*`) when there are at most 32 output channels. An adjoint gather with stride s > 1
/// has one z per output phase (oy mod s, ox mod s), each over at most ⌈hp/s⌉·⌈wp/s⌉ positions
/// per image.
fn v3_kernel(p: &ConvGemmC, adjoint: bool) -> (&'static str, LaunchConfig) {
    let (hp, wp, batch, n) = (p.hp as usize, p.wp as usize, p.batch as usize, p.n as usize);
    let s = if adjoint { p.stride as usize } else { 1 };
    let rows = batch * hp.div_ceil(s) * wp.div_ceil(s);
    let narrow = n <= 32;
    let (bm, bn) = if narrow { (256, 32) } else { (128, 64) };
    let name = match (adjoint, narrow) {
        (false, false) => "conv_igemm_direct_v3_tf32",
        (true, false) => "conv_igemm_adjoint_v3_tf32",
        (false, true) => "conv_igemm_direct_v3n32_tf32",
        (true, true) => "conv_igemm_adjoint_v3n32_tf32",
    };
    let cfg = LaunchConfig {
        grid_dim: (
            rows.div_ceil(bm) as u32,
            n.div_ceil(bn) as u32,
            (s * s) as u32,
        ),
        block_dim: (V3_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    (name, cfg)
}

/// Tensor-core tiles over an `m × n` output, `z` deep.
fn tc_grid(m: usize, n: usize, z: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            m.div_ceil(TC_TILE) as u32,
            n.div_ceil(TC_TILE) as u32,
            z as u32,
        ),
        block_dim: (TC_THREADS, 1, 1),
        shared_mem_bytes: 0,
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
        let cfg: LaunchConfig = $cfg;
        $cu.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &$cu.exec {
            $crate::cuda::Exec::Gpu(gpu) => {
                let mut b = gpu.stream.launch_builder(gpu.func($name));
                $( ($arg).push_gpu(&mut b); )*
                unsafe { b.launch(cfg) }
                    .unwrap_or_else(|e| panic!("CUDA launch of {} failed: {e:?}", $name));
            }
            $crate::cuda::Exec::Emu(emu) => {
                *$cu.emu_launched.lock().unwrap_or_else(|e| e.into_inner()).entry($name).or_insert(0) += 1;
                let mut args: Vec<*mut std::ffi::c_void> = vec![$( ($arg).emu_ptr() ),*];
                let recorded = $cu.emu_record(|| {
                    $crate::cuda::Cuda::emu_launch_op($name, cfg, &args, &[$( ($arg).emu_size() ),*])
                });
                if !recorded {
                    emu.launch($name, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, &mut args)
                        .unwrap_or_else(|e| panic!("emulated launch of {} failed: {e}", $name));
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

mod bcastconv;
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
    /// In the emulator: launches so far per kernel name (tests check which kernels ran).
    emu_launched: Mutex<std::collections::BTreeMap<&'static str, u64>>,
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
        // CompileOptions wants a &'static str; one short string per process is leaked.
        let arch: &'static str = Box::leak(format!("sm_{major}{minor}").into_boxed_str());
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
        for kcache::FilePtx {
            file: f,
            ptx,
            cached,
        } in files
        {
            let module = match ctx.load_module(ptx) {
                Ok(m) => m,
                // A cached entry the driver rejects (damaged, or from an incompatible setup that
                // hashed the same): compile it again.
                Err(_) if cached => ctx
                    .load_module(kcache::recompile(f, arch, &cache)?)
                    .map_err(|e| format!("loading kernels/{} ({arch}): {e:?}", f.name))?,
                Err(e) => return Err(format!("loading kernels/{} ({arch}): {e:?}", f.name)),
            };
            for &k in f.kernels {
                let func = module
                    .load_function(k)
                    .map_err(|e| format!("kernels/{}: function {k}: {e:?}", f.name))?;
                funcs.insert(k, func);
            }
        }
        Ok(Cuda::with_exec(
            Exec::Gpu(Gpu { ctx, stream, funcs }),
            name,
            arch,
        ))
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
            emu_launched: Default::default(),
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
    /// kernels) or `Tf32` (tensor cores, `kernels/conv_tc.cu`; a linear layer runs as a 1×1
    /// convolution). Everything else (attention, norms, gates, the loss, Adam) is f32 in both.
    pub fn with_precision(mut self, precision: Precision) -> Cuda {
        self.precision = precision;
        self
    }

    /// Which version of the tensor-core passes (`kernels/conv_tc.cu`: activations and weight
    /// gradients) runs where both apply: 3 (the default) or 2, for benchmarks that compare them.
    pub fn with_conv_tc_version(mut self, version: u8) -> Cuda {
        assert!(version == 2 || version == 3, "conv_tc versions are 2 and 3");
        self.fast.conv_v3 = version == 3;
        self.fast.dw_v3 = version == 3;
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
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        f();
        let err = |e| format!("CUDA event: {e:?}");
        let start = g.stream.record_event(Some(CU_EVENT_DEFAULT)).map_err(err)?;
        for _ in 0..reps.max(1) {
            f();
        }
        let end = g.stream.record_event(Some(CU_EVENT_DEFAULT)).map_err(err)?;
        let ms = start.elapsed_ms(&end).map_err(err)?;
        Ok(ms as f64 / reps.max(1) as f64)
    }

    /// The TF32 tensor-core throughput this device reaches with `mma.sync` (TFLOP/s), measured
    /// by `kernels/peak.cu`; Err in the emulator.
    pub fn measure_tf32_peak(&self) -> Result<f64, String> {
        let (blocks, threads, iters) = (132 * 16, 128usize, 4096i32);
        let mut out = self.scratch::<f32>(blocks * threads);
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let ms = self.time_ms(3, || {
            launch!(self, "mma_peak_tf32", cfg; &iters, &mut out);
        })?;
        let flops = (blocks * threads / 32) as f64 * iters as f64 * 8.0 * 2.0 * 16.0 * 8.0 * 8.0;
        let sums = self.read(&out);
        if sums.iter().any(|v| !v.is_finite()) {
            return Err("the TF32 peak probe produced a non-finite value".into());
        }
        Ok(flops / (ms * 1e-3) / 1e12)
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

    /// Forward of a convolution (`transposed`: of a transposed one): checks, then the
    /// tensor-core path under TF32 or the exact-f32 kernel.
    #[allow(clippy::too_many_arguments)]
    fn conv_fwd_common(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        relu: bool,
        y: &mut Buf,
    ) {
        assert_eq!(x.len(), batch * g.in_len());
        assert_eq!(y.len(), batch * g.out_len());
        assert_eq!(w.len(), g.weight_len());
        assert_eq!(b.len(), g.c_out);
        let n = batch * g.out_len();
        if n == 0 {
            return;
        }
        check_conv_range(g, batch);
        if self.precision == Precision::Tf32 {
            return self.conv_tc_fwd(transposed, g, batch, x, w, Some(b), relu, y);
        }
        let gc = ConvGeomC::new(g);
        let (bi, ri) = (i(batch), relu as i32);
        let name = if transposed {
            "conv_t2d_fwd_f32"
        } else {
            "conv2d_fwd_f32"
        };
        launch!(self, name, per_elem(n); &gc, &bi, x, w, b, &ri, y);
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_bwd_common(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: Option<&mut Buf>,
        dx_set: bool,
        dw: &mut Buf,
        db: &mut Buf,
    ) {
        assert_eq!(x.len(), batch * g.in_len());
        assert_eq!(y.len(), batch * g.out_len());
        assert_eq!(dy.len(), batch * g.out_len());
        assert_eq!(w.len(), g.weight_len());
        assert_eq!(dw.len(), g.weight_len());
        assert_eq!(db.len(), g.c_out);
        if batch == 0 {
            return;
        }
        check_conv_range(g, batch);
        if self.precision == Precision::Tf32 {
            if let Some(dx) = dx {
                assert_eq!(dx.len(), batch * g.in_len());
                self.conv_tc_dx(transposed, g, batch, w, y, relu, dy, dx, dx_set);
            }
            self.conv_tc_dw(transposed, g, batch, x, y, relu, dy, dw, Some(db));
            return;
        }
        let gc = ConvGeomC::new(g);
        let bi = i(batch);
        let ri = relu as i32;
        if let Some(dx) = dx {
            assert_eq!(dx.len(), batch * g.in_len());
            let n = batch * g.in_len();
            // (The exact-f32 dx kernels only accumulate.)
            if dx_set {
                self.fill_zero(dx);
            }
            if transposed {
                launch!(self, "conv_t2d_bwd_dx_f32", per_elem(n); &gc, &bi, w, y, dy, &ri, dx);
            } else {
                launch!(self, "conv2d_bwd_dx_f32", per_elem(n); &gc, &bi, w, y, dy, &ri, dx);
            }
        }
        let wl = g.weight_len();
        if transposed {
            launch!(self, "conv_t2d_bwd_dw_f32", per_block(wl, 0); &gc, &bi, x, y, dy, &ri, dw);
        } else {
            launch!(self, "conv2d_bwd_dw_f32", per_block(wl, 0); &gc, &bi, x, y, dy, &ri, dw);
        }
        self.conv_db(g, batch, y, relu, dy, db);
    }

    /// db += Σ over positions of dy (ReLU-masked by y).
    fn conv_db(&self, g: &ConvGeom, batch: usize, y: &Buf, relu: bool, dy: &Buf, db: &mut Buf) {
        self.col_sums(batch * g.h_out * g.w_out, g.c_out, y, relu, dy, db);
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
        launch!(self, "sum_partials_f32", per_elem(n); &nb, &ni, &partial, db);
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
        launch!(self, "sum_partials_f32", per_elem(c * 4); &nb, &c4, &pw, dwp);
        launch!(self, "sum_partials_f32", per_elem(c); &nb, &ci, &pb, dbp);
    }

    /// Forward pass of a convolution (`transposed` false) or transposed convolution on the
    /// tensor cores: y = relu?(b + conv(x, W)).
    #[allow(clippy::too_many_arguments)]
    fn conv_tc_fwd(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        w: &Buf,
        b: Option<&Buf>,
        relu: bool,
        y: &mut Buf,
    ) {
        // conv: direct gather of x, W[co][ci]; convT: adjoint gather of x, W[ci][co].
        let p = ConvGemmC {
            batch: i(batch),
            hp: i(g.h_out),
            wp: i(g.w_out),
            hs: i(g.h_in),
            ws: i(g.w_in),
            cs: i(g.c_in),
            n: i(g.c_out),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
            w_nc: !transposed as i32,
        };
        let cfg = tc_grid(batch * g.h_out * g.w_out, g.c_out, 1);
        // mode 0: y = relu?(acc + b); 2: y = relu?(acc) (no bias: the kernel never reads it).
        let (zero, ri, mode) = (0i32, relu as i32, if b.is_some() { 0i32 } else { 2 });
        let b = b.unwrap_or(w);
        if let Some(wt) = self.conv_tc_v3_weights(&p, w) {
            let wt = &*wt;
            let (name, cfg) = v3_kernel(&p, transposed);
            launch!(self, name, cfg; &p, x, x, &zero, wt, b, &ri, &mode, y);
        } else if transposed {
            launch!(self, "conv_igemm_adjoint_tf32", cfg; &p, x, x, &zero, w, b, &ri, &mode, y);
        } else {
            launch!(self, "conv_igemm_direct_tf32", cfg; &p, x, x, &zero, w, b, &ri, &mode, y);
        }
    }

    /// For version 3 of the tensor-core activation passes (a gathered source of `cs` channels,
    /// a multiple of 16): the weights as `[n][k·k·cs]` TF32 bit patterns (conv_w_nk_tf32), in a
    /// scratch buffer. None: version 2 applies.
    fn conv_tc_v3_weights(&self, p: &ConvGemmC, w: &Buf) -> Option<Scratch<'_, f32>> {
        if !self.fast.conv_v3 || p.cs % 16 != 0 {
            return None;
        }
        let total = p.n as usize * (p.k * p.k * p.cs) as usize;
        i(total);
        let mut wt = self.scratch::<f32>(total);
        launch!(self, "conv_w_nk_tf32", per_elem(total); &p.n, &p.cs, &p.k, &p.w_nc, w, &mut *wt);
        Some(wt)
    }

    /// dx += (or, with `dx_set`, dx =) the input gradient of a convolution or transposed
    /// convolution, on the tensor cores.
    #[allow(clippy::too_many_arguments)]
    fn conv_tc_dx(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        w: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dx: &mut Buf,
        dx_set: bool,
    ) {
        // conv: adjoint gather of g, W[co][ci] (W[c][n]); convT: direct gather of g, W[ci][co]
        // (W[n][c]). The GEMM's rows are the input positions, its columns the input channels.
        let p = ConvGemmC {
            batch: i(batch),
            hp: i(g.h_in),
            wp: i(g.w_in),
            hs: i(g.h_out),
            ws: i(g.w_out),
            cs: i(g.c_out),
            n: i(g.c_in),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
            w_nc: transposed as i32,
        };
        let cfg = tc_grid(batch * g.h_in * g.w_in, g.c_in, 1);
        // accumulate = 1: dx += the product; 2 with relu = 0: dx = the product. Neither reads
        // the bias: pass w.
        let (zero, ri) = (0i32, relu as i32);
        let mode = if dx_set { 2i32 } else { 1 };
        if let Some(wt) = self.conv_tc_v3_weights(&p, w) {
            let wt = &*wt;
            let (name, cfg) = v3_kernel(&p, !transposed);
            launch!(self, name, cfg; &p, dy, y, &ri, wt, w, &zero, &mode, dx);
        } else if transposed {
            launch!(self, "conv_igemm_direct_tf32", cfg; &p, dy, y, &ri, w, w, &zero, &mode, dx);
        } else {
            launch!(self, "conv_igemm_adjoint_tf32", cfg; &p, dy, y, &ri, w, w, &zero, &mode, dx);
        }
    }

    /// dW += the weight gradient of a convolution or transposed convolution, on the tensor
    /// cores: the reduction over positions is split into chunks summed in a fixed order.
    #[allow(clippy::too_many_arguments)]
    /// dW (and db when given) of a convolution on the tensor cores. With version 3 the bias
    /// gradient comes from the operand sums of the dW GEMM (see `dw3_operand_sums` in
    /// conv_tc.cu) where the geometry allows; otherwise from a column-sum pass over dy.
    fn conv_tc_dw(
        &self,
        transposed: bool,
        g: &ConvGeom,
        batch: usize,
        x: &Buf,
        y: &Buf,
        relu: bool,
        dy: &Buf,
        dw: &mut Buf,
        db: Option<&mut Buf>,
    ) {
        // conv: rows co, A = g over the output grid, B = direct gather of x.
        // convT: rows ci, A = x over the input grid, B = direct gather of g.
        let (rows, hp, wp, hs, ws, cs) = if transposed {
            (g.c_in, g.h_in, g.w_in, g.h_out, g.w_out, g.c_out)
        } else {
            (g.c_out, g.h_out, g.w_out, g.h_in, g.w_in, g.c_in)
        };
        let cols = g.k * g.k * cs;
        let npos = batch * hp * wp;
        // Version 3 tiles: 64 × 128, or 32 × 256 for at most 32 rows (conv_tc.cu, Dw3).
        let v3 = self.fast.dw_v3 && rows % 4 == 0 && cs % 4 == 0;
        let (row_tile, col_tile, v3_name) = match (v3, rows <= 32) {
            (false, _) => (TC_TILE, TC_TILE, ""),
            (true, false) => (64, 128, "conv_dw_partial_v3_tf32"),
            (true, true) => (32, 256, "conv_dw_partial_v3r32_tf32"),
        };
        let tiles = rows.div_ceil(row_tile) * cols.div_ceil(col_tile);
        let want = TC_DW_TARGET_BLOCKS
            .div_ceil(tiles)
            .clamp(1, npos.div_ceil(TC_TILE));
        let chunk = npos.div_ceil(want).next_multiple_of(16);
        let chunks = npos.div_ceil(chunk);
        let p = ConvDwGemmC {
            rows: i(rows),
            batch: i(batch),
            hp: i(hp),
            wp: i(wp),
            hs: i(hs),
            ws: i(ws),
            cs: i(cs),
            k: i(g.k),
            stride: i(g.stride),
            pad: i(g.pad),
            chunk: i(chunk),
        };
        i(chunks * rows * cols);
        let mut partial = self.scratch::<f32>(chunks * rows * cols);
        let cfg = if v3 {
            LaunchConfig {
                grid_dim: (
                    rows.div_ceil(row_tile) as u32,
                    cols.div_ceil(col_tile) as u32,
                    chunks as u32,
                ),
                block_dim: (DW3_THREADS, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            tc_grid(rows, cols, chunks)
        };
        let (zero, ri) = (0i32, relu as i32);
        // The bias gradient's taps: conv sums dy, the A rows (one "tap"); convT the B columns
        // of the taps that reach every output position exactly once.
        let db_taps = match (v3, &db, transposed) {
            (true, Some(_), false) => Some(1u32),
            (true, Some(_), true) => convt_covering_taps(g),
            _ => None,
        };
        let sums_len = if transposed { cols } else { rows };
        let mut sums = self.scratch::<f32>(if db_taps.is_some() {
            chunks * sums_len
        } else {
            1
        });
        // 0: no sums; 1: of the A rows (conv: dy); 2: of the B columns (convT: gathered dy).
        let sums_of: i32 = match (db_taps, transposed) {
            (None, _) => 0,
            (Some(_), false) => 1,
            (Some(_), true) => 2,
        };
        match (transposed, v3) {
            (true, true) => launch!(self, v3_name, cfg;
                &p, x, x, &zero, dy, y, &ri, &mut partial, &sums_of, &mut sums),
            (true, false) => launch!(self, "conv_dw_partial_tf32", cfg;
                &p, x, x, &zero, dy, y, &ri, &mut partial),
            (false, true) => launch!(self, v3_name, cfg;
                &p, dy, y, &ri, x, x, &zero, &mut partial, &sums_of, &mut sums),
            (false, false) => launch!(self, "conv_dw_partial_tf32", cfg;
                &p, dy, y, &ri, x, x, &zero, &mut partial),
        }
        let (ci, ri2, csi, ki) = (i(chunks), i(rows), i(cs), i(g.k));
        let sl = i(sums_len);
        match (db, db_taps) {
            (Some(db), Some(taps)) => {
                assert_eq!(db.len(), g.c_out);
                let oi = i(g.c_out);
                launch!(self, "conv_dw_reduce_f32", per_elem(rows * cols + g.c_out);
                    &ci, &ri2, &csi, &ki, &partial, dw, &sl, &oi, &taps, &*sums, db);
            }
            (db, _) => {
                // (No sums: no bias, or version 2, which sums the bias over dy on its own.)
                let (zero_u, mut none) = (0u32, self.scratch::<f32>(1));
                launch!(self, "conv_dw_reduce_f32", per_elem(rows * cols);
                    &ci, &ri2, &csi, &ki, &partial, dw, &sl, &zero, &zero_u, &*sums, &mut *none);
                if let Some(db) = db {
                    assert_eq!(db.len(), g.c_out);
                    self.conv_db(g, batch, y, relu, dy, db);
                }
            }
        }
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

/// Slots of the optimizer's control block (`CTRL_*` in optim.cu).
mod ctrl {
    pub const UPDATES: usize = 0;
    pub const SKIPPED: usize = 1;
    pub const FIRST_BAD_STEP: usize = 2;
    pub const FIRST_BAD_LOSS: usize = 3;
    pub const FIRST_BAD_NORM: usize = 4;
    pub const LAST_BAD_STEP: usize = 5;
    pub const LATCHED: usize = 6;
    pub const LAST_LOSS: usize = 7;
    pub const LAST_NORM: usize = 8;
    pub const LOSS_SUM: usize = 9;
    pub const LOSS_COUNT: usize = 10;
    pub const APPLY: usize = 11;
    pub const GRAD_SCALE: usize = 12;
    pub const BC1: usize = 13;
    pub const BC2: usize = 14;
    pub const LEN: usize = 16;
}

/// Elements per block of the multi-tensor kernels (MT_CHUNK in optim.cu).
const MT_CHUNK: usize = 4096;

/// The optimizer's bookkeeping on the device, all allocated once: the control block, one
/// partial sum of the gradient norm per block, and the multi-tensor tables (each tensor's
/// param, grad, m and v addresses and length; each block's tensor and first element).
pub struct CudaOptState {
    ctrl: DevBuf<f64>,
    partials: DevBuf<f64>,
    lens: Vec<usize>,
    tab: DevBuf<u64>,
    /// What `tab` holds, to upload it again only if a buffer moved.
    tab_host: Vec<u64>,
    map: DevBuf<u64>,
    blocks: usize,
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

    /// Adam on one tensor with the grad scale and bias corrections of `ctrl`.
    #[allow(clippy::too_many_arguments)]
    fn adam_ctrl(
        &self,
        lr: f64,
        b1: f64,
        b2: f64,
        eps: f64,
        weight_decay: f64,
        ctrl: &DevBuf<f64>,
        param: &mut Buf,
        grad: &Buf,
        m: &mut Buf,
        v: &mut Buf,
    ) {
        let n = param.len();
        assert_eq!(grad.len(), n);
        assert_eq!(m.len(), n);
        assert_eq!(v.len(), n);
        if n == 0 {
            return;
        }
        let ni = i(n);
        let decay = 1.0 - lr * weight_decay;
        launch!(self, "adam_f32", per_elem(n);
            &ni, param, grad, m, v, &lr, &b1, &b2, &eps, &decay, ctrl);
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
        self.conv_fwd_common(false, g, batch, x, w, b, relu, y);
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
        self.conv_bwd_common(false, g, batch, x, w, y, relu, dy, dx, false, dw, db);
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
        self.conv_fwd_common(true, g, batch, x, w, b, relu, y);
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
        self.conv_bwd_common(true, g, batch, x, w, y, relu, dy, dx, false, dw, db);
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
            return self.conv_tc_fwd(false, &g, rows, x, w, b, relu, y);
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
                self.conv_tc_dx(false, &g, rows, w, y, relu, dy, dx, false);
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
        launch!(self, "sum_partials_f32", per_elem(wl); &nch_i, &wl_i, &partial, dw);
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
        launch!(self, "sum_partials_f32", per_elem(dim); &nb, &di, &pg, dgamma);
        launch!(self, "sum_partials_f32", per_elem(dim); &nb, &di, &pb, dbeta);
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
        dk: &Buf,
        dv: &Buf,
        d: &mut TokenGradActs<Buf>,
        g: &mut TokenGrads<'_, Buf>,
    ) {
        if self.fast.tokens && Self::tokens_fusable(dims, p) {
            self.tokens_bwd_fused(dims, p, acts, dk, dv, d, g)
        } else {
            tokens_bwd_by_ops(self, dims, p, acts, dk, dv, d, g)
        }
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
        assert_eq!(dm.d % dm.heads, 0);
        assert_eq!(k.len(), dm.batch * dm.n * dm.d);
        assert_eq!(v.len(), dm.batch * dm.n * dm.d);
        assert_eq!(q.len(), dm.batch * dm.k * dm.d);
        assert_eq!(attn.len(), dm.attn_len());
        assert_eq!(upd.len(), dm.batch * dm.k * dm.d);
        if dm.batch * dm.heads == 0 {
            return;
        }
        let dc = attn_c(dm);
        let dh = dm.head_dim();
        if let Some(chunks) = attn_v2_chunks(dm).filter(|_| self.fast.attention_v2) {
            // Version 2: the tokens split over blocks, partial sums reduced in chunk order.
            let smem = ((dm.k * dh + ATT_T * dm.k) * 4) as u32;
            let mut partial = self.scratch::<f32>(dm.batch * dm.heads * chunks * dm.k * (dh + 1));
            let cfg = attn_grid(dm, chunks, smem);
            launch!(self, "attention_fwd_partial_f32", cfg; &dc, k, v, q, attn, &mut partial);
            let ci = i(chunks);
            launch!(self, "attention_fwd_reduce_f32", per_elem(dm.batch * dm.heads * dm.k * dh);
                &dc, &ci, &partial, upd);
            return;
        }
        let smem = ((dm.k * dh + dm.k) * 4) as u32;
        assert!(smem <= 48 * 1024, "attention: K·D/heads too large for v1");
        launch!(self, "attention_fwd_f32", per_block(dm.batch * dm.heads, smem);
            &dc, k, v, q, attn, upd);
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
        assert_eq!(dm.d % dm.heads, 0);
        assert_eq!(attn.len(), dm.attn_len());
        assert_eq!(dupd.len(), dm.batch * dm.k * dm.d);
        assert_eq!(dk.len(), dm.batch * dm.n * dm.d);
        assert_eq!(dv.len(), dm.batch * dm.n * dm.d);
        assert_eq!(dq.len(), dm.batch * dm.k * dm.d);
        if dm.batch * dm.heads == 0 {
            return;
        }
        let dc = attn_c(dm);
        let dh = dm.head_dim();
        if let Some(chunks) = attn_v2_chunks(dm).filter(|_| self.fast.attention_v2) {
            let bh = dm.batch * dm.heads;
            let mut stats = self.scratch::<f32>(bh * chunks * dm.k * 2);
            let smem1 = ((dm.k * dh + 2 * ATT_T * dm.k) * 4) as u32;
            launch!(self, "attention_bwd_stats_f32", attn_grid(dm, chunks, smem1);
                &dc, v, attn, dupd, &mut stats);
            let mut dq_partial = self.scratch::<f32>(bh * chunks * dm.k * dh);
            let smem2 = ((2 * dm.k * dh + 2 * dm.k + 2 * ATT_T * dm.k) * 4) as u32;
            launch!(self, "attention_bwd_main_f32", attn_grid(dm, chunks, smem2);
                &dc, k, v, q, attn, dupd, &stats, dk, dv, &mut dq_partial);
            let ci = i(chunks);
            launch!(self, "attention_bwd_dq_reduce_f32", per_elem(bh * dm.k * dh);
                &dc, &ci, &dq_partial, dq);
            return;
        }
        let mut scratch = self.scratch::<f32>(dm.attn_len());
        let smem = (2 * dm.k * 4) as u32;
        launch!(self, "attention_bwd_f32", per_block(dm.batch * dm.heads, smem);
            &dc, k, v, q, attn, dupd, &mut scratch, dk, dv, dq);
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
        let mut sse = self.scratch::<f32>(n);
        let (bi, ki, pi) = (i(batch), i(k), i(p));
        if n > 0 {
            launch!(self, "composite_fwd_f32", per_elem(n);
                &bi, &ki, &pi, dec, target, masks, recon, &mut sse);
        }
        // As on the CPU: a float sum divided by the f32 count (NaN for an empty batch).
        let count = (n * 3) as f64 as f32;
        launch!(self, "composite_loss_f32", per_block(1, 0); &bi, &pi, &count, &sse, loss);
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
        // A single update with host-known hyper-parameters: its own control block.
        let mut c = vec![0.0f64; ctrl::LEN];
        c[ctrl::APPLY] = 1.0;
        c[ctrl::GRAD_SCALE] = s.grad_scale;
        c[ctrl::BC1] = 1.0 - s.beta1.powi(s.t as i32);
        c[ctrl::BC2] = 1.0 - s.beta2.powi(s.t as i32);
        let mut cb = self.scratch::<f64>(ctrl::LEN);
        self.upload_any(&c, &mut cb);
        let wd = s.weight_decay;
        self.adam_ctrl(s.lr, s.beta1, s.beta2, s.eps, wd, &cb, param, grad, m, v);
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
        let mut map = Vec::new();
        for (t, &n) in grad_lens.iter().enumerate() {
            i(n);
            for first in (0..n).step_by(MT_CHUNK) {
                map.push(((t as u64) << 32) | first as u64);
            }
        }
        let blocks = map.len();
        i(blocks);
        let mut c = vec![0.0f64; ctrl::LEN];
        c[ctrl::UPDATES] = start.updates as f64;
        c[ctrl::SKIPPED] = start.skipped as f64;
        c[ctrl::FIRST_BAD_STEP] = -1.0;
        c[ctrl::LAST_BAD_STEP] = start.last_bad_step.map_or(-1.0, |s| s as f64);
        if let Some((step, loss, norm)) = start.first_bad {
            c[ctrl::FIRST_BAD_STEP] = step as f64;
            c[ctrl::FIRST_BAD_LOSS] = loss;
            c[ctrl::FIRST_BAD_NORM] = norm;
        }
        c[ctrl::LATCHED] = start.latched as i32 as f64;
        c[ctrl::LAST_LOSS] = start.last_loss;
        c[ctrl::LAST_NORM] = start.last_grad_norm;
        c[ctrl::LOSS_SUM] = start.loss_sum;
        c[ctrl::LOSS_COUNT] = start.loss_count as f64;
        let mut ctrl_buf = self.alloc_any::<f64>(ctrl::LEN, false);
        self.upload_any(&c, &mut ctrl_buf);
        let mut map_buf = self.alloc_any::<u64>(blocks.max(1), false);
        if blocks > 0 {
            self.upload_any(&map, &mut map_buf);
        }
        CudaOptState {
            ctrl: ctrl_buf,
            partials: self.alloc_any::<f64>(blocks.max(1), false),
            lens: grad_lens.to_vec(),
            tab: self.alloc_any::<u64>(5 * grad_lens.len().max(1), false),
            tab_host: Vec::new(),
            map: map_buf,
            blocks,
        }
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
        assert_eq!(loss.len(), 1);
        let nt = st.lens.len();
        assert!(params.len() == nt && grads.len() == nt && m.len() == nt && v.len() == nt);
        // The table of addresses: uploaded on the first step, and again only if a buffer moved
        // (a host-to-device copy, not a synchronization).
        let mut tab = Vec::with_capacity(5 * nt);
        for t in 0..nt {
            let n = st.lens[t];
            assert!(params[t].len() == n && grads[t].len() == n && m[t].len() == n);
            assert_eq!(v[t].len(), n);
            tab.extend([
                self.addr(&params[t]),
                self.addr(&grads[t]),
                self.addr(&m[t]),
                self.addr(&v[t]),
                n as u64,
            ]);
        }
        if tab != st.tab_host && nt > 0 {
            self.upload_any(&tab, &mut st.tab);
            st.tab_host = tab;
        }
        let cfg = per_block(st.blocks, 0);
        if st.blocks > 0 {
            launch!(self, "sum_squares_multi_f32", cfg; &st.tab, &st.map, &mut st.partials);
        }
        let np = i(st.blocks);
        let (b1, b2) = (h.beta1, h.beta2);
        let clip = h.grad_clip.unwrap_or(0.0);
        let (has_clip, latch) = (h.grad_clip.is_some() as i32, h.latch as i32);
        // Step, lr and decay from the per-step scalars (normally set by `begin_step` already).
        self.set_step_vals(Self::step_vals_for(h));
        let sv = &self.step_vals().buf;
        launch!(self, "opt_control_f64", per_block(1, 0);
            &np, &st.partials, loss, &mut st.ctrl, &b1, &b2, &clip, &has_clip, &latch, sv);
        if st.blocks > 0 {
            let eps = h.eps;
            launch!(self, "adam_multi_f32", cfg; &st.tab, &st.map, &b1, &b2, &eps, &st.ctrl, sv);
        }
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
    fn opt_report(&self, st: &CudaOptState) -> OptReport {
        let c = self.read(&st.ctrl);
        let step = |x: f64| (x >= 0.0).then_some(x as u64);
        OptReport {
            updates: c[ctrl::UPDATES] as u64,
            skipped: c[ctrl::SKIPPED] as u64,
            first_bad: step(c[ctrl::FIRST_BAD_STEP])
                .map(|s| (s, c[ctrl::FIRST_BAD_LOSS], c[ctrl::FIRST_BAD_NORM])),
            last_bad_step: step(c[ctrl::LAST_BAD_STEP]),
            latched: c[ctrl::LATCHED] != 0.0,
            last_loss: c[ctrl::LAST_LOSS],
            last_grad_norm: c[ctrl::LAST_NORM],
            loss_sum: c[ctrl::LOSS_SUM],
            loss_count: c[ctrl::LOSS_COUNT] as u64,
        }
    }
}

/// Tokens per block of the attention kernels, version 2 (ATT_T in attention.cu), and the most
/// slots they keep in registers (ATT_MAXK).
const ATT_T: usize = 256;
const ATT_MAXK: usize = 16;

/// The number of token chunks when version 2 of the attention kernels applies (K ≤ ATT_MAXK and
/// the largest shared-memory need, that of attention_bwd_main_f32, within 48 KiB), else None
/// (version 1: one block per batch and head).
fn attn_v2_chunks(dm: &AttnDims) -> Option<usize> {
    let smem = (2 * dm.k * dm.head_dim() + 2 * dm.k + 2 * ATT_T * dm.k) * 4;
    let fits = dm.k <= ATT_MAXK && smem <= 48 * 1024 && dm.batch * dm.heads <= 65_535;
    fits.then(|| dm.n.div_ceil(ATT_T).max(1))
}

fn attn_grid(dm: &AttnDims, chunks: usize, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (chunks as u32, (dm.batch * dm.heads) as u32, 1),
        block_dim: (ATT_T as u32, 1, 1),
        shared_mem_bytes,
    }
}

fn attn_c(dm: &AttnDims) -> AttnDimsC {
    AttnDimsC {
        batch: i(dm.batch),
        n: i(dm.n),
        k: i(dm.k),
        d: i(dm.d),
        heads: i(dm.heads),
        scale: dm.scale as f32,
        eps: dm.eps as f32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How often each output position of a transposed convolution is reached by the taps of
    /// `mask` over the input grid (per axis: tap ky reaches q = s·p − pad + ky).
    fn tap_coverage(g: &ConvGeom, mask: u32) -> Vec<usize> {
        let mut count = vec![0; g.h_out * g.w_out];
        for tap in (0..g.k * g.k).filter(|t| mask >> t & 1 == 1) {
            let (ky, kx) = (tap / g.k, tap % g.k);
            for py in 0..g.h_in {
                for px in 0..g.w_in {
                    let qy = (py * g.stride + ky) as isize - g.pad as isize;
                    let qx = (px * g.stride + kx) as isize - g.pad as isize;
                    if (0..g.h_out as isize).contains(&qy) && (0..g.w_out as isize).contains(&qx) {
                        count[qy as usize * g.w_out + qx as usize] += 1;
                    }
                }
            }
        }
        count
    }

    #[test]
    fn ptxas_log_parses_registers_shared_memory_stack_and_spills() {
        let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'conv_a' for 'sm_90'
ptxas info    : Function properties for conv_a
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 76 registers, used 1 barriers, 30720 bytes smem
ptxas info    : Compile time = 10.745 ms
ptxas info    : Compiling entry function 'spilly' for 'sm_90'
ptxas info    : Function properties for spilly
ptxas         .     2048 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 2048 bytes cumulative stack size
";
        let kernel = |name: &str,
                      registers,
                      shared_bytes,
                      stack_bytes,
                      spill_store_bytes,
                      spill_load_bytes| {
            KernelResources {
                name: name.into(),
                registers,
                shared_bytes,
                stack_bytes,
                spill_store_bytes,
                spill_load_bytes,
            }
        };
        assert_eq!(
            parse_ptxas_log(log),
            [
                kernel("conv_a", 76, 30720, 0, 0, 0),
                kernel("spilly", 255, 0, 2048, 24, 16)
            ]
        );
    }

    #[test]
    fn convt_covering_taps_reach_every_output_once() {
        // The decoder layers of the configs: 5×5 stride 2 (pad 2, output padding 1), 5×5 and
        // 3×3 stride 1 "same".
        let s2 = ConvGeom::transposed(8, 8, 64, 64, 5, 2, 2, 1);
        let bit = |ky: usize, kx: usize, k: usize| 1u32 << (ky * k + kx);
        assert_eq!(
            convt_covering_taps(&s2),
            Some(bit(2, 2, 5) | bit(2, 3, 5) | bit(3, 2, 5) | bit(3, 3, 5))
        );
        let s1 = ConvGeom::transposed(16, 16, 64, 64, 5, 1, 2, 0);
        assert_eq!(convt_covering_taps(&s1), Some(bit(2, 2, 5)));
        let k3 = ConvGeom::transposed(16, 16, 64, 4, 3, 1, 1, 0);
        assert_eq!(convt_covering_taps(&k3), Some(bit(1, 1, 3)));
        // Every small geometry: a mask reaches each output exactly once; None only where some
        // output phase has no single tap that reaches all of its positions.
        let (mut some, mut none) = (0, 0);
        for k in 1..=5 {
            for stride in 1..=3 {
                for pad in 0..k {
                    for out_pad in 0..stride {
                        for h_in in 1..=5 {
                            if (h_in - 1) * stride + k + out_pad <= 2 * pad {
                                continue; // no output
                            }
                            let g =
                                ConvGeom::transposed(h_in, h_in + 1, 4, 4, k, stride, pad, out_pad);
                            match convt_covering_taps(&g) {
                                Some(mask) => {
                                    some += 1;
                                    assert!(
                                        tap_coverage(&g, mask).iter().all(|&c| c == 1),
                                        "{g:?}: mask {mask:b}"
                                    );
                                }
                                None => {
                                    none += 1;
                                    // Some output row phase (or column phase) that no single
                                    // tap covers completely.
                                    let covers =
                                        |n_in: usize, n_out: usize, phase: usize, ky: usize| {
                                            (phase..n_out).step_by(stride).all(|q| {
                                                let off = (q + pad) as isize - ky as isize;
                                                off >= 0
                                                    && off as usize % stride == 0
                                                    && (off as usize / stride) < n_in
                                            })
                                        };
                                    let axis_ok = |n_in: usize, n_out: usize| {
                                        (0..stride.min(n_out))
                                            .all(|ph| (0..k).any(|ky| covers(n_in, n_out, ph, ky)))
                                    };
                                    assert!(
                                        !(axis_ok(g.h_in, g.h_out) && axis_ok(g.w_in, g.w_out)),
                                        "{g:?}: a covering tap set exists but none was found"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(
            some > 100 && none > 10,
            "{some} geometries with taps, {none} without"
        );
    }

    #[test]
    fn nvrtc_error_names_the_file_and_carries_the_log() {
        if !nvrtc_available() {
            eprintln!("skipped: libnvrtc cannot be loaded");
            return;
        }
        let broken = KernelFile {
            name: "broken.cu",
            source: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }\n",
            kernels: &["k"],
        };
        let e = compile_file(&broken, "sm_90").unwrap_err();
        assert!(e.contains("kernels/broken.cu"), "{e}");
        assert!(e.contains("sm_90"), "{e}");
        assert!(e.contains("undefined_name"), "no compiler log in: {e}");
    }

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
