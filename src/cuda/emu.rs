//! The kernel emulator: the CUDA kernels of `kernels/*.cu`, compiled by the host C++ compiler and
//! run on the CPU, so that the CUDA backend (its launchers and its kernels) can be tested on a
//! machine without a GPU, CI included.
//!
//! Each CUDA thread is a fiber; `__syncthreads` and warp-wide operations are real barriers
//! (`emu/runtime.cpp`), and the order in which threads run alternates between barriers so that a
//! missing barrier shows. Buffers live in host memory with poisoned guard zones on both sides:
//! a kernel that reads past a buffer reads NaN, and one that writes past it fails the launch.
//! Shared memory starts as NaN in every block. Every launch is checked against the kernel's
//! signature ([`sig_of`]): its `__launch_bounds__`, 48 KiB of dynamic shared memory, and buffers
//! aliased against `__restrict__`; and against the device's grid and block limits. With `SLOTFIX_EMU_CHECKED=1` the library is built with UBSan
//! (and ASan when its runtime is preloaded), which reports out-of-bounds indexing of shared and
//! per-thread arrays, misalignment, bad shifts, signed overflow and out-of-buffer accesses.
//!
//! Hopper's warpgroup MMA (`wgmma`, `kernels/wgmma.cuh`) runs as the PTX ISA lays it out: the
//! 128 threads of a warpgroup meet at each wgmma instruction, and each product runs when a
//! `wait_group` retires its group, with what shared memory, the accumulators and the A
//! registers hold then; a missing `wgmma.fence`, `fence.proxy.async` or wait is an error.
//!
//! What it cannot show: data races between blocks, timing, the device's own rounding of `expf`
//! and fused multiply-adds (results agree with the GPU to f32 rounding, not bit for bit),
//! anything about the compiler NVRTC itself (the `nvrtc_*` tests cover compiling), whether its
//! reading of wgmma's layouts is the hardware's (the probe test on a GPU, and the backend's
//! check when it opens a 9.0 device, settle that), and an A register written between a
//! `wgmma.fence` and the wgmma that reads it (the fence orders no such write).

use super::kernels::{KernelFile, COMMON, KERNEL_FILES};

mod sigs;
pub use sigs::{kernel_sigs, restrict_violations, sig_of, KernelSig, PtrParam};
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};

const SHIM: &str = include_str!("emu/cuemu.h");
const RUNTIME: &str = include_str!("emu/runtime.cpp");

type EntryFn = unsafe extern "C" fn(*mut *mut c_void);
type RunFn = unsafe extern "C" fn(
    EntryFn,
    *mut *mut c_void,
    *const u32,
    *const u32,
    u32,
    i32,
    *mut c_char,
    usize,
) -> i32;

/// The compiled kernels of every file, loaded from one shared library.
pub struct Emulator {
    _lib: Arc<libloading::Library>,
    run: RunFn,
    entries: HashMap<&'static str, EntryFn>,
    /// TF32 conversions and tensor-core products keep full f32 operands (see
    /// [`Emulator::set_exact_tf32`]).
    exact_tf32: bool,
}

/// Why the emulator cannot run here (not x86-64 Linux, or no C++ compiler), or None. When it can
/// run, a failure to build it is a bug and [`Emulator::new`] reports it.
pub fn unavailable_reason() -> Option<String> {
    if !cfg!(all(target_arch = "x86_64", target_os = "linux")) {
        return Some("the kernel emulator runs on x86-64 Linux only".into());
    }
    match Command::new(compiler()).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some(format!(
            "no C++ compiler (`{}`) for the kernel emulator",
            compiler()
        )),
    }
}

impl Emulator {
    /// Every kernel of `kernels/` (built once per process).
    pub fn new() -> Result<Emulator, String> {
        static LIB: OnceLock<Result<Arc<libloading::Library>, String>> = OnceLock::new();
        let lib = LIB.get_or_init(|| load(KERNEL_FILES)).clone()?;
        Self::with_library(lib, KERNEL_FILES)
    }

    /// The kernels of `files` (the emulator's own tests use this).
    pub fn from_files(files: &[KernelFile]) -> Result<Emulator, String> {
        Self::with_library(load(files)?, files)
    }

    fn with_library(
        lib: Arc<libloading::Library>,
        files: &[KernelFile],
    ) -> Result<Emulator, String> {
        let run: RunFn = unsafe {
            *lib.get::<RunFn>(b"cuemu_run\0")
                .map_err(|e| e.to_string())?
        };
        let mut entries = HashMap::new();
        for f in files {
            for &k in f.kernels {
                let sym = format!("cuemu_entry_{k}\0");
                let e: EntryFn = unsafe {
                    *lib.get::<EntryFn>(sym.as_bytes())
                        .map_err(|e| format!("emulator: kernel {k}: {e}"))?
                };
                entries.insert(k, e);
            }
        }
        Ok(Emulator {
            _lib: lib,
            run,
            entries,
            exact_tf32: false,
        })
    }

    /// With `exact` set, the tensor-core kernels compute with full f32 operands instead of TF32:
    /// their results must then match the f32 reference at f32 tolerances, which checks their
    /// indexing apart from their rounding. (No GPU can do this; it is an emulator-only check.)
    pub fn set_exact_tf32(&mut self, exact: bool) {
        self.exact_tf32 = exact;
    }

    /// Run kernel `name` over `grid` × `block`; `args[i]` points at the i-th argument's value.
    pub fn launch(
        &self,
        name: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), String> {
        let entry = *self
            .entries
            .get(name)
            .ok_or_else(|| format!("emulator: no kernel {name}"))?;
        let g = [grid.0, grid.1, grid.2];
        let b = [block.0, block.1, block.2];
        let mut err = vec![0u8; 1024];
        let rc = unsafe {
            (self.run)(
                entry,
                args.as_mut_ptr(),
                g.as_ptr(),
                b.as_ptr(),
                shared_bytes,
                self.exact_tf32 as i32,
                err.as_mut_ptr() as *mut c_char,
                err.len(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
            Err(String::from_utf8_lossy(&err[..end]).into_owned())
        }
    }
}

/// The shared library of `files` (cached on disk by the hash of its sources).
fn load(files: &[KernelFile]) -> Result<Arc<libloading::Library>, String> {
    if let Some(why) = unavailable_reason() {
        return Err(why);
    }
    let path = build(files)?;
    unsafe { libloading::Library::new(&path) }
        .map(Arc::new)
        .map_err(|e| format!("emulator: loading {}: {e}", path.display()))
}

/// The C++ translation unit of one kernel file: the shim, the shared helpers, the file (its
/// dynamic shared memory turned into the emulator's buffer), and one entry point per kernel that
/// unpacks the argument array.
fn translation_unit(f: &KernelFile) -> String {
    let mut src = String::new();
    src.push_str("#include \"cuemu.h\"\n#include <type_traits>\n#include <utility>\n");
    src.push_str(ARITY);
    src.push_str("#line 1 \"common.cuh\"\n");
    for line in COMMON.lines() {
        src.push_str(&fresh_shared(line));
        src.push('\n');
    }
    src.push('\n');
    for line in f.expanded_source().lines() {
        src.push_str(&fresh_shared(&dynamic_shared(line)));
        src.push('\n');
    }
    src.push_str(
        "\ntemplate <class... A, size_t... I>\n\
         static void cuemu_call(void (*f)(A...), void** a, std::index_sequence<I...>) {\n\
         \x20   f(*static_cast<typename std::remove_cv<A>::type*>(a[I])...);\n}\n",
    );
    for &k in f.kernels {
        src.push_str(&format!(
            "extern \"C\" void cuemu_entry_{k}(void** a) {{ cuemu_call({k}, a, \
             std::make_index_sequence<cuemu_arity({k})>{{}}); }}\n"
        ));
    }
    src
}

/// `__shared__ T a[n], b[m]; // …` → the same declaration followed, on the same line (so that
/// line numbers hold), by `cuemu_smem_fresh` of each variable: shared memory starts as NaN in
/// every block, as on a GPU it starts as whatever the last block left.
fn fresh_shared(line: &str) -> String {
    let t = line.trim_start();
    let Some(decl) = t.strip_prefix("__shared__ ") else {
        return line.to_string();
    };
    let Some(end) = decl.find(';') else {
        return line.to_string();
    };
    let mut calls = String::new();
    for declarator in decl[..end].split(',') {
        let name = sigs::trailing_ident(declarator.split('[').next().unwrap_or(""));
        if !name.is_empty() {
            calls.push_str(&format!(" cuemu_smem_fresh(&{name}, sizeof({name}));"));
        }
    }
    let at = line.len() - t.len() + "__shared__ ".len() + end + 1;
    format!("{}{calls}{}", &line[..at], &line[at..])
}

/// `extern __shared__ T name[];` → a pointer to the emulator's dynamic shared memory.
fn dynamic_shared(line: &str) -> String {
    let t = line.trim();
    if let Some(rest) = t.strip_prefix("extern __shared__ ") {
        if let Some(decl) = rest.strip_suffix("[];") {
            if let Some((ty, name)) = decl.rsplit_once(' ') {
                return format!("{ty}* {name} = ({ty}*)cuemu_dyn_smem();");
            }
        }
    }
    line.to_string()
}

const ARITY: &str = "template <class... A>\nconstexpr size_t cuemu_arity(void (*)(A...)) { return sizeof...(A); }\n";

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

const FLAGS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-ffp-contract=off",
    "-Wno-unknown-pragmas",
    "-Wno-unused-function",
];

/// Environment variable: `1` builds the emulator with run-time checks of the kernels' C++
/// (see [`CHECK_FLAGS`]).
pub const CHECKED_ENV: &str = "SLOTFIX_EMU_CHECKED";

/// The checks of a checked build: UBSan's (an index past the end of a fixed-size array such as
/// a shared-memory tile or a per-thread array, a misaligned access, a shift past the width, a
/// signed overflow, …), each reported on stderr with its file and line while the run goes on.
/// On a GPU each of these is an illegal address, garbage or undefined behaviour. (`-g1`: the
/// line tables that AddressSanitizer's reports need for file and line, without the full debug
/// information, which adds a fifth to conv_tc*.cu's compile.)
pub const CHECK_FLAGS: &[&str] = &["-fsanitize=undefined", "-fno-sanitize=vptr", "-g1"];

/// Added to a checked build when the process runs with AddressSanitizer's runtime preloaded
/// (`LD_PRELOAD`, see [`asan_runtime`]): a kernel reading or writing past a buffer's guard zone
/// then stops the process with the file and line (the guard zones catch writes into them, and
/// reads of them only when the value read changes a result).
pub const ASAN_FLAG: &str = "-fsanitize=address";

/// The compiler's AddressSanitizer runtime, if it has one (what a process must preload for a
/// checked build to use [`ASAN_FLAG`]).
pub fn asan_runtime() -> Option<PathBuf> {
    let out = Command::new(compiler())
        .arg("-print-file-name=libasan.so")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    // A compiler without it prints the bare name back.
    (path.is_absolute() && path.exists()).then_some(path)
}

/// The compiler flags of this process's emulator builds.
fn flags() -> Vec<&'static str> {
    let mut f = FLAGS.to_vec();
    if std::env::var(CHECKED_ENV).is_ok_and(|v| v == "1") {
        f.extend(CHECK_FLAGS);
        if std::env::var("LD_PRELOAD").is_ok_and(|v| v.contains("libasan")) {
            f.push(ASAN_FLAG);
        }
    }
    f
}

/// Compile every kernel file and the runtime into one shared library; returns its path.
fn build(files: &[KernelFile]) -> Result<PathBuf, String> {
    let flags = flags();
    let units: Vec<(String, String)> = files
        .iter()
        .map(|f| (f.name.replace(".cu", ".cpp"), translation_unit(f)))
        .collect();
    let mut parts: Vec<&str> = vec![SHIM, RUNTIME];
    parts.extend(&flags);
    for (n, s) in &units {
        parts.push(n);
        parts.push(s);
    }
    let dir = std::env::temp_dir().join(format!(
        "slotfix-cuemu-{:016x}",
        super::kcache::fnv1a(&parts)
    ));
    let lib = dir.join("libcuemu.so");
    if lib.exists() {
        return Ok(lib);
    }
    // Build in a private folder, then rename it into place (several test processes may race).
    static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.with_extension(format!("tmp{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("emulator: {}: {e}", tmp.display()))?;
    let write = |name: &str, text: &str| {
        std::fs::write(tmp.join(name), text).map_err(|e| format!("emulator: writing {name}: {e}"))
    };
    write("cuemu.h", SHIM)?;
    write("runtime.cpp", RUNTIME)?;
    for (n, s) in &units {
        write(n, s)?;
    }
    let mut sources = vec!["runtime.cpp".to_string()];
    sources.extend(units.iter().map(|(n, _)| n.clone()));
    // One compiler process per file, in parallel; then one link.
    let children: Vec<(String, std::process::Child)> = sources
        .iter()
        .map(|s| {
            let obj = s.replace(".cpp", ".o");
            Command::new(compiler())
                .args(&flags)
                .args(["-c", s, "-o", &obj])
                .current_dir(&tmp)
                .stderr(std::process::Stdio::piped())
                .spawn()
                .map(|c| (s.clone(), c))
                .map_err(|e| {
                    format!(
                        "emulator: cannot run the C++ compiler `{}`: {e}",
                        compiler()
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    for (s, c) in children {
        let out = c.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "emulator: compiling {s} failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let objs: Vec<String> = sources.iter().map(|s| s.replace(".cpp", ".o")).collect();
    run(Command::new(compiler())
        .args(flags.iter().filter(|f| f.starts_with("-fsanitize")))
        .args(["-shared", "-pthread", "-o", "libcuemu.so"])
        .args(&objs)
        .current_dir(&tmp))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if lib.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(format!(
                "emulator: {} → {}: {e}",
                tmp.display(),
                dir.display()
            ))
        }
    }
    Ok(lib)
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("emulator: cannot run the C++ compiler: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "emulator: linking failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator's `prefetch_l2` faults on the guard zones' pattern, spelled out in cuemu.h:
    /// it must be the f32 poison the buffers are filled with.
    #[test]
    fn prefetch_check_knows_the_f32_poison() {
        use crate::cuda::Elem;
        let pattern = format!("{:#x}u", f32::poison().to_bits());
        assert!(SHIM.contains(&pattern), "cuemu.h has no {pattern}");
    }

    /// Kernels that exercise the emulator itself.
    const SELF_TEST: KernelFile = KernelFile {
        name: "emu_self_test.cu",
        source: r#"
// out[i] = the value each shuffle returns to thread i (one warp per 32 outputs, 4 shuffles).
extern "C" __global__ void shuffles(float* out) {
    const int t = threadIdx.x;
    const float v = 100.0f + t;
    out[4 * t + 0] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * t + 1] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[4 * t + 2] = __shfl_sync(0xffffffffu, v, 7);
    out[4 * t + 3] = __shfl_up_sync(0xffffffffu, v, 2, 16);
}
// Reverse through shared memory; with `barrier` 0 the read races the write.
extern "C" __global__ void reverse(int barrier, float salt, float* out) {
    __shared__ float sh[256];
    const int t = threadIdx.x;
    sh[t] = (float)t + salt;
    if (barrier) __syncthreads();
    out[t] = sh[blockDim.x - 1 - t];
}
// Half of the first warp waits at a block barrier, the other half at a shuffle.
extern "C" __global__ void deadlock(float* out) {
    if (threadIdx.x < 16) { __syncthreads(); }
    else { out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1); }
}
// Only block 0 writes its shared memory; every block reads it.
extern "C" __global__ void stale_shared(float* out) {
    __shared__ float s[32], unused[4];  // two declarators on one line
    const int t = threadIdx.x;
    if (blockIdx.x == 0) s[t] = 1.0f + t;
    __syncthreads();
    out[blockIdx.x * 32 + t] = s[t];
}
// Thread t writes float t of the dynamic shared memory, then reads back float `read_at + t`.
extern "C" __global__ void dyn_shared(int read_at, float* out) {
    extern __shared__ float dyn[];
    const int t = threadIdx.x;
    dyn[t] = 1.0f + t;
    __syncthreads();
    out[t] = dyn[read_at + t];
}
// cp.async (common.cuh's cp_async16 / cp_async_wait_all in the emulator): thread t copies src[t]
// (odd t) or zeros (even t) into its shared float4, reads it before and after the wait; with
// `barrier_first` a barrier comes between the copy and the wait (a fault).
extern "C" __global__ void cp_async(int barrier_first, const float4* src, float* out) {
    __shared__ __align__(16) float4 sh[32];
    const int t = threadIdx.x;
    sh[t] = make_float4(-1.0f, -1.0f, -1.0f, -1.0f);
    cuemu_cp_async16(&sh[t], t % 2 ? &src[t] : nullptr);
    out[2 * t] = sh[t].x;
    if (barrier_first) __syncthreads();
    cuemu_cp_async_wait_all();
    out[2 * t + 1] = sh[t].x;
}
#include "wgmma.cuh"
// One warpgroup's wgmma m64n128k8 of ones (A in registers, B = 128 × 8 in dynamic shared memory,
// 4096 bytes): D = 8 everywhere, thread t's 64 accumulators at out[64t..]. `breaks` leaves out
// one of wgmma's ordering rules: 1 fence.proxy.async, 2 wgmma.fence, 3 the wait; 4 reads the
// accumulators before the wait, 5 overwrites B (with twos) before it, 6 the A registers. 7 and
// 8 run a second product on B restaged with twos (D = 16), published with the fence (7) or
// without (8: the product reads the ones).
extern "C" __global__ void wgmma_rules(int breaks, float* out) {
    extern __shared__ uint4 wg_smem[];
    unsigned* bs = (unsigned*)wg_smem;
    const int t = threadIdx.x;
    for (int e = t; e < 1024; e += 128) bs[e] = __float_as_uint(1.0f);
    if (breaks != 1) fence_proxy_async();
    __syncthreads();
    const unsigned one = __float_as_uint(1.0f);
    unsigned a[4] = {one, one, one, one};
    float acc[64];
    for (int i = 0; i < 64; ++i) acc[i] = __int_as_float(0x7fc00000);
    if (breaks != 2) wgmma_fence();
    wgmma_m64n128k8_rs(acc, a, wgmma_desc(bs, 128, 256), 0);
    wgmma_commit();
    if (breaks == 4)
        for (int i = 0; i < 64; ++i) out[64 * t + i] = acc[i];
    if (breaks == 6) a[1] = 0u;
    if (breaks == 5) {
        for (int e = t; e < 1024; e += 128) bs[e] = __float_as_uint(2.0f);
        fence_proxy_async();
        __syncthreads();
    }
    if (breaks != 3) wgmma_wait<0>();
    if (breaks == 7 || breaks == 8) {
        __syncthreads();
        for (int e = t; e < 1024; e += 128) bs[e] = __float_as_uint(2.0f);
        if (breaks == 7) fence_proxy_async();
        __syncthreads();
        wgmma_fence();
        wgmma_m64n128k8_rs(acc, a, wgmma_desc(bs, 128, 256), 0);
        wgmma_commit();
        wgmma_wait<0>();
    }
    if (breaks != 4)
        for (int i = 0; i < 64; ++i) out[64 * t + i] = acc[i];
}
"#,
        sm90a: false,
        kernels: &[
            "shuffles",
            "reverse",
            "deadlock",
            "stale_shared",
            "dyn_shared",
            "cp_async",
            "wgmma_rules",
        ],
    };

    fn emulator() -> Option<Emulator> {
        if let Some(why) = unavailable_reason() {
            eprintln!("skipped: {why}");
            return None;
        }
        Some(Emulator::from_files(&[SELF_TEST]).unwrap_or_else(|e| panic!("{e}")))
    }

    fn run(e: &Emulator, name: &str, block: u32, args: &mut [*mut c_void]) -> Result<(), String> {
        e.launch(name, (1, 1, 1), (block, 1, 1), 0, args)
    }

    #[test]
    fn shuffles_follow_the_cuda_semantics() {
        let Some(e) = emulator() else { return };
        let mut out = vec![0f32; 64 * 4];
        let mut p = out.as_mut_ptr();
        run(&e, "shuffles", 64, &mut [&mut p as *mut _ as *mut c_void]).unwrap();
        for t in 0..64usize {
            let (lane, base) = (t % 32, (t / 32 * 32) as f32 + 100.0);
            let at = |l: usize| base + l as f32;
            let down = if lane + 3 < 32 {
                at(lane + 3)
            } else {
                at(lane)
            };
            let up = if lane % 16 >= 2 {
                at(lane - 2)
            } else {
                at(lane)
            };
            assert_eq!(
                out[4 * t..4 * t + 4],
                [down, at(lane ^ 5), at(7), up],
                "thread {t}"
            );
        }
    }

    #[test]
    fn a_missing_barrier_shows() {
        let Some(e) = emulator() else { return };
        // A new salt per launch, so that no result can come from an earlier launch.
        for (barrier, mut salt) in [(1i32, 0f32), (0, 1000.0)] {
            let mut out = vec![0f32; 256];
            let mut p = out.as_mut_ptr();
            let mut b = barrier;
            let mut args = [
                &mut b as *mut _ as *mut c_void,
                &mut salt as *mut _ as *mut c_void,
                &mut p as *mut _ as *mut c_void,
            ];
            run(&e, "reverse", 256, &mut args).unwrap();
            let right = (0..256).all(|t| out[t] == (255 - t) as f32 + salt);
            assert_eq!(right, barrier == 1, "barrier {barrier}");
        }
    }

    /// Shared memory starts as NaN in every block: a block that reads what it never wrote sees
    /// NaN, not the values an earlier block of the same worker left there (as on a GPU, where
    /// it sees garbage).
    #[test]
    fn shared_memory_a_block_never_wrote_reads_as_nan() {
        let Some(e) = emulator() else { return };
        let blocks = 8u32;
        let mut out = vec![0f32; 32 * blocks as usize];
        let mut p = out.as_mut_ptr();
        e.launch(
            "stale_shared",
            (blocks, 1, 1),
            (32, 1, 1),
            0,
            &mut [&mut p as *mut _ as *mut c_void],
        )
        .unwrap();
        for (t, v) in out[..32].iter().enumerate() {
            assert_eq!(*v, 1.0 + t as f32);
        }
        assert!(out[32..].iter().all(|v| v.is_nan()), "{:?}", &out[32..40]);
    }

    /// A launch gets the dynamic shared memory it asks for: reads past it see NaN, and a write
    /// past it fails the launch (on a GPU: garbage, or another block's data).
    #[test]
    fn dynamic_shared_memory_is_what_the_launch_asked_for() {
        let Some(e) = emulator() else { return };
        let launch = |threads: u32, bytes: u32, read_at: i32| {
            let mut out = vec![0f32; threads as usize];
            let (mut p, mut r) = (out.as_mut_ptr(), read_at);
            let args = &mut [
                &mut r as *mut _ as *mut c_void,
                &mut p as *mut _ as *mut c_void,
            ];
            e.launch("dyn_shared", (1, 1, 1), (threads, 1, 1), bytes, args)
                .map(|()| out)
        };
        // 64 floats asked for, 64 written and read back.
        let out = launch(64, 256, 0).unwrap();
        assert!(out.iter().enumerate().all(|(t, v)| *v == 1.0 + t as f32));
        // 32 threads read floats 32..64 of a 128-byte launch: past its end, NaN.
        let out = launch(32, 128, 32).unwrap();
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
        // 64 threads write 256 bytes into 128.
        let err = launch(64, 128, 0).unwrap_err();
        assert!(
            err.contains("past the 128 bytes of dynamic shared memory"),
            "{err}"
        );
    }

    /// A cp.async copy lands at the wait, not before; a barrier before the wait is an error.
    #[test]
    fn cp_async_lands_at_the_wait() {
        let Some(e) = emulator() else { return };
        #[repr(C, align(16))]
        struct Quad([f32; 4]);
        let src: Vec<Quad> = (0..32).map(|t| Quad([10.0 + t as f32; 4])).collect();
        let launch = |barrier_first: i32| {
            let mut out = vec![0f32; 64];
            let (mut b, mut s, mut p) = (barrier_first, src.as_ptr(), out.as_mut_ptr());
            let args = &mut [
                &mut b as *mut _ as *mut c_void,
                &mut s as *mut _ as *mut c_void,
                &mut p as *mut _ as *mut c_void,
            ];
            run(&e, "cp_async", 32, args).map(|()| out)
        };
        let out = launch(0).unwrap();
        for t in 0..32usize {
            assert_eq!(out[2 * t], -1.0, "thread {t} saw its copy before waiting");
            let want = if t % 2 == 1 { 10.0 + t as f32 } else { 0.0 };
            assert_eq!(out[2 * t + 1], want, "thread {t} after the wait");
        }
        let err = launch(1).unwrap_err();
        assert!(err.contains("cp.async"), "{err}");
    }

    /// wgmma runs when its group is waited for, with what shared memory and the accumulators
    /// hold then (on the hardware: at any time until the wait; shared memory as the last barrier
    /// after a fence.proxy.async published it), and each ordering rule left out is an error or
    /// a wrong result.
    #[test]
    fn wgmma_runs_at_the_wait_and_its_rules_are_checked() {
        let Some(e) = emulator() else { return };
        let launch = |breaks: i32| {
            let mut out = vec![0f32; 128 * 64];
            let (mut b, mut p) = (breaks, out.as_mut_ptr());
            let args = &mut [
                &mut b as *mut _ as *mut c_void,
                &mut p as *mut _ as *mut c_void,
            ];
            e.launch("wgmma_rules", (1, 1, 1), (128, 1, 1), 4096, args)
                .map(|()| out)
        };
        assert!(launch(0).unwrap().iter().all(|&v| v == 8.0));
        for (breaks, says) in [
            (1, "fence.proxy.async"),
            (2, "without a wgmma.fence"),
            (3, "never waited for"),
            (6, "A registers were written"),
        ] {
            let err = launch(breaks).unwrap_err();
            assert!(err.contains(says), "breaks {breaks}: {err}");
        }
        assert!(launch(4).unwrap().iter().all(|v| v.is_nan()));
        assert!(launch(5).unwrap().iter().all(|&v| v == 16.0));
        // Shared memory rewritten for a second product reaches it through the fence only.
        assert!(launch(7).unwrap().iter().all(|&v| v == 16.0));
        assert!(launch(8).unwrap().iter().all(|&v| v == 8.0));
        // Half a warpgroup cannot issue it.
        let mut out = vec![0f32; 64 * 64];
        let (mut b, mut p) = (0i32, out.as_mut_ptr());
        let args = &mut [
            &mut b as *mut _ as *mut c_void,
            &mut p as *mut _ as *mut c_void,
        ];
        let err = e
            .launch("wgmma_rules", (1, 1, 1), (64, 1, 1), 4096, args)
            .unwrap_err();
        assert!(err.contains("warpgroup"), "{err}");
    }

    #[test]
    fn a_deadlock_is_an_error() {
        let Some(e) = emulator() else { return };
        let mut out = vec![0f32; 64];
        let mut p = out.as_mut_ptr();
        let err = run(&e, "deadlock", 64, &mut [&mut p as *mut _ as *mut c_void]).unwrap_err();
        assert!(err.contains("deadlock"), "{err}");
    }
}
