//! CUDA backend tests.
//!
//! - `nvrtc_*`: compile every kernel file with NVRTC for sm_80 and sm_90 (no GPU needed, only
//!   libnvrtc). Skipped with a note when libnvrtc cannot be loaded, unless SLOTFIX_REQUIRE_NVRTC=1
//!   or SLOTFIX_REQUIRE_GPU=1, which make them fail instead.
//! - `gpu_*`: every op forward and backward, and whole training steps, on the GPU against
//!   `Cpu<f32>`. Skipped with a note when there is no driver / GPU, unless SLOTFIX_REQUIRE_GPU=1.
//! - `emu_*`: the same checks with the kernels run by the emulator on the CPU (`cuda::emu`: the
//!   kernel sources compiled by the host C++ compiler). Skipped with a note when there is no C++
//!   compiler, unless SLOTFIX_REQUIRE_EMULATOR=1 (CI sets it).

use slotfix::cuda;

fn env_is(name: &str) -> bool {
    std::env::var(name).map(|v| v == "1").unwrap_or(false)
}

fn require_gpu() -> bool {
    env_is("SLOTFIX_REQUIRE_GPU")
}

fn require_nvrtc() -> bool {
    require_gpu() || env_is("SLOTFIX_REQUIRE_NVRTC")
}

/// Whether libnvrtc is there; says SKIPPED when not (and fails under SLOTFIX_REQUIRE_NVRTC /
/// SLOTFIX_REQUIRE_GPU).
fn nvrtc_or_skip() -> bool {
    if !cuda::nvrtc_available() {
        assert!(
            !require_nvrtc(),
            "libnvrtc cannot be loaded but SLOTFIX_REQUIRE_NVRTC / SLOTFIX_REQUIRE_GPU is set"
        );
        say_skipped("libnvrtc cannot be loaded (put its lib folder on LD_LIBRARY_PATH)");
        return false;
    }
    true
}

/// A kernel file and its checked compile.
type Compiled = (&'static cuda::kernels::KernelFile, cuda::CheckedCompile);

/// Every kernel file that a device of architecture `arch` ("sm_80" or "sm_90") loads, compiled as
/// the backend compiles it there ([`cuda::kernels::KernelFile::arch_for`]: the sm_90a files for
/// sm_90 only) with NVRTC, once per test process: PTX, machine code and ptxas's report, which
/// the compile, resources and kernel cache tests share (the tensor-core convolutions take NVRTC
/// minutes of one core). A compile error fails each of them.
fn checked_compiles(arch: &'static str) -> &'static [Compiled] {
    use std::sync::OnceLock;
    static SM80: OnceLock<Vec<Compiled>> = OnceLock::new();
    static SM90: OnceLock<Vec<Compiled>> = OnceLock::new();
    let cell = match arch {
        "sm_80" => &SM80,
        "sm_90" => &SM90,
        _ => panic!("no compile kept for {arch}"),
    };
    cell.get_or_init(|| {
        // One thread per file, as the backend compiles: a test waiting here for another's
        // compile leaves its core to the compiling threads.
        std::thread::scope(|s| {
            let handles: Vec<_> = cuda::kernels::KERNEL_FILES
                .iter()
                .filter_map(|f| Some((f, f.arch_for(arch)?)))
                .map(|(f, a)| (f, s.spawn(move || cuda::compile_checked(f, a))))
                .collect();
            handles
                .into_iter()
                .map(|(f, h)| (f, h.join().unwrap().unwrap_or_else(|e| panic!("{e}"))))
                .collect()
        })
    })
}

/// Every kernel file compiles for `arch`: its PTX defines each kernel the backend loads from
/// it, and its machine code is a CUDA ELF image (e_machine 190, EM_CUDA). The sm_90a files
/// (`wgmma`) compile for sm_90 devices only, as sm_90a.
fn nvrtc_compiles_for(arch: &'static str) {
    if !nvrtc_or_skip() {
        return;
    }
    let compiled = checked_compiles(arch);
    let files = cuda::kernels::KERNEL_FILES;
    let sm90a = files.iter().filter(|f| f.sm90a).count();
    assert!(sm90a > 0);
    let want = files.len() - if arch == "sm_90" { 0 } else { sm90a };
    assert_eq!(compiled.len(), want);
    for (f, c) in compiled {
        if f.sm90a {
            assert!(c.ptx.contains(".target sm_90a"), "kernels/{}", f.name);
            assert!(c.ptx.contains("wgmma.mma_async"), "kernels/{}", f.name);
        }
        for k in f.kernels {
            assert!(
                c.ptx.contains(&format!(".entry {k}(")),
                "kernels/{} for {arch}: no kernel {k} in the PTX",
                f.name
            );
        }
        assert_elf_for_cuda(&c.cubin, &format!("kernels/{} for {arch}", f.name));
    }
    eprintln!("compiled {} kernel files for {arch}", compiled.len());
}

fn assert_elf_for_cuda(image: &[u8], what: &str) {
    assert!(image.len() > 64, "{what}: {} bytes", image.len());
    assert_eq!(&image[..4], b"\x7fELF", "{what}: not an ELF image");
    assert_eq!(
        u16::from_le_bytes([image[18], image[19]]),
        190,
        "{what}: not CUDA machine code"
    );
}

/// Report a skipped test where it shows: straight to the process's stderr, which the test
/// harness does not capture (eprintln! output of passing tests would be hidden), so a run
/// without a GPU says in its log which checks did not happen.
fn say_skipped(reason: &str) {
    use std::io::Write;
    let name = std::thread::current().name().unwrap_or("?").to_string();
    let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {reason}");
}

#[test]
fn nvrtc_compiles_every_kernel_sm80() {
    nvrtc_compiles_for("sm_80");
}

#[test]
fn nvrtc_compiles_every_kernel_sm90() {
    nvrtc_compiles_for("sm_90");
    if !nvrtc_or_skip() {
        return;
    }
    // The wgmma file says what it needs when compiled for plain sm_90.
    let f = cuda::kernels::KERNEL_FILES
        .iter()
        .find(|f| f.sm90a)
        .unwrap();
    let e = cuda::compile_file(f, "sm_90").unwrap_err();
    assert!(e.contains("needs sm_90a"), "{e}");
}

/// The emulator tests again (but for the repeats whose memory traffic the rerun already has:
/// exact-product passes, `emu_exact_repeat`, and the plumbing tests listed below), in a child
/// process whose emulator is built with UBSan
/// (`SLOTFIX_EMU_CHECKED=1`, `cuda::emu::CHECK_FLAGS`) and, where the compiler has its runtime,
/// AddressSanitizer: an index past the end of a shared-memory tile or a per-thread array, a
/// misaligned access, an overlong shift, a signed overflow, or a read or write past a buffer's
/// guard zone in any kernel fails this test with the kernel file and line, even where the
/// results come out right. (On a GPU such a bug is an illegal address, garbage, or undefined
/// behaviour that compute-sanitizer may or may not see.)
#[test]
fn emu_checked_build_finds_no_memory_error_or_undefined_behaviour() {
    if env_is(cuda::emu::CHECKED_ENV) {
        return; // the child process itself
    }
    if emu().is_none() {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["emu_", "--skip", "emu_checked_build"])
        // Left out: tests of the host's plumbing around kernels that the step tests launch with
        // the same arguments (graph replays, the bench's timing, capture's fallbacks, training's
        // files), and the launch count of the shipped configs' steps, whose kernels the per-op
        // cases run too (86 s of the checked rerun's five minutes on two cores).
        .args(["--skip", "emu_graph_steps_equal_eager_steps"])
        .args(["--skip", "emu_launches_per_step_of_the_shipped_configs"])
        .args([
            "--skip",
            "emu_trains_evaluates_checkpoints_and_resumes_end_to_end",
        ])
        .args(["--skip", "emu_bench_times_every_kernel_launch_of_a_step"])
        .args(["--skip", "emu_failed_capture_falls_back_to_eager_steps"])
        .args([
            "--skip",
            "emu_capture_refuses_host_reads_uploads_and_allocations",
        ])
        .env(cuda::emu::CHECKED_ENV, "1")
        .env("SLOTFIX_REQUIRE_EMULATOR", "1");
    // AddressSanitizer too where the compiler has its runtime (the test harness's own
    // allocations are not leaks to report).
    let asan = cuda::emu::asan_runtime();
    if let Some(rt) = &asan {
        child
            .env("LD_PRELOAD", rt)
            .env("ASAN_OPTIONS", "detect_leaks=0");
    }
    let out = child.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut reports: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("runtime error:")
                || l.contains("ERROR: AddressSanitizer")
                || l.starts_with("SUMMARY: AddressSanitizer")
        })
        .collect();
    reports.sort_unstable();
    reports.dedup();
    assert!(
        reports.is_empty(),
        "the checked emulator found errors in the kernels ({} distinct reports):\n{}",
        reports.len(),
        reports.join("\n")
    );
    let ran = text
        .lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or("(no test result line)");
    assert!(
        out.status.success(),
        "the emulator tests failed with the checked build: {ran}\n{text}"
    );
    assert!(
        ran.contains(" passed;") && !ran.contains(" 0 passed;"),
        "no emulator test ran: {ran}"
    );
    eprintln!(
        "checked emulator build (UBSan{}): {ran}",
        if asan.is_some() { " and ASan" } else { "" }
    );
}

/// The machine code the backend falls back to when a driver refuses NVRTC's PTX: a CUDA ELF
/// image (e_machine 190, EM_CUDA) for each file, here for sm_80 and sm_90.
#[test]
fn nvrtc_compiles_machine_code_for_the_ptx_fallback() {
    if !nvrtc_or_skip() {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for name in ["elementwise.cu", "optim.cu"] {
            let f = cuda::kernels::KERNEL_FILES
                .iter()
                .find(|f| f.name == name)
                .unwrap();
            let cubin = cuda::compile_cubin(f, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_elf_for_cuda(&cubin, &format!("{name} {arch}"));
        }
    }
}

/// Whether the PTX `got` is `want` (trimmed), up to a few trailing bytes.
fn same_ptx(got: &str, want: &str) -> bool {
    got.starts_with(want) && got.len() - want.len() < 64
}

/// Where two PTX texts first part: the line number and both lines.
fn first_difference(a: &str, b: &str) -> String {
    match a.lines().zip(b.lines()).position(|(x, y)| x != y) {
        Some(l) => format!(
            "from line {}: {:?} vs {:?}",
            l + 1,
            a.lines().nth(l).unwrap_or(""),
            b.lines().nth(l).unwrap_or("")
        ),
        None => format!("in length: {} vs {} bytes", a.len(), b.len()),
    }
}

/// The kernel cache (`cuda::kcache`): the files compiled as the backend compiles them (in
/// parallel, for the virtual architecture) give the same PTX as the checked compile for the real
/// one, whose machine code the resources test checks; the next call reads every file from the
/// cache without compiling; an entry cut short is compiled again, and only that one.
///
/// All files but the tensor-core convolutions (`conv_tc*`): the cache does the same with any
/// file, and theirs would add minutes of NVRTC to CI for no other check.
#[test]
fn nvrtc_kernel_cache_ptx_matches_the_checked_compile() {
    use cuda::kcache::{ptx_for_all, KernelCache};
    use cuda::kernels::KernelFile;
    if !nvrtc_or_skip() {
        return;
    }
    let (files, checked): (Vec<KernelFile>, Vec<&str>) = checked_compiles("sm_90")
        .iter()
        .filter(|(f, _)| !f.name.starts_with("conv_tc"))
        .map(|(f, c)| (**f, c.ptx.as_str()))
        .unzip();
    assert!(files.iter().any(|f| f.sm90a), "an sm_90a file among them");
    // `ptx_for_all` keeps `&'static` files (as the backend's table is).
    let files: &'static [KernelFile] = Box::leak(files.into_boxed_slice());
    assert!(files.len() >= 10, "{} files", files.len());
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::at(Some(dir.path().to_path_buf()));
    let run = |expect_compiled: usize| {
        let mut compiled = 0;
        let out =
            ptx_for_all(files, "sm_90", &cache, |n| compiled = n).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled, expect_compiled);
        assert_eq!(out.len(), files.len());
        for (o, (f, want)) in out.iter().zip(files.iter().zip(&checked)) {
            assert_eq!(o.file.name, f.name);
            let got = o.ptx.to_src();
            let want = want.trim_end();
            if !same_ptx(&got, want) {
                // NVRTC's PTX of an unchanged attention.cu differed from the checked compile's
                // once, in a loaded CI run (2026-11-27), and not in repeated runs since: compile
                // the file again both ways, one compile at a time. They must agree then.
                let why = first_difference(&got, want);
                let a = f.arch_for("sm_90").unwrap();
                let again = cuda::compile_file(f, a).unwrap().to_src();
                let again_checked = cuda::compile_checked(f, a).unwrap().ptx;
                assert!(
                    same_ptx(&again, again_checked.trim_end()),
                    "{}: the PTX differs from the checked compile's (cached: {}) {why}, and \
                     again when compiled one at a time {}",
                    f.name,
                    o.cached,
                    first_difference(&again, again_checked.trim_end())
                );
                // (Past the harness's capture, so that a passing run's log shows it too.)
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "warning: {}: NVRTC's PTX differed from the checked compile's (cached: {}) \
                     {why}; compiled again one at a time, the two agree",
                    f.name,
                    o.cached
                );
            }
        }
        out.iter().map(|o| o.cached).collect::<Vec<bool>>()
    };
    let n = files.len();
    assert_eq!(run(n), vec![false; n], "first call: everything compiled");
    assert_eq!(
        run(0),
        vec![true; n],
        "second call: everything from the cache"
    );
    let entries: Vec<std::path::PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), n, "one entry per file: {entries:?}");
    // Cut one entry short: that file alone is compiled again.
    let victim = files
        .iter()
        .position(|f| f.name == "elementwise.cu")
        .unwrap();
    let path = entries
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("elementwise-sm_90-")
        })
        .unwrap();
    let text = std::fs::read_to_string(path).unwrap();
    std::fs::write(path, &text[..text.len() / 2]).unwrap();
    let mut want = vec![true; n];
    want[victim] = false;
    assert_eq!(run(1), want, "after truncating elementwise.cu's entry");
    assert_eq!(run(0), vec![true; n], "and then it is cached again");
    // `slotfix compile-kernels` fills the same entries: all there already, then (one cut short
    // again) all but that one, which it compiles.
    let fill = || {
        let mut compiling = 0;
        let filled = cuda::kcache::fill(files, "sm_90", &cache, |n| compiling = n)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(filled.dir, dir.path());
        assert_eq!(compiling, filled.compiled);
        (filled.compiled, filled.cached)
    };
    assert_eq!(fill(), (0, n));
    std::fs::write(path, &text[..text.len() / 3]).unwrap();
    assert_eq!(fill(), (1, n - 1));
    assert_eq!(
        run(0),
        vec![true; n],
        "what it compiled is the backend's entry"
    );
}

/// Every kernel compiles to machine code without spilling registers or local-memory arrays
/// (a per-thread array indexed by a run-time loop bound lives there), and the tensor-core
/// convolutions (256-thread blocks, built around two or more resident blocks per SM so that one
/// block's loads overlap another's `mma`) use at most 128 registers per thread: the occupancy
/// the v3 design assumes, checked before any GPU runs. Prints each kernel's resources.
fn nvrtc_kernel_resources(arch: &'static str) {
    if !nvrtc_or_skip() {
        return;
    }
    let mut seen = 0;
    for (file, compiled) in checked_compiles(arch) {
        let report = &compiled.resources;
        let mut names: Vec<&str> = report.iter().map(|k| k.name.as_str()).collect();
        names.sort();
        let mut want = file.kernels.to_vec();
        want.sort();
        assert_eq!(
            names, want,
            "kernels/{}: ptxas reported other kernels",
            file.name
        );
        for k in report {
            eprintln!(
                "{arch} {:<14} {:<34} {:>3} registers {:>6} B shared {:>4} B local",
                file.name, k.name, k.registers, k.shared_bytes, k.stack_bytes
            );
            assert!(k.registers > 0, "{}: no register count parsed", k.name);
            // One exception, bounded: version 3 of the token chain's backward keeps two tiles
            // of 32 registers, the B fragments and the next input's loads in flight within
            // 128, and ptxas spills a few words (the tile counter and a few addresses held
            // across a product: ~20 local accesses per 16 tokens, against ~3200 instructions;
            // L1 hits).
            let spill_allowed = match k.name.as_str() {
                "tokens_bwd_v3_tf32" => 48,
                _ => 0,
            };
            let spilled = k
                .spill_store_bytes
                .max(k.spill_load_bytes)
                .max(k.stack_bytes);
            assert!(
                spilled <= spill_allowed,
                "{arch}: {} spills registers or keeps arrays in local memory ({}, {} and {} bytes \
                 of spill stores, loads and stack; {spill_allowed} allowed)",
                k.name,
                k.spill_store_bytes,
                k.spill_load_bytes,
                k.stack_bytes
            );
            // (The 32-row dW v4 blocks have 128 threads: four per SM at stride 1, within 128
            // registers as the others; three at stride 2, within 168.)
            // The dW v5 blocks (128 threads) three per SM, within 168; so the wgmma passes'
            // (version 7: one warpgroup).
            let dw5 = k.name.starts_with("conv_dw_partial_v5");
            let wg5 = k.name.contains("_wg5");
            let (most, blocks) = match k.name.contains("_v4r32") && k.name.contains("s2_") {
                true => (168, "three 128-thread"),
                false if dw5 || wg5 => (168, "three 128-thread"),
                false if k.name.contains("_v4r32") => (128, "four 128-thread"),
                false => (128, "two 256-thread"),
            };
            if k.name.contains("_v3") || k.name.contains("_v4") || dw5 || wg5 {
                assert!(
                    k.registers <= most,
                    "{arch}: {} uses {} registers: fewer than {blocks} blocks per SM",
                    k.name,
                    k.registers
                );
            }
            seen += 1;
        }
    }
    assert!(seen > 50, "{seen} kernels reported");
}

#[test]
fn nvrtc_kernel_resources_sm80() {
    nvrtc_kernel_resources("sm_80");
}

#[test]
fn nvrtc_kernel_resources_sm90() {
    nvrtc_kernel_resources("sm_90");
}

// ---------------------------------------------------------------------------------------------
// GPU parity tests.

use cuda::{Cuda, FastPaths};
use slotfix::backend::{AdamStep, Backend};
use slotfix::config::{Config, DecoderKind, ModelConfig, Precision};
use slotfix::cpu::Cpu;
use slotfix::ops::attention::AttnDims;
use slotfix::ops::bcastconv::{
    bcast_conv_bwd_by_ops, bcast_conv_fwd_by_ops, BcastConvDims, BcastConvGrads, BcastConvParams,
};
use slotfix::ops::conv::ConvGeom;
use slotfix::ops::elementwise::DropoutMask;
use slotfix::ops::slotcell::{self, SlotCellDims};
use slotfix::ops::tokens::{
    TokenActs, TokenDims, TokenGradActs, TokenGrads, TokenOutGrads, TokenParams,
};
use slotfix::rng::Philox;
use slotfix::train::{MemoryPlan, Session};
use std::collections::BTreeMap;

/// Relative L2 error allowed between a GPU result and `Cpu<f32>` (f32 rounding, different
/// summation orders).
const TOL: f64 = 1e-5;

/// Relative L2 error allowed for the gradients of a whole training step. Measured on these
/// configs, `Cpu<f32>` itself is up to 6.6e-6 away from `Cpu<f64>` (project_q / project_k
/// weights: cancellations through the softmax over slots, over several iterations); a second
/// f32 implementation with other summation orders can be as far again, so 1e-5 would fail on
/// rounding alone. Any indexing or accumulation bug gives errors of order 1.
const STEP_GRAD_TOL: f64 = 5e-5;

/// Relative L2 error allowed for a TF32 tensor-core result against the f32 CPU reference: TF32
/// keeps 10 mantissa bits (relative rounding 2^-11 ≈ 4.9e-4 per operand).
const TF32_TOL: f64 = 1e-3;
/// The token chain's under TF32: its LayerNorm parameters' gradients at 8 channels are sums over
/// 1152 tokens of two TF32 products each (dβ0: 9.8e-4 from d k and d v, 1.0e-3 from d u).
const TOKENS_TF32_TOL: f64 = 1.5e-3;

/// The CUDA backend with its kernels in the emulator, or None (with a printed reason) when no C++
/// compiler is found; a failure under SLOTFIX_REQUIRE_EMULATOR=1. A compiler that rejects the
/// kernels is a failure.
fn emu() -> Option<Cuda> {
    if let Some(why) = cuda::emu::unavailable_reason() {
        assert!(
            !env_is("SLOTFIX_REQUIRE_EMULATOR"),
            "SLOTFIX_REQUIRE_EMULATOR=1 but: {why}"
        );
        say_skipped(&why);
        return None;
    }
    Some(Cuda::emulated().unwrap_or_else(|e| panic!("{e}")))
}

/// The emulator for a test's repeat with exact TF32 products; none in the checked build's rerun
/// (`emu_checked_build_finds_no_memory_error_or_undefined_behaviour`): how the products round
/// changes no address that a kernel reads or writes, so the rerun's pass with rounded products
/// has already put the same memory traffic under the sanitizers.
fn emu_exact_repeat() -> Option<Cuda> {
    if env_is(cuda::emu::CHECKED_ENV) {
        return None;
    }
    emu().map(|g| g.with_precision(Precision::Tf32).with_emulator_exact_tf32())
}

/// The CUDA backend, or None (with a printed reason) when there is no driver / GPU; a failure
/// under SLOTFIX_REQUIRE_GPU=1.
fn gpu() -> Option<Cuda> {
    match Cuda::new(0) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(!require_gpu(), "SLOTFIX_REQUIRE_GPU=1 but: {e}");
            say_skipped(&e);
            None
        }
    }
}

fn cpu() -> Cpu<f32> {
    Cpu::<f32>::new()
}

/// Uniform in [−scale, scale), reproducible from `seed`.
fn rand(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let r = Philox::new(seed);
    (0..n)
        .map(|i| (2.0 * r.uniform(9, 0, i as u64) - 1.0) as f32 * scale)
        .collect()
}

fn up<B: Backend>(g: &B, v: &[f32]) -> B::Buf {
    let mut b = g.alloc(v.len());
    g.upload_f32(v, &mut b);
    b
}

/// A device buffer full of NaN: any element a kernel fails to write shows up.
fn poisoned<B: Backend>(g: &B, n: usize) -> B::Buf {
    up(g, &vec![f32::NAN; n])
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum();
    if num == 0.0 {
        0.0
    } else {
        (num / den.max(1e-300)).sqrt()
    }
}

/// Download `buf` and compare it with the CPU's `want`; NaN or Inf fails.
fn check<B: Backend>(what: &str, g: &B, buf: &B::Buf, want: &[f32]) {
    check_tol(what, g, buf, want, TOL);
}

fn check_tol<B: Backend>(what: &str, g: &B, buf: &B::Buf, want: &[f32], tol: f64) {
    check_values(what, &g.download_f32(buf), want, tol);
}

/// [`check_tol`] of values already on the host.
fn check_values(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: element {i} is {} (CPU {})", got[i], want[i]);
    }
    let e = rel_err(got, want);
    eprintln!("{what}: relative L2 error {e:.2e}");
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:e}");
}

/// A convolution's forward, or (`transposed`) a transposed convolution's.
#[allow(clippy::too_many_arguments)]
fn conv_fwd<B: Backend>(
    b: &B,
    transposed: bool,
    geom: &ConvGeom,
    batch: usize,
    x: &B::Buf,
    w: &B::Buf,
    bias: &B::Buf,
    relu: bool,
    y: &mut B::Buf,
) {
    if transposed {
        b.conv_t2d_fwd(geom, batch, x, w, bias, relu, y);
    } else {
        b.conv2d_fwd(geom, batch, x, w, bias, relu, y);
    }
}

fn conv_case<B: Backend>(
    g: &B,
    name: &str,
    geom: ConvGeom,
    transposed: bool,
    relu: bool,
    seed: u64,
    tol: f64,
) {
    let c = cpu();
    let batch = 3;
    let x = rand(batch * geom.in_len(), seed, 1.0);
    let w = rand(geom.weight_len(), seed + 1, 0.5);
    let b = rand(geom.c_out, seed + 2, 0.5);
    let mut y = vec![0.0f32; batch * geom.out_len()];
    let (xg, wg, bg) = (up(g, &x), up(g, &w), up(g, &b));
    let mut yg = poisoned(g, y.len());
    conv_fwd(&c, transposed, &geom, batch, &x, &w, &b, relu, &mut y);
    conv_fwd(g, transposed, &geom, batch, &xg, &wg, &bg, relu, &mut yg);
    check_tol(&format!("{name} y"), g, &yg, &y, tol);
    // Backward from the CPU's y (same ReLU mask on both sides), into non-zero gradients.
    let yg = up(g, &y);
    let dy = rand(y.len(), seed + 3, 1.0);
    let dyg = up(g, &dy);
    let mut dx = rand(x.len(), seed + 4, 0.5);
    let mut dw = rand(w.len(), seed + 5, 0.5);
    let mut db = rand(b.len(), seed + 6, 0.5);
    let (mut dxg, mut dwg, mut dbg) = (up(g, &dx), up(g, &dw), up(g, &db));
    for with_dx in [true, false] {
        if transposed {
            c.conv_t2d_bwd(
                &geom,
                batch,
                &x,
                &w,
                &y,
                relu,
                &dy,
                with_dx.then_some(&mut dx),
                &mut dw,
                &mut db,
            );
            g.conv_t2d_bwd(
                &geom,
                batch,
                &xg,
                &wg,
                &yg,
                relu,
                &dyg,
                with_dx.then_some(&mut dxg),
                &mut dwg,
                &mut dbg,
            );
        } else {
            c.conv2d_bwd(
                &geom,
                batch,
                &x,
                &w,
                &y,
                relu,
                &dy,
                with_dx.then_some(&mut dx),
                &mut dw,
                &mut db,
            );
            g.conv2d_bwd(
                &geom,
                batch,
                &xg,
                &wg,
                &yg,
                relu,
                &dyg,
                with_dx.then_some(&mut dxg),
                &mut dwg,
                &mut dbg,
            );
        }
        check_tol(
            &format!("{name} dx (dx given: {with_dx})"),
            g,
            &dxg,
            &dx,
            tol,
        );
        check_tol(
            &format!("{name} dw (dx given: {with_dx})"),
            g,
            &dwg,
            &dw,
            tol,
        );
        check_tol(
            &format!("{name} db (dx given: {with_dx})"),
            g,
            &dbg,
            &db,
            tol,
        );
    }
    // dx overwritten (`conv_bwd_set_dx`) into a poisoned buffer: the CPU's dx from zero.
    let mut dx0 = vec![0.0f32; x.len()];
    let (mut dw1, mut db1) = (dw.clone(), db.clone());
    let mut dxs = poisoned(g, x.len());
    c.conv_bwd_set_dx(
        transposed, &geom, batch, &x, &w, &y, relu, &dy, &mut dx0, &mut dw1, &mut db1,
    );
    g.conv_bwd_set_dx(
        transposed, &geom, batch, &xg, &wg, &yg, relu, &dyg, &mut dxs, &mut dwg, &mut dbg,
    );
    check_tol(&format!("{name} dx (set)"), g, &dxs, &dx0, tol);
    check_tol(&format!("{name} dw (set_dx)"), g, &dwg, &dw1, tol);
}

/// `tc_shapes`: also the 64-channel shapes that versions 3 (k-tiles of 32), 4 and 5 of the
/// tensor-core kernels take (slow in the emulator under the exact-f32 kernels, which they do not
/// concern).
fn conv2d_fwd_bwd_parity<B: Backend>(g: &B, tol: f64, tc_shapes: bool) {
    let case = |name: &str, geom: ConvGeom, relu: bool, seed: u64| {
        conv_case(g, name, geom, false, relu, seed, tol)
    };
    case("same k5", ConvGeom::same(9, 7, 3, 8, 5), true, 10);
    case("same k3", ConvGeom::same(6, 6, 5, 4, 3), false, 20);
    case("k5 s2 p2", ConvGeom::conv(11, 9, 4, 6, 5, 2, 2), true, 30);
    case("k1", ConvGeom::same(4, 5, 7, 3, 1), false, 40);
    // More positions than threads per block, so the dW reduction strides.
    case("same k3 20x20", ConvGeom::same(20, 20, 2, 3, 3), true, 50);
    // More than one 64-wide tile of channels and of the reduction (the tensor-core kernels).
    case("same k3 24->70", ConvGeom::same(5, 6, 24, 70, 3), true, 60);
    // Channel counts that are multiples of 16 (version 3 of the tensor-core passes): forward
    // (direct gather) and dx (adjoint gather, stride 2, ReLU-masked), two column tiles.
    case(
        "k5 s2 32->16",
        ConvGeom::conv(11, 9, 32, 16, 5, 2, 2),
        true,
        70,
    );
    case("same k3 16->80", ConvGeom::same(6, 5, 16, 80, 3), true, 80);
    // dx of a stride-2 3×3 conv: the adjoint gather's phases (v3).
    case(
        "k3 s2 16->16",
        ConvGeom::conv(9, 8, 16, 16, 3, 2, 1),
        true,
        90,
    );
    // More output rows than one 128-row v3 tile: several full tiles and a partial one.
    case(
        "k3 16->16 12x12",
        ConvGeom::same(12, 12, 16, 16, 3),
        true,
        100,
    );
    // The same with 64 output channels (128 × 64 tiles rather than 256 × 32).
    case(
        "k3 16->64 12x12",
        ConvGeom::same(12, 12, 16, 64, 3),
        false,
        105,
    );
    // A grid at least 16 wide: the weight gradient steps its positions by additions (with
    // wraps into the next row and the next image) instead of dividing.
    case(
        "k3 16->16 20x17",
        ConvGeom::same(20, 17, 16, 16, 3),
        true,
        107,
    );
    // Fewer output channels than one n8 column tile of the mma (the decoders' last layer has 4:
    // RGB + alpha), under version 3: a forward over several 256-row tiles, and the stride-2 dx
    // (phases) of a 6-channel input.
    case(
        "k3 16->4 20x17",
        ConvGeom::same(20, 17, 16, 4, 3),
        false,
        108,
    );
    case(
        "k3 s2 6->16 dx",
        ConvGeom::conv(13, 11, 6, 16, 3, 2, 1),
        true,
        109,
    );
    // At most 4 gathered channels, stride 1 (`conv_c4`: two taps per k-step): the first
    // encoder layer's forward over 3 channels to 64 (2 × 3 tiles per image, both partial) and
    // to 32 (`c4n32`); a "valid" 3×3 over 2 channels to 41 (one partial column tile, an odd
    // count: no paired stores); and dx gathers of 4 and 3 channels through the ReLU mask (the
    // adjoint gather mirrored), the first into 40 channels, the second into 12.
    case(
        "same k5 3->64 13x37 c4",
        ConvGeom::same(13, 37, 3, 64, 5),
        true,
        1091,
    );
    case(
        "same k5 3->32 11x18 c4n32",
        ConvGeom::same(11, 18, 3, 32, 5),
        true,
        1092,
    );
    case(
        "k3 p0 2->41 10x19 c4",
        ConvGeom::conv(10, 19, 2, 41, 3, 1, 0),
        false,
        1093,
    );
    case(
        "same k5 40->4 9x19 c4 dx",
        ConvGeom::same(9, 19, 40, 4, 5),
        true,
        1094,
    );
    case(
        "same k3 12->3 7x20 c4n32 dx",
        ConvGeom::same(7, 20, 12, 3, 3),
        true,
        1095,
    );
    // The weight gradient for at most 4 gathered channels and 32 rows (`dw_c4`) of a 3×3
    // layer over 4 channels (the sums of dy through the ReLU, per row, give db).
    case(
        "same k3 4->32 9x21 dwc4",
        ConvGeom::same(9, 21, 4, 32, 3),
        true,
        1096,
    );
    if !tc_shapes {
        return;
    }
    // Gathered channels a multiple of 32 on 128 × 64 tiles (k-tiles of 32, `*_v3_k32_*`):
    // 64 → 64 with stride 2, its forward (64 channels: two k-tiles per tap) and its dx through
    // the phases; then 32 → 64 on a grid of two row tiles (the second partial), whose dx (32
    // columns: 256 × 32 tiles) keeps k-tiles of 16.
    case(
        "k5 s2 64->64 k32",
        ConvGeom::conv(13, 11, 64, 64, 5, 2, 2),
        true,
        111,
    );
    case(
        "k3 32->64 12x12 k32",
        ConvGeom::same(12, 12, 32, 64, 3),
        true,
        112,
    );
    // Version 4 of the weight gradient (64 rows, 32 gathered channels, a row of taps per
    // block): 5×5 over a grid 21 wide (a grid row's second unit of 16 positions is partial)
    // with 128 rows (two row tiles); and 3×3 stride 2 over a grid narrower than one unit.
    case(
        "k5 32->128 9x21 dw4",
        ConvGeom::same(9, 21, 32, 128, 5),
        true,
        113,
    );
    case(
        "k3 s2 64->64 dw4",
        ConvGeom::conv(9, 13, 64, 64, 3, 2, 1),
        false,
        114,
    );
    // Its 32-row blocks (`v4r32`, 128 threads: each thread loads 3 strip quads at stride 2):
    // 96 rows (three row tiles) of a 3×3 stride-2 layer over a grid of two units per row.
    // (The 32 → 32 layers below take them at stride 1.)
    case(
        "k3 s2 32->96 11x19 dw4r32",
        ConvGeom::conv(11, 19, 32, 96, 3, 2, 1),
        true,
        1141,
    );
    // Its units of 40 positions (`u40`: 32-row blocks, stride 1, grids 33 to 40 wide, one unit
    // per grid row, the last 8 of a unit's A positions past the 32 its threads' first two
    // loads cover): 5×5 over 35 wide (5 positions of the unit past the row), 3×3 over 40 (a
    // whole unit). The transposed 5×5 below sums g over units of 40 (its bias gradient).
    case(
        "same k5 32->32 5x35 dw4r32 u40",
        ConvGeom::same(5, 35, 32, 32, 5),
        true,
        1142,
    );
    case(
        "same k3 32->32 3x40 dw4r32 u40",
        ConvGeom::same(3, 40, 32, 32, 3),
        false,
        1143,
    );
    // Units of 32 (`u32`: 64-row blocks over grid rows a multiple of 32 wide): 5×5 over rows
    // of 64 (two units each), and 3×3 stride 2 whose output rows are 32 wide. The transposed
    // stride-2 5×5 below sums g over units of 32.
    case(
        "same k5 64->64 2x64 dw4 u32",
        ConvGeom::same(2, 64, 64, 64, 5),
        true,
        1144,
    );
    case(
        "k3 s2 64->64 5x63 dw4 u32",
        ConvGeom::conv(5, 63, 64, 64, 3, 2, 1),
        false,
        1145,
    );
    // Version 5 of the weight gradient (5×5 at stride 1 in units of 32, 4 warps of 64 rows;
    // where the device has wgmma, as the emulator has, its wgmma form, `dw_wgmma`; dy masked as
    // A and summed for db): the 5×5 "same" case above, and 128 rows over rows 32 wide (two row
    // tiles, one unit per grid row). A stride-2 5×5 into output rows 32 wide: version 4's units
    // of 32 (strips of 67 pixels), or the wgmma form at stride 2 (`emu_conv_dw_without_wgmma`
    // runs both forms of both).
    case(
        "same k5 64->128 3x32 dw5",
        ConvGeom::same(3, 32, 64, 128, 5),
        true,
        1146,
    );
    case(
        "k5 s2 64->64 6x64 dw4 u32",
        ConvGeom::conv(6, 64, 64, 64, 5, 2, 2),
        true,
        1147,
    );
    // Version 5 of the activation passes (stride 1, 64 gathered channels, a halo tile per 8 × 16
    // output pixels): a 5×5 "same" layer over 2 × 3 tiles per image (both partial at the far
    // edges), its dx the mirrored (adjoint) gather; a "valid" 5×5 (pad 0); and a 3×3 to 96
    // channels (two column tiles, the second partial).
    case(
        "same k5 64->64 13x37 v5",
        ConvGeom::same(13, 37, 64, 64, 5),
        true,
        115,
    );
    case(
        "k5 p0 64->64 v5",
        ConvGeom::conv(12, 21, 64, 64, 5, 1, 0),
        false,
        116,
    );
    case(
        "same k3 64->96 9x17 v5",
        ConvGeom::same(9, 17, 64, 96, 3),
        true,
        117,
    );
    // At most 8 outputs: the 8-column version 5 tiles (`v5n8`; its forward streamed,
    // `conv_n8s`, as is the dx of a 5×5 from 8 channels without a ReLU, an adjoint gather).
    case(
        "same k5 64->8 10x17 v5n8",
        ConvGeom::same(10, 17, 64, 8, 5),
        true,
        118,
    );
    case(
        "same k5 8->64 9x19 n8s dx",
        ConvGeom::same(9, 19, 8, 64, 5),
        false,
        119,
    );
    // Stride 2 with 64 channels (`v5s2`): the forward (the direct gather, the four source
    // phases in turn) over 2 × 2 tiles, and its dx (the adjoint gather, a phase per z) over
    // 2 × 2 tiles of each phase; the last tiles partial both ways.
    case(
        "k5 s2 64->64 21x37 v5s2",
        ConvGeom::conv(21, 37, 64, 64, 5, 2, 2),
        true,
        1185,
    );
    // 32 gathered channels into at most 32 (`v5c32` tiles of up to 128 pixels of any width
    // from 8 to 24, whose m16 fragments run across tile rows; into 9 to 32, version 6's warps of
    // 32 pixels, two fragments with a row address each): 13 × 21 takes 6 × 21 tiles (3 per
    // image, the last partial: the last warp's last 2 pixels lie past it), and its dx the same;
    // 9 × 30 into 20 channels (a partial column tile) takes 8 × 16; and 32 → 4 (`v5c32n8`).
    // (Version 5's 16 × 32 warps, `conv_v6` off, run in the fast-path test's step.)
    case(
        "same k5 32->32 13x21 v5c32",
        ConvGeom::same(13, 21, 32, 32, 5),
        true,
        119,
    );
    case(
        "same k3 32->20 9x30 v5c32",
        ConvGeom::same(9, 30, 32, 20, 3),
        false,
        1191,
    );
    case(
        "same k3 32->4 10x19 v5c32n8",
        ConvGeom::same(10, 19, 32, 4, 3),
        true,
        1192,
    );
    // A conv to at most 4 outputs takes `dw_c4` in the transposed form (rows c_in, g gathered
    // at the mirrored taps with pad k − 1 − pad, the taps written back mirrored): 32 → 4 above
    // (3×3, pad 1), and a 5×5 from 64 channels to 3 with pad 1 (mirrored pad 3) through a ReLU.
    case(
        "k5 p1 64->3 11x19 dwc4 mirrored",
        ConvGeom::conv(11, 19, 64, 3, 5, 1, 1),
        true,
        1193,
    );
}

/// `tc_shapes`: as for [`conv2d_fwd_bwd_parity`].
fn conv_t2d_fwd_bwd_parity<B: Backend>(g: &B, tol: f64, tc_shapes: bool) {
    let t = ConvGeom::transposed;
    let case = |name: &str, geom: ConvGeom, relu: bool, seed: u64| {
        conv_case(g, name, geom, true, relu, seed, tol)
    };
    case("T k5 s2 op1", t(4, 4, 6, 5, 5, 2, 2, 1), true, 110);
    case("T k5 s1", t(5, 6, 3, 4, 5, 1, 2, 0), false, 120);
    case("T k3 s1", t(6, 4, 3, 4, 3, 1, 1, 0), true, 130);
    case("T k3 s2 op1 12x12", t(12, 12, 3, 2, 3, 2, 1, 1), false, 140);
    case("T k5 s2 op1 70->20", t(3, 4, 70, 20, 5, 2, 2, 1), true, 150);
    // Version 3 (channels multiples of 16): adjoint gather forward, direct gather dx.
    case("T k5 s2 op1 16->32", t(5, 4, 16, 32, 5, 2, 2, 1), true, 160);
    case("T k5 s1 48->16", t(6, 5, 48, 16, 5, 1, 2, 0), false, 170);
    // Stride 2 with k = 3 (phases with 4, 2, 2 and 1 taps) and with k = 1 (three of the four
    // phases have no tap at all: bias only).
    case("T k3 s2 op1 16->16", t(5, 3, 16, 16, 3, 2, 1, 1), true, 180);
    case(
        "T k1 s2 op1 16->16",
        t(3, 4, 16, 16, 1, 2, 0, 1),
        false,
        190,
    );
    // Phases of more than one 128-row tile.
    case(
        "T k5 s2 op1 16->16 8x8",
        t(8, 8, 16, 16, 5, 2, 2, 1),
        true,
        200,
    );
    // Input grid at least 16 wide (the convT weight gradient reduces over the input grid).
    case(
        "T k3 s2 op1 16->16 9x17",
        t(9, 17, 16, 16, 3, 2, 1, 1),
        true,
        210,
    );
    // Fewer output channels than one n8 column tile, under version 3: the decoders' last layer
    // (stride 1, to RGB + alpha), a stride-2 one with 3 columns (phases), and the dx of a
    // 4-channel input (direct gather).
    case(
        "T k3 s1 16->4 20x17",
        t(20, 17, 16, 4, 3, 1, 1, 0),
        false,
        220,
    );
    case("T k3 s2 op1 16->3", t(7, 6, 16, 3, 3, 2, 1, 1), true, 230);
    case(
        "T k5 s2 op1 4->16 dx",
        t(6, 5, 4, 16, 5, 2, 2, 1),
        true,
        240,
    );
    // At most 4 gathered channels, stride 1 (`conv_c4`): the dx of a last layer to RGB +
    // alpha (a direct gather of 4 channels into 24), and a 5×5 forward with pad 0 from 3
    // channels (the mirrored gather, pad 4) into 20.
    case(
        "T k3 s1 24->4 9x20 c4n32 dx",
        t(9, 20, 24, 4, 3, 1, 1, 0),
        false,
        241,
    );
    case(
        "T k5 s1 p0 3->20 6x9 c4n32",
        t(6, 9, 3, 20, 5, 1, 0, 0),
        true,
        242,
    );
    // A 3×3 convT from 32 channels to 4 through a ReLU: its weight gradient on `dw_c4` (32
    // rows, the gathered g masked; db from a column-sum pass) and its dx on `conv_c4`.
    case(
        "T k3 s1 32->4 7x18 dwc4",
        t(7, 18, 32, 4, 3, 1, 1, 0),
        true,
        243,
    );
    // The clevr6 decoder's last layer in small: 64 rows, 4 channels gathered, no ReLU (on
    // `dw_c4_tc`, A unmasked, two row groups of warps).
    case(
        "T k3 s1 64->4 9x21 dwc4",
        t(9, 21, 64, 4, 3, 1, 1, 0),
        false,
        244,
    );
    if !tc_shapes {
        return;
    }
    // k-tiles of 32: the decoders' 64-channel stride-2 layer (forward: adjoint gather through
    // the phases; dx: direct gather), and 32 → 96, whose forward has two column tiles (the
    // second partial).
    case(
        "T k5 s2 op1 64->64 k32",
        t(5, 4, 64, 64, 5, 2, 2, 1),
        true,
        250,
    );
    case(
        "T k3 s1 32->96 k32",
        t(7, 6, 32, 96, 3, 1, 1, 0),
        false,
        260,
    );
    // Version 4 of the weight gradient with the bias gradient from its sums of g: the decoder's
    // 5×5 stride-1 layer on an input grid 18 wide (two units per grid row, the second of 2
    // positions), and a 3×3 one from 64 to 32 channels.
    case(
        "T k5 s1 64->64 18 wide dw4",
        t(5, 18, 64, 64, 5, 1, 2, 0),
        true,
        270,
    );
    case("T k3 s1 64->32 dw4", t(6, 7, 64, 32, 3, 1, 1, 0), true, 280);
    // The same on 32-row blocks at stride 2: a unit's strip is 35 pixels, and a thread's strip
    // quads (16 pixels apart) can both lie in the 32 pixels whose g it sums for db.
    case(
        "T k5 s2 op1 32->32 5x9 dw4r32",
        t(5, 9, 32, 32, 5, 2, 2, 1),
        true,
        281,
    );
    // Version 5 for a transposed convolution: its forward is the mirrored gather. 3×3 with pad
    // 0 (the output grows by 2: the mirrored pad is 2), and the decoder's 5×5 "same" layer
    // over more than one tile each way.
    case(
        "T k3 s1 p0 64->64 v5",
        t(5, 7, 64, 64, 3, 1, 0, 0),
        true,
        290,
    );
    case(
        "T k5 s1 64->64 10x20 v5",
        t(10, 20, 64, 64, 5, 1, 2, 0),
        false,
        300,
    );
    // The decoders' last layer: 3×3 to RGB + alpha, on the 8-column tiles (its forward
    // streamed, `conv_n8s`); and the dx of a 3×3 from RGB + alpha to 64 without a ReLU (a
    // direct gather of 64 channels into 4, streamed too).
    case(
        "T k3 s1 64->4 9x20 v5n8",
        t(9, 20, 64, 4, 3, 1, 1, 0),
        false,
        310,
    );
    case(
        "T k3 s1 4->64 10x18 n8s dx",
        t(10, 18, 4, 64, 3, 1, 1, 0),
        false,
        311,
    );
    // Version 5 for the forward of a stride-2 transposed convolution (`v5s2`, a phase per z):
    // 3×3 (phases of 1 × 1 to 2 × 2 taps) and 5×5 into 48 channels over 2 × 2 tiles per phase
    // (the second of each partial; a partial column tile).
    case(
        "T k3 s2 op1 64->64 9x7 v5s2",
        t(9, 7, 64, 64, 3, 2, 1, 1),
        true,
        311,
    );
    case(
        "T k5 s2 op1 64->48 9x18 v5s2",
        t(9, 18, 64, 48, 5, 2, 2, 1),
        false,
        312,
    );
    // The small decoders' 32-channel layer as a transposed convolution (the mirrored gather
    // on `v5c32` tiles, version 6).
    case(
        "T k5 s1 32->32 7x12 v5c32",
        t(7, 12, 32, 32, 5, 1, 2, 0),
        true,
        320,
    );
    // Over an input 34 wide: its dW in units of 40 (`u40`), with the bias gradient from the
    // units' sums of g.
    case(
        "T k5 s1 32->32 4x34 u40",
        t(4, 34, 32, 32, 5, 1, 2, 0),
        false,
        321,
    );
    // A stride-1 5×5 over an input 32 wide: its dW by version 5 (`dw5`, or its wgmma form: g
    // gathered through y's ReLU as B, the bias gradient from the units' sums of g, as clevr6's
    // decoder).
    case(
        "T k5 s1 64->64 2x32 dw5",
        t(2, 32, 64, 64, 5, 1, 2, 0),
        true,
        323,
    );
    // A stride-2 5×5 from an input 32 wide: its dW in units of 32 (`u32`, or the wgmma form at
    // stride 2), the bias gradient from the units' sums of g over 64-pixel output strips.
    case(
        "T k5 s2 op1 64->64 2x32 u32",
        t(2, 32, 64, 64, 5, 2, 2, 1),
        true,
        322,
    );
}

fn linear_fwd_bwd_parity<B: Backend>(g: &B, tol: f64) {
    let c = cpu();
    // (rows, n_in, n_out, bias, relu); 2500 rows > the 1024-row chunk of the dW partials;
    // 50 × 12 → 28: the narrow version 3 dW tile, whose 4 positions per thread wrap the 1 × 1
    // grid three times. 32 → 6: fewer columns than one n8 column tile, under version 3. 64 →
    // 64 (with bias and ReLU: A masked, its row sums db; 33 position tiles, the last partial)
    // and 64 → 128 (two row tiles): the streamed 1×1 weight gradient under TF32 (`dw_k1`), as
    // is 64 → 192 over a single tile.
    let cases = [
        (37, 20, 33, true, true),
        (5, 3, 70, false, false),
        (2500, 17, 9, true, true),
        (1, 1, 1, true, false),
        (64, 64, 192, true, false),
        (50, 12, 28, true, true),
        (300, 32, 6, true, false),
        (2100, 64, 64, true, true),
        (700, 64, 128, false, false),
    ];
    for (ci, &(rows, n_in, n_out, bias, relu)) in cases.iter().enumerate() {
        let name = format!("linear {rows}x{n_in}->{n_out} bias {bias} relu {relu}");
        let s = 1000 + 10 * ci as u64;
        let x = rand(rows * n_in, s, 1.0);
        let w = rand(n_out * n_in, s + 1, 0.5);
        let b = rand(n_out, s + 2, 0.5);
        let mut y = vec![0.0f32; rows * n_out];
        c.linear_fwd(rows, n_in, n_out, &x, &w, bias.then_some(&b), relu, &mut y);
        let (xg, wg, bg) = (up(g, &x), up(g, &w), up(g, &b));
        let mut yg = poisoned(g, y.len());
        g.linear_fwd(
            rows,
            n_in,
            n_out,
            &xg,
            &wg,
            bias.then_some(&bg),
            relu,
            &mut yg,
        );
        check_tol(&format!("{name} y"), g, &yg, &y, tol);
        let yg = up(g, &y);
        let dy = rand(y.len(), s + 3, 1.0);
        let dyg = up(g, &dy);
        let mut dx = rand(x.len(), s + 4, 0.5);
        let mut dw = rand(w.len(), s + 5, 0.5);
        let mut db = rand(b.len(), s + 6, 0.5);
        let (mut dxg, mut dwg, mut dbg) = (up(g, &dx), up(g, &dw), up(g, &db));
        for with_dx in [true, false] {
            c.linear_bwd(
                rows,
                n_in,
                n_out,
                &x,
                &w,
                &y,
                relu,
                &dy,
                with_dx.then_some(&mut dx),
                &mut dw,
                bias.then_some(&mut db),
            );
            g.linear_bwd(
                rows,
                n_in,
                n_out,
                &xg,
                &wg,
                &yg,
                relu,
                &dyg,
                with_dx.then_some(&mut dxg),
                &mut dwg,
                bias.then_some(&mut dbg),
            );
            check_tol(&format!("{name} dx"), g, &dxg, &dx, tol);
            check_tol(&format!("{name} dw"), g, &dwg, &dw, tol);
            check_tol(&format!("{name} db"), g, &dbg, &db, tol);
        }
    }
}

fn layernorm_fwd_bwd_parity<B: Backend>(g: &B) {
    let c = cpu();
    // (1100 rows: 18 blocks of partial parameter sums, more than sum_partials_f32's 8 groups.)
    for (ci, &(rows, dim)) in [(50, 64), (7, 100), (3, 5), (300, 32), (1100, 24)]
        .iter()
        .enumerate()
    {
        let name = format!("layernorm {rows}x{dim}");
        let s = 2000 + 10 * ci as u64;
        let mut x = rand(rows * dim, s, 2.0);
        x.iter_mut().for_each(|v| *v += 0.5); // a non-zero mean
        let gamma = rand(dim, s + 1, 1.0);
        let beta = rand(dim, s + 2, 1.0);
        let (mut y, mut mean, mut rstd) = (vec![0.0; rows * dim], vec![0.0; rows], vec![0.0; rows]);
        c.layernorm_fwd(rows, dim, &x, &gamma, &beta, &mut y, &mut mean, &mut rstd);
        let (xg, gg, bg) = (up(g, &x), up(g, &gamma), up(g, &beta));
        let (mut yg, mut mg, mut rg) = (poisoned(g, y.len()), poisoned(g, rows), poisoned(g, rows));
        g.layernorm_fwd(rows, dim, &xg, &gg, &bg, &mut yg, &mut mg, &mut rg);
        check(&format!("{name} y"), g, &yg, &y);
        check(&format!("{name} mean"), g, &mg, &mean);
        check(&format!("{name} rstd"), g, &rg, &rstd);
        let (mg, rg) = (up(g, &mean), up(g, &rstd));
        let dy = rand(y.len(), s + 3, 1.0);
        let mut dx = rand(x.len(), s + 4, 0.5);
        let mut dgm = rand(dim, s + 5, 0.5);
        let mut dbt = rand(dim, s + 6, 0.5);
        let (dyg, mut dxg, mut dgg, mut dbg) = (up(g, &dy), up(g, &dx), up(g, &dgm), up(g, &dbt));
        c.layernorm_bwd(
            rows, dim, &x, &gamma, &mean, &rstd, &dy, &mut dx, &mut dgm, &mut dbt,
        );
        g.layernorm_bwd(
            rows, dim, &xg, &gg, &mg, &rg, &dyg, &mut dxg, &mut dgg, &mut dbg,
        );
        check(&format!("{name} dx"), g, &dxg, &dx);
        check(&format!("{name} dgamma"), g, &dgg, &dgm);
        check(&format!("{name} dbeta"), g, &dbg, &dbt);
    }
}

fn posembed_fwd_bwd_parity<B: Backend>(g: &B) {
    let c = cpu();
    for (ci, &(h, w, ch, nimg)) in [(5, 7, 6, 3), (1, 4, 3, 2), (20, 20, 8, 2)]
        .iter()
        .enumerate()
    {
        let name = format!("posembed {h}x{w}x{ch}");
        let s = 3000 + 10 * ci as u64;
        let wp = rand(ch * 4, s, 1.0);
        let bp = rand(ch, s + 1, 1.0);
        let (wpg, bpg) = (up(g, &wp), up(g, &bp));
        let len = nimg * h * w * ch;
        // Encoder: in place.
        let mut x = rand(len, s + 2, 1.0);
        let mut xg = up(g, &x);
        c.softpos_add_fwd(h, w, ch, &wp, &bp, &mut x);
        g.softpos_add_fwd(h, w, ch, &wpg, &bpg, &mut xg);
        check(&format!("{name} softpos y"), g, &xg, &x);
        let dy = rand(len, s + 3, 1.0);
        let dyg = up(g, &dy);
        let mut dwp = rand(ch * 4, s + 4, 0.5);
        let mut dbp = rand(ch, s + 5, 0.5);
        let (mut dwpg, mut dbpg) = (up(g, &dwp), up(g, &dbp));
        c.softpos_add_bwd(h, w, ch, &dy, &mut dwp, &mut dbp);
        g.softpos_add_bwd(h, w, ch, &dyg, &mut dwpg, &mut dbpg);
        check(&format!("{name} softpos dW"), g, &dwpg, &dwp);
        check(&format!("{name} softpos db"), g, &dbpg, &dbp);
        // Decoder: broadcast.
        let z = rand(nimg * ch, s + 6, 1.0);
        let zg = up(g, &z);
        let mut y = vec![0.0; len];
        let mut yg = poisoned(g, len);
        c.broadcast_pos_fwd(h, w, ch, &z, &wp, &bp, &mut y);
        g.broadcast_pos_fwd(h, w, ch, &zg, &wpg, &bpg, &mut yg);
        check(&format!("{name} broadcast y"), g, &yg, &y);
        let mut dz = rand(z.len(), s + 7, 0.5);
        let mut dzg = up(g, &dz);
        c.broadcast_pos_bwd(h, w, ch, &dy, &mut dz, &mut dwp, &mut dbp);
        g.broadcast_pos_bwd(h, w, ch, &dyg, &mut dzg, &mut dwpg, &mut dbpg);
        check(&format!("{name} broadcast dz"), g, &dzg, &dz);
        check(&format!("{name} broadcast dW"), g, &dwpg, &dwp);
        check(&format!("{name} broadcast db"), g, &dbpg, &dbp);
    }
}

fn attention_fwd_bwd_parity<B: Backend>(g: &B) {
    let c = cpu();
    // (batch, n, k, d, heads, eps); n = 300 and 600: more tokens than one 256-token block (the
    // CUDA kernels' version 2 splits them into chunks, the last one partial); k = 17: above
    // the 16 slots version 2 keeps in registers, so version 1 runs; k = 16: the last that
    // version 2 takes. Head widths 6 and 5 (and d = 10): version 2's rows read one float at a
    // time instead of four. d = 64 (the models' width: 65 sums per slot, 3 token groups) and
    // d = 300 (more sums per slot than threads per block: no groups, two column blocks).
    // Version 3 (k ≤ 8; head widths 8, 16, 32, 64) takes the cases of head widths 64, 32, 16
    // and 8: (2, 300, 4, 64) is the tetrominoes model's attention (k = 4), (1, 520, 8, 32) its
    // k = 8 and three chunks, the last of 8 tokens (a partial warp and 31 empty ones); with
    // eps = 1e-2 (which 1e-8 leaves below f32's resolution of the weights), (2, 260, 4, 16) for
    // k = 4 and (1, 300, 5, 32) for k = 8 check that version 3 adds eps to the weights and not
    // to the attention.
    let cases = [
        (2, 300, 4, 64, 1, 1e-8),
        (1, 520, 8, 32, 1, 1e-8),
        (2, 260, 4, 16, 1, 1e-2),
        (1, 300, 5, 32, 1, 1e-2),
        (1, 70, 6, 16, 1, 1e-8),
        (2, 300, 7, 64, 1, 1e-8),
        (1, 300, 3, 300, 1, 1e-8),
        (3, 50, 5, 8, 1, 1e-8),
        (2, 300, 7, 16, 2, 1e-8),
        (2, 40, 3, 12, 3, 1e-2),
        (2, 600, 4, 8, 1, 1e-8),
        (2, 70, 17, 8, 1, 1e-8),
        (2, 300, 16, 12, 2, 1e-8),
        (1, 270, 6, 10, 2, 1e-8),
    ];
    for (ci, &(batch, n, k, d, heads, eps)) in cases.iter().enumerate() {
        let dm = AttnDims {
            batch,
            n,
            k,
            d,
            heads,
            scale: 1.0 / ((d / heads) as f64).sqrt(),
            eps,
        };
        let name = format!("attention B{batch} N{n} K{k} D{d} H{heads}");
        let s = 4000 + 10 * ci as u64;
        let kk = rand(batch * n * d, s, 1.5);
        let v = rand(batch * n * d, s + 1, 1.0);
        let q = rand(batch * k * d, s + 2, 1.5);
        let (mut attn, mut upd) = (vec![0.0; dm.attn_len()], vec![0.0; batch * k * d]);
        c.attention_fwd(&dm, &kk, &v, &q, &mut attn, &mut upd);
        let (kg, vg, qg) = (up(g, &kk), up(g, &v), up(g, &q));
        let (mut ag, mut ug) = (poisoned(g, attn.len()), poisoned(g, upd.len()));
        g.attention_fwd(&dm, &kg, &vg, &qg, &mut ag, &mut ug);
        check(&format!("{name} attn"), g, &ag, &attn);
        check(&format!("{name} upd"), g, &ug, &upd);
        let ag = up(g, &attn);
        let du = rand(upd.len(), s + 3, 1.0);
        let dug = up(g, &du);
        let mut dk = rand(kk.len(), s + 4, 0.5);
        let mut dv = rand(v.len(), s + 5, 0.5);
        let mut dq = rand(q.len(), s + 6, 0.5);
        let (mut dkg, mut dvg, mut dqg) = (up(g, &dk), up(g, &dv), up(g, &dq));
        c.attention_bwd(&dm, &kk, &v, &q, &attn, &du, &mut dk, &mut dv, &mut dq);
        g.attention_bwd(&dm, &kg, &vg, &qg, &ag, &dug, &mut dkg, &mut dvg, &mut dqg);
        check(&format!("{name} dk"), g, &dkg, &dk);
        check(&format!("{name} dv"), g, &dvg, &dv);
        check(&format!("{name} dq"), g, &dqg, &dq);
        // k and v the same tensor (the fold): the forward on it, and d k + d v into one buffer
        // (every kernel version hands it the same pointer twice).
        c.attention_fwd(&dm, &kk, &kk, &q, &mut attn, &mut upd);
        let (mut ag, mut ug) = (poisoned(g, attn.len()), poisoned(g, upd.len()));
        g.attention_fwd(&dm, &kg, &kg, &qg, &mut ag, &mut ug);
        check(&format!("{name}, k = v, attn"), g, &ag, &attn);
        check(&format!("{name}, k = v, upd"), g, &ug, &upd);
        let ag = up(g, &attn);
        let mut dx = rand(kk.len(), s + 7, 0.5);
        let mut dq = rand(q.len(), s + 8, 0.5);
        let (mut dxg, mut dqg) = (up(g, &dx), up(g, &dq));
        c.attention_bwd_same_kv(&dm, &kk, &q, &attn, &du, &mut dx, &mut dq);
        g.attention_bwd_same_kv(&dm, &kg, &qg, &ag, &dug, &mut dxg, &mut dqg);
        check(&format!("{name}, k = v, dk + dv"), g, &dxg, &dx);
        check(&format!("{name}, k = v, dq"), g, &dqg, &dq);
    }
}

fn gru_gates_fwd_bwd_parity<B: Backend>(g: &B) {
    let c = cpu();
    let (rows, d) = (10, 12);
    let gi = rand(rows * 3 * d, 5000, 2.0);
    let gh = rand(rows * 3 * d, 5001, 2.0);
    let h = rand(rows * d, 5002, 1.0);
    let mut hn = vec![0.0; rows * d];
    c.gru_gates_fwd(d, &gi, &gh, &h, &mut hn);
    let (gig, ghg, hg) = (up(g, &gi), up(g, &gh), up(g, &h));
    let mut hng = poisoned(g, hn.len());
    g.gru_gates_fwd(d, &gig, &ghg, &hg, &mut hng);
    check("gru h_new", g, &hng, &hn);
    let dhn = rand(rows * d, 5003, 1.0);
    let mut dgi = rand(gi.len(), 5004, 0.5);
    let mut dgh = rand(gh.len(), 5005, 0.5);
    let mut dh = rand(h.len(), 5006, 0.5);
    let (dhng, mut dgig, mut dghg, mut dhg) = (up(g, &dhn), up(g, &dgi), up(g, &dgh), up(g, &dh));
    c.gru_gates_bwd(d, &gi, &gh, &h, &dhn, &mut dgi, &mut dgh, &mut dh);
    g.gru_gates_bwd(d, &gig, &ghg, &hg, &dhng, &mut dgig, &mut dghg, &mut dhg);
    check("gru dgi", g, &dgig, &dgi);
    check("gru dgh", g, &dghg, &dgh);
    check("gru dh", g, &dhg, &dh);
}

/// The slot cell's per-slot work around the attention (`slot_query_fwd`, `slot_update_fwd` and
/// their backward ops): the CUDA backend fuses each (d ≤ 64, hidden ≤ 256, multiples of 4), the
/// CPU composes the single ops. Shapes: a partial last block, the papers' widths, the widest fused case, the narrowest,
/// and one that cannot be fused (the composed fallback on the GPU); with and without dropout.
fn slot_cell_fwd_bwd_parity<B: Backend>(g: &B) {
    let cpu = cpu();
    let shapes = [
        // (rows, d, hidden, dropout); 70 rows: three row chunks of the parameter gradients
        (13, 8, 12, false),
        (70, 16, 32, true),
        (21, 64, 128, true),
        (9, 64, 256, true),
        (3, 4, 4, true),
        (7, 6, 10, true),
    ];
    for (si, &(rows, d, hidden, drop)) in shapes.iter().enumerate() {
        let dims = SlotCellDims { rows, d, hidden };
        let name = format!("slot cell {rows} rows, d {d}, hidden {hidden}, dropout {drop}");
        let s = 8000 + 100 * si as u64;
        let host: Vec<Vec<f32>> = slotcell::param_lens(&dims)
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // The weight matrices narrower (the LayerNorms' γ, β and the biases stay O(1)).
                let scale = if [2, 3, 5, 9, 11].contains(&i) {
                    0.3
                } else {
                    1.0
                };
                rand(n, s + i as u64, scale)
            })
            .collect();
        let dev: Vec<B::Buf> = host.iter().map(|v| up(g, v)).collect();
        let slots = rand(rows * d, s + 20, 1.5);
        let upd = rand(rows * d, s + 21, 1.5);
        let mask = drop.then(|| DropoutMask {
            rng: Philox::new(s + 22),
            stream: 7,
            step: 11,
            p: 0.25,
        });
        let lens = slotcell::out_lens(&dims);
        let mut want: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut got: Vec<B::Buf> = lens.iter().map(|&n| poisoned(g, n)).collect();
        let m = mask.as_ref();
        slotcell::slot_cell_fwd_flat(&cpu, false, &dims, &host, &slots, &upd, m, &mut want);
        let (slots_g, upd_g) = (up(g, &slots), up(g, &upd));
        slotcell::slot_cell_fwd_flat(g, false, &dims, &dev, &slots_g, &upd_g, m, &mut got);
        for ((what, gbuf), cbuf) in slotcell::OUT_NAMES.iter().zip(&got).zip(&want) {
            check(&format!("{name} {what}"), g, gbuf, cbuf);
        }
        // Backward from the CPU's forward, into non-zero d_in and parameter gradients (both
        // accumulate) and a poisoned d_upd (overwritten).
        let fwd: Vec<B::Buf> = want.iter().map(|v| up(g, v)).collect();
        let d_out = rand(rows * d, s + 30, 1.0);
        let dq = rand(rows * d, s + 31, 1.0);
        let mut d_in = rand(rows * d, s + 32, 0.5);
        let mut d_upd = vec![0.0; rows * d];
        let mut gh: Vec<Vec<f32>> = slotcell::param_lens(&dims)
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, s + 40 + i as u64, 0.5))
            .collect();
        let mut gd: Vec<B::Buf> = gh.iter().map(|v| up(g, v)).collect();
        let (mut d_in_g, mut d_upd_g) = (up(g, &d_in), poisoned(g, rows * d));
        let lens = slotcell::scratch_lens(&dims);
        let mut sc: Vec<Vec<f32>> = lens.iter().map(|&n| vec![0.0; n]).collect();
        let mut sg: Vec<B::Buf> = lens.iter().map(|&n| poisoned(g, n)).collect();
        slotcell::slot_cell_bwd_flat(
            &cpu, false, &dims, &host, &want, &slots, &upd, m, &d_out, &dq, &mut sc, &mut d_upd,
            &mut d_in, &mut gh,
        );
        let (d_out_g, dq_g) = (up(g, &d_out), up(g, &dq));
        slotcell::slot_cell_bwd_flat(
            g,
            false,
            &dims,
            &dev,
            &fwd,
            &slots_g,
            &upd_g,
            m,
            &d_out_g,
            &dq_g,
            &mut sg,
            &mut d_upd_g,
            &mut d_in_g,
            &mut gd,
        );
        check(&format!("{name} d_upd"), g, &d_upd_g, &d_upd);
        check(&format!("{name} d_in"), g, &d_in_g, &d_in);
        for ((what, gbuf), cbuf) in slotcell::PARAM_NAMES.iter().zip(&gd).zip(&gh) {
            check(&format!("{name} d {what}"), g, gbuf, cbuf);
        }
        if drop {
            let dropped = want[10].iter().filter(|&&v| v == 0.0).count();
            assert!(
                dropped > 0 && dropped < want[10].len(),
                "{name}: {dropped} of {} hidden activations zero",
                want[10].len()
            );
        }
    }
}

/// The decoder's broadcast input and first convolution (`bcast_conv_fwd` / `bcast_conv_bwd`):
/// the CUDA backend splits the convolution by border classes ("same", stride 1, grids at least k
/// wide), against the composition of the single ops on the CPU (the reference; the CPU backend
/// itself splits too). Shapes: k = 5 with a ReLU, k = 3 on a non-square grid without one, k = 7
/// on a grid exactly 7 wide, 40 output channels (two channel chunks of the class sums), 12 rows
/// (interior rows for every warp of the class sums), and a grid narrower than k (the composed
/// fallback on the GPU).
fn bcast_conv_fwd_bwd_parity<B: Backend>(g: &B, tol: f64) {
    let cpu = cpu();
    let cases = [
        // (slots, h, w, c_in, c_out, k, relu)
        (5, 7, 7, 8, 6, 5, true),
        (3, 9, 6, 4, 4, 3, false),
        (2, 7, 8, 3, 5, 7, true),
        (3, 6, 5, 3, 40, 3, true),
        (2, 12, 10, 3, 6, 5, true),
        (2, 4, 4, 4, 3, 5, true),
        // Widths that take version 3 under TF32, so the position image's one-image passes are
        // split over the reduction (split-K): forward 25 k-tiles in 6 splits, input gradient
        // 50 in 12; forward 27 in 6 over 2 row blocks, input gradient 9 in 2 (wide tiles).
        (3, 9, 11, 16, 32, 5, true),
        (2, 20, 17, 48, 16, 3, false),
        // More than 64 input channels (the slot-class products take them in chunks of 64; dz's
        // columns span two blocks), more slots than one block's 8, and 8 outputs (the
        // forward's four per thread).
        (11, 6, 7, 72, 8, 3, true),
    ];
    for (ci, &(slots, h, w, c_in, c_out, k, relu)) in cases.iter().enumerate() {
        let dims = BcastConvDims {
            slots,
            geom: ConvGeom::same(h, w, c_in, c_out, k),
        };
        let name = format!("bcast conv {slots} slots {h}x{w} {c_in}->{c_out} k{k} relu {relu}");
        let s = 9000 + 100 * ci as u64;
        // [pos_w, pos_b, w, b]
        let lens = [4 * c_in, c_in, c_out * c_in * k * k, c_out];
        let host: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, s + i as u64, if i == 2 { 0.3 } else { 1.0 }))
            .collect();
        let dev: Vec<B::Buf> = host.iter().map(|v| up(g, v)).collect();
        let z = rand(slots * c_in, s + 10, 1.0);
        let (xn, yn) = (slots * h * w * c_in, slots * h * w * c_out);
        let (mut x, mut y) = (vec![0.0; xn], vec![0.0; yn]);
        let pc = BcastConvParams {
            pos_w: &host[0],
            pos_b: &host[1],
            w: &host[2],
            b: &host[3],
            relu,
        };
        bcast_conv_fwd_by_ops(&cpu, &dims, &pc, &z, &mut x, &mut y);
        let pg = BcastConvParams {
            pos_w: &dev[0],
            pos_b: &dev[1],
            w: &dev[2],
            b: &dev[3],
            relu,
        };
        let zg = up(g, &z);
        let (mut xg, mut yg) = (poisoned(g, xn), poisoned(g, yn));
        g.bcast_conv_fwd(&dims, &pg, &zg, &mut xg, &mut yg);
        check_tol(&format!("{name} y"), g, &yg, &y, tol);
        // Backward from the CPU's forward, into non-zero gradients (they accumulate).
        let dy = rand(yn, s + 11, 1.0);
        let mut dz = rand(slots * c_in, s + 12, 0.5);
        let mut gh: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, s + 20 + i as u64, 0.5))
            .collect();
        let mut gd: Vec<B::Buf> = gh.iter().map(|v| up(g, v)).collect();
        let mut dzg = up(g, &dz);
        let mut dx = vec![0.0; xn];
        let [gpw, gpb, gw, gb] = &mut gh[..] else {
            unreachable!()
        };
        let grads = BcastConvGrads {
            pos_w: gpw,
            pos_b: gpb,
            w: gw,
            b: gb,
        };
        bcast_conv_bwd_by_ops(&cpu, &dims, &pc, &z, &x, &y, &dy, &mut dx, &mut dz, grads);
        let (xg2, yg2, dyg) = (up(g, &x), up(g, &y), up(g, &dy));
        let mut dxg = poisoned(g, xn);
        let [gpw, gpb, gw, gb] = &mut gd[..] else {
            unreachable!()
        };
        let grads = BcastConvGrads {
            pos_w: gpw,
            pos_b: gpb,
            w: gw,
            b: gb,
        };
        g.bcast_conv_bwd(&dims, &pg, &zg, &xg2, &yg2, &dyg, &mut dxg, &mut dzg, grads);
        check_tol(&format!("{name} dz"), g, &dzg, &dz, tol);
        for (what, (gbuf, cbuf)) in ["d pos_w", "d pos_b", "dw", "db"]
            .iter()
            .zip(gd.iter().zip(&gh))
        {
            check_tol(&format!("{name} {what}"), g, gbuf, cbuf, tol);
        }
    }
}

/// The per-token chain (`tokens_fwd` / `tokens_bwd`): the CUDA backend fuses it (two MLP layers,
/// widths up to 64) and the CPU composes the single ops. Shapes: partial last tiles, odd widths,
/// the widest fused case, and one that is too wide to fuse (the composed fallback on the GPU).
/// Under TF32 the widths that are multiples of 8 take the tensor-core version (the second,
/// fourth, fifth and seventh shapes: products 8 to 64 wide, a 16-wide layer that leaves warps
/// idle, a 48-wide one that ends in half a warp's columns); the others stay on version 1.
/// Each shape twice: ending with k and v, and ending at u (the fold: no k, v written, the
/// backward from d u, Wk's and Wv's gradients left as they were).
fn tokens_fwd_bwd_parity<B: Backend>(g: &B, tol: f64) {
    let cpu = cpu();
    let shapes = [
        // (batch, h, w, c, feat, d)
        (2, 5, 5, 16, 24, 20),
        (2, 5, 7, 8, 40, 16),
        (3, 4, 7, 7, 33, 5),
        (1, 9, 9, 64, 64, 64),
        (1, 6, 7, 32, 16, 48),
        (2, 3, 3, 8, 72, 16),
        // 1152 rows: the backward's 18 blocks of partial sums, more than the 8 groups of
        // tokens_bwd_reduce_f32 (rs_combine), so every group has rows to sum.
        (2, 24, 24, 8, 16, 8),
    ];
    let runs = shapes
        .iter()
        .enumerate()
        .flat_map(|s| [(s, true), (s, false)]);
    for ((si, &(batch, h, w, c, feat, d)), kv) in runs {
        let dims = TokenDims {
            batch,
            h,
            w,
            c,
            feat,
            d,
            kv,
        };
        let rows = dims.rows();
        let kv_rows = if kv { rows } else { 0 };
        let ends = if kv { "k, v" } else { "u" };
        let name = format!("tokens {rows} rows, c {c}, feat {feat}, d {d}, to {ends}");
        let s = 7000 + 100 * si as u64;
        // Parameters: [pos_w, pos_b, norm_g, norm_b, w1, b1, w2, b2, norm_in_g, norm_in_b, wk, wv].
        let lens = [
            4 * c,
            c,
            c,
            c,
            feat * c,
            feat,
            feat * feat,
            feat,
            feat,
            feat,
            d * feat,
            d * feat,
        ];
        let host: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let scale = if [4, 6, 10, 11].contains(&i) {
                    0.3
                } else {
                    1.0
                };
                rand(n, s + i as u64, scale)
            })
            .collect();
        let dev: Vec<B::Buf> = host.iter().map(|v| up(g, v)).collect();
        // Forward into poisoned outputs.
        let enc = rand(rows * c, s + 20, 1.5);
        let mut want = TokenActs::new(&cpu, &dims, 2);
        cpu.tokens_fwd(
            &dims,
            &TokenParams::from_flat(&host, c, feat),
            &enc,
            &mut want,
        );
        let mut got = TokenActs {
            enc_pos: poisoned(g, rows * c),
            ln0: poisoned(g, rows * c),
            ln0_mean: poisoned(g, rows),
            ln0_rstd: poisoned(g, rows),
            mlp_act: vec![poisoned(g, rows * feat), poisoned(g, rows * feat)],
            ln_in: poisoned(g, rows * feat),
            ln_in_mean: poisoned(g, rows),
            ln_in_rstd: poisoned(g, rows),
            k: poisoned(g, kv_rows * d),
            v: poisoned(g, kv_rows * d),
        };
        g.tokens_fwd(
            &dims,
            &TokenParams::from_flat(&dev, c, feat),
            &up(g, &enc),
            &mut got,
        );
        let (a, b) = (&got, &want);
        let pairs = [
            ("x", &a.enc_pos, &b.enc_pos),
            ("LN0", &a.ln0, &b.ln0),
            ("LN0 mean", &a.ln0_mean, &b.ln0_mean),
            ("LN0 rstd", &a.ln0_rstd, &b.ln0_rstd),
            ("h", &a.mlp_act[0], &b.mlp_act[0]),
            ("f", &a.mlp_act[1], &b.mlp_act[1]),
            ("LN_in", &a.ln_in, &b.ln_in),
            ("LN_in mean", &a.ln_in_mean, &b.ln_in_mean),
            ("LN_in rstd", &a.ln_in_rstd, &b.ln_in_rstd),
            ("k", &a.k, &b.k),
            ("v", &a.v, &b.v),
        ];
        for (what, gbuf, cbuf) in pairs.into_iter().take(if kv { 11 } else { 9 }) {
            check_tol(&format!("{name} {what}"), g, gbuf, cbuf, tol);
        }
        // Backward from the CPU's activations, into non-zero parameter gradients.
        let saved = TokenActs {
            enc_pos: up(g, &want.enc_pos),
            ln0: up(g, &want.ln0),
            ln0_mean: up(g, &want.ln0_mean),
            ln0_rstd: up(g, &want.ln0_rstd),
            mlp_act: want.mlp_act.iter().map(|a| up(g, a)).collect(),
            ln_in: up(g, &want.ln_in),
            ln_in_mean: up(g, &want.ln_in_mean),
            ln_in_rstd: up(g, &want.ln_in_rstd),
            k: up(g, &want.k),
            v: up(g, &want.v),
        };
        // d k and d v, or the d u they make (d k·Wk + d v·Wv): the same gradients downstream.
        let (mut dk, mut dv) = (rand(rows * d, s + 30, 1.0), rand(rows * d, s + 31, 1.0));
        if !kv {
            let (wk, wv) = (&host[10], &host[11]);
            let du: Vec<f32> = (0..rows * feat)
                .map(|e| {
                    let (r, f) = (e / feat, e % feat);
                    (0..d)
                        .map(|i| {
                            dk[r * d + i] * wk[i * feat + f] + dv[r * d + i] * wv[i * feat + f]
                        })
                        .sum()
                })
                .collect();
            (dk, dv) = (du, Vec::new());
        }
        let (dkg, dvg) = (up(g, &dk), up(g, &dv));
        let mut gh: Vec<Vec<f32>> = lens
            .iter()
            .enumerate()
            .map(|(i, &n)| rand(n, s + 40 + i as u64, 0.5))
            .collect();
        let mut gd: Vec<B::Buf> = gh.iter().map(|v| up(g, v)).collect();
        let mut dc = TokenGradActs::new(&cpu, &dims, 2, true);
        cpu.tokens_bwd(
            &dims,
            &TokenParams::from_flat(&host, c, feat),
            &want,
            match kv {
                true => TokenOutGrads::Kv { dk: &dk, dv: &dv },
                false => TokenOutGrads::U(&dk),
            },
            &mut dc,
            &mut TokenGrads::from_flat(&mut gh),
        );
        let mut dg = TokenGradActs {
            d_enc_pos: poisoned(g, rows * c),
            d_ln0: poisoned(g, rows * c),
            d_mlp_act: vec![poisoned(g, rows * feat), poisoned(g, rows * feat)],
            d_ln_in: poisoned(g, rows * feat),
        };
        g.tokens_bwd(
            &dims,
            &TokenParams::from_flat(&dev, c, feat),
            &saved,
            match kv {
                true => TokenOutGrads::Kv { dk: &dkg, dv: &dvg },
                false => TokenOutGrads::U(&dkg),
            },
            &mut dg,
            &mut TokenGrads::from_flat(&mut gd),
        );
        check_tol(
            &format!("{name} d enc"),
            g,
            &dg.d_enc_pos,
            &dc.d_enc_pos,
            tol,
        );
        let names = [
            "dW pos", "db pos", "dγ0", "dβ0", "dW1", "db1", "dW2", "db2", "dγ_in", "dβ_in", "dWk",
            "dWv",
        ];
        for ((what, gbuf), cbuf) in names.iter().zip(&gd).zip(&gh) {
            check_tol(&format!("{name} {what}"), g, gbuf, cbuf, tol);
        }
    }
}

fn composite_mse_fwd_bwd_parity<B: Backend>(g: &B) {
    let c = cpu();
    // (3 × 700 pixels: more than the 1024 threads of composite_loss_f32, twice over.)
    for (ci, &(batch, k, p)) in [(3, 4, 50), (2, 7, 300), (3, 3, 700)].iter().enumerate() {
        let name = format!("composite B{batch} K{k} P{p}");
        let s = 6000 + 10 * ci as u64;
        let dec = rand(batch * k * p * 4, s, 2.0);
        let target = rand(batch * p * 3, s + 1, 1.0);
        let (mut masks, mut recon, mut loss) = (
            vec![0.0; batch * k * p],
            vec![0.0; batch * p * 3],
            vec![0.0; 1],
        );
        c.composite_mse_fwd(
            batch, k, p, &dec, &target, &mut masks, &mut recon, &mut loss,
        );
        let (decg, tg) = (up(g, &dec), up(g, &target));
        let (mut mg, mut rg, mut lg) = (
            poisoned(g, masks.len()),
            poisoned(g, recon.len()),
            poisoned(g, 1),
        );
        g.composite_mse_fwd(batch, k, p, &decg, &tg, &mut mg, &mut rg, &mut lg);
        check(&format!("{name} masks"), g, &mg, &masks);
        check(&format!("{name} recon"), g, &rg, &recon);
        check(&format!("{name} loss"), g, &lg, &loss);
        let (mg, rg) = (up(g, &masks), up(g, &recon));
        let mut ddec = rand(dec.len(), s + 2, 0.5);
        let mut ddecg = up(g, &ddec);
        c.composite_mse_bwd(batch, k, p, &dec, &target, &masks, &recon, 1.7, &mut ddec);
        g.composite_mse_bwd(batch, k, p, &decg, &tg, &mg, &rg, 1.7, &mut ddecg);
        check(&format!("{name} ddec"), g, &ddecg, &ddec);
    }
}

fn elementwise_rng_and_host_reads_parity<B: Backend>(g: &B) {
    let c = cpu();
    let n = 3001;
    // Normals from Philox: the same numbers (computed in double on both sides).
    let rng = Philox::new(0x1234_5678_9abc_def0);
    let mut z = vec![0.0f32; n];
    c.fill_normal(rng, 2, 17, &mut z);
    let mut zg = poisoned(g, n);
    g.fill_normal(rng, 2, 17, &mut zg);
    check_tol("fill_normal", g, &zg, &z, 1e-7);
    // Dropout forward and backward.
    let mask = DropoutMask {
        rng,
        stream: 0x101,
        step: 9,
        p: 0.3,
    };
    let mut x = rand(n, 7000, 1.0);
    let mut xg = up(g, &x);
    c.dropout_fwd(&mask, &mut x);
    g.dropout_fwd(&mask, &mut xg);
    check("dropout fwd", g, &xg, &x);
    let got = g.download_f32(&xg);
    assert_eq!(
        got.iter().map(|v| *v == 0.0).collect::<Vec<_>>(),
        x.iter().map(|v| *v == 0.0).collect::<Vec<_>>(),
        "dropout: the same elements must be dropped"
    );
    c.dropout_bwd(&mask, &mut x);
    g.dropout_bwd(&mask, &mut xg);
    check("dropout bwd", g, &xg, &x);
    // Slot initialisation.
    let (rows, d) = (21, 16);
    let mu = rand(d, 7001, 1.0);
    let ls = rand(d, 7002, 1.0);
    let noise = rand(rows * d, 7003, 2.0);
    let mut slots = vec![0.0; rows * d];
    c.slot_init_fwd(d, &mu, &ls, &noise, &mut slots);
    let (mug, lsg, ng) = (up(g, &mu), up(g, &ls), up(g, &noise));
    let mut sg = poisoned(g, slots.len());
    g.slot_init_fwd(d, &mug, &lsg, &ng, &mut sg);
    check("slot_init slots", g, &sg, &slots);
    let ds = rand(rows * d, 7004, 1.0);
    let mut dmu = rand(d, 7005, 0.5);
    let mut dls = rand(d, 7006, 0.5);
    let (dsg, mut dmug, mut dlsg) = (up(g, &ds), up(g, &dmu), up(g, &dls));
    c.slot_init_bwd(d, &ls, &noise, &ds, &mut dmu, &mut dls);
    g.slot_init_bwd(d, &lsg, &ng, &dsg, &mut dmug, &mut dlsg);
    check("slot_init dmu", g, &dmug, &dmu);
    check("slot_init dlog_sigma", g, &dlsg, &dls);
    // add_assign, scale, copy, fill_zero, upload_f64 / download.
    let a = rand(n, 7007, 1.0);
    let b = rand(n, 7008, 1.0);
    let (mut ag, bg) = (up(g, &a), up(g, &b));
    let mut want = a.clone();
    c.add_assign(&mut want, &b);
    g.add_assign(&mut ag, &bg);
    check("add_assign", g, &ag, &want);
    c.scale(&mut want, -0.37);
    g.scale(&mut ag, -0.37);
    check("scale", g, &ag, &want);
    let mut cg = poisoned(g, n);
    g.copy(&ag, &mut cg);
    check("copy", g, &cg, &want);
    g.fill_zero(&mut cg);
    check("fill_zero", g, &cg, &vec![0.0; n]);
    let v64: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin() * 1e3).collect();
    let mut vg = poisoned(g, n);
    g.upload_f64(&v64, &mut vg);
    let back = g.download(&vg);
    assert!(back.iter().zip(&v64).all(|(a, b)| *a == *b as f32 as f64));
    // Host reads in double.
    let (ss_c, ss_g) = (c.sum_squares(&a), g.sum_squares(&up(g, &a)));
    assert!(
        (ss_c - ss_g).abs() <= 1e-12 * ss_c,
        "sum_squares {ss_c} vs {ss_g}"
    );
    let (rc_c, rc_g) = (c.rel_change(&a, &b), g.rel_change(&up(g, &a), &bg));
    assert!(
        (rc_c - rc_g).abs() <= 1e-12 * rc_c,
        "rel_change {rc_c} vs {rc_g}"
    );
    // Large enough for more than one partial block per reduction.
    let big = rand(1 << 20, 7009, 1.0);
    let (ss_c, ss_g) = (c.sum_squares(&big), g.sum_squares(&up(g, &big)));
    assert!(
        (ss_c - ss_g).abs() <= 1e-10 * ss_c,
        "sum_squares (big) {ss_c} vs {ss_g}"
    );
    // Zero-length buffers are legal.
    let mut e = g.alloc(0);
    g.fill_zero(&mut e);
    assert_eq!(g.download(&e), Vec::<f64>::new());
    assert_eq!(g.sum_squares(&e), 0.0);
}

/// The whole optimizer step (`opt_step`: norm over several tensors, clipping, non-finite steps
/// skipped or latched, AdamW) against the CPU, step by step, with parameters, moments and the
/// bookkeeping compared after each.
fn opt_step_parity<B: Backend>(g: &B) {
    let c = cpu();
    let lens = [5usize, 3001, 70_000];
    let init = |seed: u64| -> Vec<Vec<f32>> {
        lens.iter()
            .enumerate()
            .map(|(k, &n)| rand(n, seed + k as u64, 0.5))
            .collect()
    };
    let (mut pc, mut mc, mut vc) = (init(8000), init(8100), init(8200));
    for v in &mut vc {
        v.iter_mut().for_each(|x| *x = x.abs());
    }
    let ups = |v: &[Vec<f32>]| -> Vec<B::Buf> { v.iter().map(|x| up(g, x)).collect() };
    let (mut pg, mut mg, mut vg) = (ups(&pc), ups(&mc), ups(&vc));
    let start = slotfix::optim::OptReport::starting_at(3);
    let (mut sc, mut sg) = (c.opt_state(&lens, &start), g.opt_state(&lens, &start));
    let mut h = slotfix::optim::OptHyper {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        grad_clip: Some(2.0),
        latch: false,
        step: 0,
    };
    // (loss, gradient scale, a non-finite gradient element, latch)
    let steps = [
        (0.7f32, 1.0f32, None, false),
        (0.6, 0.001, None, false), // below the clip norm
        (f32::NAN, 1.0, None, false),
        (0.5, 1.0, Some(f32::INFINITY), false),
        (0.4, 1.0, None, false),
        (0.3, 1.0, Some(f32::NAN), true),
        (0.2, 1.0, None, true), // latched: no update
    ];
    for (step, &(loss, scale, bad, latch)) in steps.iter().enumerate() {
        h.step = 100 + step as u64;
        h.latch = latch;
        let mut grads = init(8300 + 10 * step as u64);
        for gr in &mut grads {
            gr.iter_mut().for_each(|x| *x *= scale);
        }
        if let Some(b) = bad {
            grads[1][17] = b;
        }
        let gg = ups(&grads);
        let (lc, lg) = (vec![loss], up(g, &[loss]));
        c.opt_step(&h, &lc, &mut pc, &grads, &mut mc, &mut vc, &mut sc);
        g.opt_step(&h, &lg, &mut pg, &gg, &mut mg, &mut vg, &mut sg);
        let (rc, rg) = (c.opt_report(&sc), g.opt_report(&sg));
        let tag = format!("opt step {step}");
        assert_eq!(rg.updates, rc.updates, "{tag}: updates");
        assert_eq!(rg.skipped, rc.skipped, "{tag}: skipped");
        assert_eq!(rg.last_bad_step, rc.last_bad_step, "{tag}: last bad step");
        assert_eq!(
            rg.first_bad.map(|b| b.0),
            rc.first_bad.map(|b| b.0),
            "{tag}"
        );
        assert_eq!(rg.latched, rc.latched, "{tag}: latched");
        assert_eq!(rg.loss_count, rc.loss_count, "{tag}: loss count");
        if loss.is_finite() {
            assert_eq!(rg.last_loss, rc.last_loss, "{tag}: loss");
        }
        if bad.is_none() {
            let e = (rg.last_grad_norm - rc.last_grad_norm).abs() / rc.last_grad_norm;
            assert!(
                e < 1e-12,
                "{tag}: grad norm {} vs {}",
                rg.last_grad_norm,
                rc.last_grad_norm
            );
        }
        for k in 0..lens.len() {
            check_tol(&format!("{tag} param {k}"), g, &pg[k], &pc[k], 1e-6);
            check_tol(&format!("{tag} m {k}"), g, &mg[k], &mc[k], 1e-6);
            check_tol(&format!("{tag} v {k}"), g, &vg[k], &vc[k], 1e-6);
        }
    }
    let r = c.opt_report(&sc);
    assert_eq!((r.updates, r.skipped, r.latched), (6, 4, true));
}

fn adam_step_parity<B: Backend>(g: &B) {
    let c = cpu();
    let n = 1000;
    let mut p = rand(n, 8000, 1.0);
    let grad = rand(n, 8001, 0.1);
    let mut m = rand(n, 8002, 0.01);
    let mut v: Vec<f32> = rand(n, 8003, 0.01).iter().map(|x| x * x).collect();
    let (mut pg, gg, mut mg, mut vg) = (up(g, &p), up(g, &grad), up(g, &m), up(g, &v));
    let s = AdamStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        t: 3,
        grad_scale: 0.5,
    };
    c.adam_step(&s, &mut p, &grad, &mut m, &mut v);
    g.adam_step(&s, &mut pg, &gg, &mut mg, &mut vg);
    // Computed with the same correctly rounded double operations: expected to match to the bit.
    check_tol("adam param", g, &pg, &p, 1e-7);
    check_tol("adam m", g, &mg, &m, 1e-7);
    check_tol("adam v", g, &vg, &v, 1e-7);
}

/// `$emu` and `$gpu`: one check with the kernels in the emulator and on the GPU. Each skips,
/// saying why, where its executor is missing (and fails instead under SLOTFIX_REQUIRE_EMULATOR /
/// SLOTFIX_REQUIRE_GPU). `$kind` ("emulated" or "gpu") names the executor in messages.
macro_rules! emu_and_gpu_tests {
    ($emu:ident, $gpu:ident, |$g:ident| $body:expr) => {
        emu_and_gpu_tests!($emu, $gpu, |$g, _kind| $body);
    };
    ($emu:ident, $gpu:ident, |$g:ident, $kind:ident| $body:expr) => {
        #[test]
        fn $emu() {
            if let Some($g) = emu() {
                let $kind = "emulated";
                $body;
            }
        }
        #[test]
        fn $gpu() {
            if let Some($g) = gpu() {
                let $kind = "gpu";
                $body;
            }
        }
    };
}

emu_and_gpu_tests!(emu_conv2d_fwd_bwd, gpu_conv2d_fwd_bwd, |g| {
    conv2d_fwd_bwd_parity(&g, TOL, false)
});
emu_and_gpu_tests!(emu_conv_t2d_fwd_bwd, gpu_conv_t2d_fwd_bwd, |g| {
    conv_t2d_fwd_bwd_parity(&g, TOL, false)
});
// The kernels of more than 48 KiB of shared memory (conv k32 and v5) got it: in the emulator,
// and on every GPU but those that give a block 99 KiB (sm_86, sm_87, sm_89: v5's 5×5 kernels
// need 100 KiB). Otherwise their fallbacks would run in every parity test here, and these
// kernels would go untested.
emu_and_gpu_tests!(
    emu_large_shared_kernels_are_opted_in,
    gpu_large_shared_kernels_are_opted_in,
    |g| {
        let refused = g.shared_opt_in_refused();
        eprintln!("{} ({}): refused {refused:?}", g.device_name(), g.arch());
        if !matches!(g.arch(), "sm_86" | "sm_87" | "sm_89") {
            assert!(refused.is_empty(), "{}: {refused:?}", g.device_name());
        }
    }
);
emu_and_gpu_tests!(emu_linear_fwd_bwd, gpu_linear_fwd_bwd, |g| {
    linear_fwd_bwd_parity(&g, TOL)
});
emu_and_gpu_tests!(emu_layernorm_fwd_bwd, gpu_layernorm_fwd_bwd, |g| {
    layernorm_fwd_bwd_parity(&g)
});
emu_and_gpu_tests!(emu_posembed_fwd_bwd, gpu_posembed_fwd_bwd, |g| {
    posembed_fwd_bwd_parity(&g)
});
emu_and_gpu_tests!(emu_attention_fwd_bwd, gpu_attention_fwd_bwd, |g| {
    attention_fwd_bwd_parity(&g)
});
/// Version 4 of the attention kernels (k = v, one head) runs in the 8 cases of the parity test
/// it takes (forward and both backward passes), and with it off those pass on version 3.
#[test]
fn emu_attention_v4_and_its_fallback() {
    let v4 = |g: &Cuda| {
        g.emu_kernel_launches()
            .iter()
            .filter(|(k, _)| k.contains("_v4k"))
            .map(|(_, n)| *n)
            .sum::<u64>()
    };
    if let Some(g) = emu() {
        attention_fwd_bwd_parity(&g);
        assert_eq!(v4(&g), 3 * 8, "version 4 launches");
    }
    if let Some(g) = emu() {
        let g = g.with_fast_paths(FastPaths::all_but("attention_v4").unwrap());
        attention_fwd_bwd_parity(&g);
        assert_eq!(v4(&g), 0, "version 4 launches with it off");
    }
}
emu_and_gpu_tests!(emu_gru_gates_fwd_bwd, gpu_gru_gates_fwd_bwd, |g| {
    gru_gates_fwd_bwd_parity(&g)
});
emu_and_gpu_tests!(emu_bcast_conv_fwd_bwd, gpu_bcast_conv_fwd_bwd, |g| {
    bcast_conv_fwd_bwd_parity(&g, TOL)
});
/// The split broadcast convolution under TF32, with split-K on its one-image passes (the
/// reduce kernel counted as launched), off (not launched), and on with exact products at the
/// f32 tolerance (the split's k-tile ranges and partial sums are exact, only the order of the
/// additions changes).
#[test]
fn emu_bcast_conv_tf32_fwd_bwd() {
    let reduces = |g: &Cuda| {
        g.emu_kernel_launches()
            .get("conv_splitk_reduce_f32")
            .copied()
            .unwrap_or(0)
    };
    let no_splitk = FastPaths::all_but("conv_splitk").unwrap();
    for (fast, exact, tol, label) in [
        (FastPaths::ALL, false, TF32_TOL, "split-K"),
        (no_splitk, false, TF32_TOL, "no split-K"),
        (FastPaths::ALL, true, TOL, "split-K, exact products"),
    ] {
        let g = match exact {
            false => emu().map(|g| g.with_precision(Precision::Tf32)),
            true => emu_exact_repeat(),
        };
        let Some(g) = g.map(|g| g.with_fast_paths(fast)) else {
            return;
        };
        bcast_conv_fwd_bwd_parity(&g, tol);
        // Two cases, a forward and an input gradient each.
        let n = reduces(&g);
        assert_eq!(
            n,
            if fast.conv_splitk { 4 } else { 0 },
            "{label}: reduce launches"
        );
    }
}

#[test]
fn gpu_bcast_conv_tf32_fwd_bwd() {
    if let Some(g) = gpu() {
        bcast_conv_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL);
    }
}
emu_and_gpu_tests!(emu_slot_cell_fwd_bwd, gpu_slot_cell_fwd_bwd, |g| {
    slot_cell_fwd_bwd_parity(&g)
});
emu_and_gpu_tests!(emu_tokens_fwd_bwd, gpu_tokens_fwd_bwd, |g| {
    tokens_fwd_bwd_parity(&g, TOL)
});
emu_and_gpu_tests!(emu_composite_mse_fwd_bwd, gpu_composite_mse_fwd_bwd, |g| {
    composite_mse_fwd_bwd_parity(&g)
});
emu_and_gpu_tests!(
    emu_elementwise_rng_and_host_reads,
    gpu_elementwise_rng_and_host_reads,
    |g| elementwise_rng_and_host_reads_parity(&g)
);
emu_and_gpu_tests!(emu_adam_step, gpu_adam_step, |g| adam_step_parity(&g));
emu_and_gpu_tests!(emu_opt_step, gpu_opt_step, |g| opt_step_parity(&g));

// ---------------------------------------------------------------------------------------------
// wgmma (sm_90a): the probe of kernels/wgmma.cu against the CPU.

/// The shared-memory layouts the probe stages its operands in, as (LBO, SBO) bytes of
/// `kernels/wgmma.cuh`, and the k of its product: each k8 step's two core matrices adjacent and
/// the row groups 256 bytes apart, over 4 steps; and, as the convolutions' wgmma pass lays out
/// its halo, the step's two K halves in planes (3088 bytes apart, past the 16 row groups of the
/// first) with the row groups 192 bytes apart, over one step (each slice is sized for the two
/// fields read either way round: 46 KB here). Reading the fields the other way round disagrees
/// with either.
const WGMMA_LAYOUTS: [(i32, i32, usize); 2] = [(128, 256, 32), (3088, 192, 8)];

/// The probe's d = a · bᵀ (a 64 × k, b 128 × k) in f64, rounded to f32.
fn wgmma_probe_want(a: &[f32], b: &[f32]) -> Vec<f32> {
    let k = a.len() / 64;
    let mut d = vec![0f32; 64 * 128];
    for r in 0..64 {
        for c in 0..128 {
            let s: f64 = (0..k)
                .map(|i| a[r * k + i] as f64 * b[c * k + i] as f64)
                .sum();
            d[r * 128 + c] = s as f32;
        }
    }
    d
}

/// The relative L2 error of d against `want`, NaN or Inf counting as infinitely far.
fn probe_err(d: &[f32], want: &[f32]) -> f64 {
    if d.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    rel_err(d, want)
}

/// Whether the device reads a layout's two descriptor offsets the other way round: the probe
/// with the fields swapped, against the CPU.
fn wgmma_fields_swapped_match(
    g: &Cuda,
    a: &[f32],
    b: &[f32],
    layout: (i32, i32),
    a_smem: bool,
    tol: f64,
) -> bool {
    let d = g.wgmma_probe(a, b, layout, a_smem, true).unwrap();
    probe_err(&d, &wgmma_probe_want(a, b)) <= tol
}

/// The probe in both layouts, with A from registers and from shared memory, against the CPU
/// within `tol`; NaN or Inf fails. A failure says whether the descriptors' two offsets read
/// the other way round would have matched.
fn wgmma_probe_parity(g: &Cuda, tol: f64) {
    for (lbo, sbo, k) in WGMMA_LAYOUTS {
        let a = rand(64 * k, 71, 1.0);
        let b = rand(128 * k, 72, 1.0);
        let want = wgmma_probe_want(&a, &b);
        for a_smem in [false, true] {
            let from = if a_smem { "shared memory" } else { "registers" };
            let what = format!("wgmma probe, (LBO, SBO) = ({lbo}, {sbo}), k {k}, A from {from}");
            let d = g.wgmma_probe(&a, &b, (lbo, sbo), a_smem, false).unwrap();
            let e = probe_err(&d, &want);
            eprintln!("{what}: relative L2 error {e:.2e}");
            if e > tol {
                let swapped = wgmma_fields_swapped_match(g, &a, &b, (lbo, sbo), a_smem, tol);
                panic!(
                    "{what}: relative L2 error {e:.3e} > {tol:e}; with the descriptors' two \
                     offset fields swapped it {}",
                    if swapped {
                        "matches: the device reads them the other way round"
                    } else {
                        "does not match either"
                    }
                );
            }
        }
    }
}

/// The emulator's wgmma (runtime.cpp) through the probe kernel: TF32 at its tolerance, and with
/// exact products at f32's (its fragment and descriptor indexing exact).
#[test]
fn emu_wgmma_probe_matches_the_cpu() {
    let Some(g) = emu() else { return };
    assert!(g.has_wgmma());
    g.check_wgmma().unwrap();
    wgmma_probe_parity(&g, TF32_TOL);
    // The diagnosis of a failure runs (within its shared memory) and, here, where the fields
    // are read as documented, says no.
    for (lbo, sbo, k) in WGMMA_LAYOUTS {
        let (a, b) = (rand(64 * k, 73, 1.0), rand(128 * k, 74, 1.0));
        for a_smem in [false, true] {
            assert!(!wgmma_fields_swapped_match(
                &g,
                &a,
                &b,
                (lbo, sbo),
                a_smem,
                TF32_TOL
            ));
        }
    }
    if let Some(g) = emu_exact_repeat() {
        wgmma_probe_parity(&g, TOL);
    }
}

/// The same on the GPU: whether the hardware's wgmma reads the layouts as the emulator does.
/// Devices without sm_90a (anything but compute capability 9.0) say so and skip.
#[test]
fn gpu_wgmma_probe_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    if !g.has_wgmma() {
        say_skipped(&format!(
            "{} ({}) has no wgmma (sm_90a only)",
            g.device_name(),
            g.arch()
        ));
        return;
    }
    wgmma_probe_parity(&g, TF32_TOL);
}

/// The token chain under TF32: version 2 (tensor cores) where the widths allow, at the TF32
/// tolerance; with exact products at the f32 one (so the fragment indexing is exact, and what
/// remains is TF32 rounding). Which version ran is counted by the emulator.
#[test]
fn emu_tokens_tf32_fwd_bwd() {
    let ran = |g: &Cuda, name: &str| g.emu_kernel_launches().get(name).copied().unwrap_or(0);
    if let Some(g) = emu() {
        tokens_fwd_bwd_parity(&g, TOL);
        for name in ["tokens_fwd_tf32", "tokens_bwd_tf32"] {
            assert_eq!(ran(&g, name), 0, "{name} ran under precision f32");
        }
    }
    if let Some(g) = emu() {
        let g = g.with_precision(Precision::Tf32);
        tokens_fwd_bwd_parity(&g, TOKENS_TF32_TOL);
        // Four of the seven shapes take the tensor cores (version 3; the last shape, all
        // widths ≤ 32, its `w32` kernels), two stay on version 1, one is not fused; each
        // shape runs twice (to k, v and to u).
        for (name, n) in [
            ("tokens_fwd_v3_tf32", 6),
            ("tokens_fwd_v3w32_tf32", 2),
            ("tokens_bwd_v3_tf32", 6),
            ("tokens_bwd_v3w32_tf32", 2),
            ("tokens_fwd_tf32", 0),
            ("tokens_bwd_tf32", 0),
            ("tokens_fwd_f32", 4),
            ("tokens_bwd_f32", 4),
        ] {
            assert_eq!(ran(&g, name), n, "launches of {name}");
        }
    }
    // Version 2, which version 3 replaced where it applies.
    if let Some(g) = emu() {
        let g = g
            .with_precision(Precision::Tf32)
            .with_fast_paths(FastPaths::all_but("tokens_v3").unwrap());
        tokens_fwd_bwd_parity(&g, TOKENS_TF32_TOL);
        assert_eq!(ran(&g, "tokens_fwd_tf32"), 8, "launches of version 2");
        assert_eq!(ran(&g, "tokens_bwd_tf32"), 8, "launches of version 2");
        for name in [
            "tokens_fwd_v3_tf32",
            "tokens_fwd_v3w32_tf32",
            "tokens_bwd_v3_tf32",
            "tokens_bwd_v3w32_tf32",
        ] {
            assert_eq!(ran(&g, name), 0, "launches of {name}");
        }
    }
    if let Some(g) = emu_exact_repeat() {
        tokens_fwd_bwd_parity(&g, TOL);
    }
}

#[test]
fn gpu_tokens_tf32_fwd_bwd() {
    if let Some(g) = gpu() {
        let g = g.with_precision(Precision::Tf32);
        tokens_fwd_bwd_parity(&g, TOKENS_TF32_TOL);
        // Version 2 (`tokens_v3` off): on a GPU, its only per-op test.
        let g = g.with_fast_paths(FastPaths::all_but("tokens_v3").unwrap());
        tokens_fwd_bwd_parity(&g, TOKENS_TF32_TOL);
    }
}

#[test]
fn emu_linear_tf32_fwd_bwd() {
    if let Some(g) = emu() {
        linear_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL);
    }
    if let Some(g) = emu_exact_repeat() {
        linear_fwd_bwd_parity(&g, TOL);
    }
}

#[test]
fn gpu_linear_tf32_fwd_bwd() {
    if let Some(g) = gpu() {
        linear_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL);
    }
}

#[test]
fn emu_conv2d_tf32_fwd_bwd() {
    if let Some(g) = emu() {
        conv2d_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL, true);
    }
    // The same kernels with full f32 operands: f32 tolerance.
    if let Some(g) = emu_exact_repeat() {
        conv2d_fwd_bwd_parity(&g, TOL, true);
    }
}

#[test]
fn emu_conv_t2d_tf32_fwd_bwd() {
    if let Some(g) = emu() {
        conv_t2d_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL, true);
    }
    if let Some(g) = emu_exact_repeat() {
        conv_t2d_fwd_bwd_parity(&g, TOL, true);
    }
}

/// x rounded to TF32 as the kernels' `to_tf32` does on sm_90 (`cvt.rn`: to nearest, ties to
/// even; infinities and NaN as they are).
fn tf32_rounded(v: &[f32]) -> Vec<f32> {
    v.iter()
        .map(|&x| {
            let u = x.to_bits();
            if u & 0x7f80_0000 == 0x7f80_0000 {
                x
            } else {
                f32::from_bits((u + 0xfff + ((u >> 13) & 1)) & 0xffff_e000)
            }
        })
        .collect()
}

/// The tensor-core convolutions round their operands to TF32 to nearest, not by truncation
/// (what the tensor cores do to the raw f32 bits they are given, and the emulator with them): the
/// TF32 parity tolerance (1e-3) cannot tell the two apart, so here the CPU reference gets x, W
/// and dy already rounded to nearest and the emulated kernels the raw values; then y, dx and dW
/// must agree to f32 tolerances. One layer per kind of kernel, and a check that each kind ran.
/// (db sums dy unrounded on both sides: the parity tests check it.)
#[test]
fn emu_conv_tf32_operands_round_to_nearest() {
    let Some(g) = emu() else { return };
    let g = g.with_precision(Precision::Tf32);
    let c = cpu();
    let t = ConvGeom::transposed;
    let cases = [
        // wg5 forward and dx (version 7, wgmma), v4k5s1 dW
        (
            "same k5 64->64",
            ConvGeom::same(10, 17, 64, 64, 5),
            false,
            true,
        ),
        // v6k5 direct and adjoint gathers (48 channels on one side: not version 7's)
        (
            "same k5 64->48",
            ConvGeom::same(5, 11, 64, 48, 5),
            false,
            true,
        ),
        ("T k5 64->48", t(5, 11, 64, 48, 5, 1, 2, 0), true, false),
        // n8s forward, c4 dx, c4tc dW (64 rows, k3)
        ("T k3 64->4", t(9, 20, 64, 4, 3, 1, 1, 0), true, false),
        // c4 forward, c4tc dW (A masked, k5)
        (
            "same k5 3->64",
            ConvGeom::same(13, 37, 3, 64, 5),
            false,
            true,
        ),
        // k1tc dW, version 3 forward and dx
        (
            "k1 64->64",
            ConvGeom::conv(9, 15, 64, 64, 1, 1, 0),
            false,
            true,
        ),
        // wg5s2 forward and dx (version 7 at stride 2, both gathers), stride-2 dW
        ("T k5 s2 64->64", t(5, 4, 64, 64, 5, 2, 2, 1), true, true),
        // The 5×5 weight gradients on wgmma (`dw_wgmma`), both forms: grid rows 32 wide (units
        // of 32), dy masked as A; g masked as B
        (
            "same k5 64->64 3x32",
            ConvGeom::same(3, 32, 64, 64, 5),
            false,
            true,
        ),
        (
            "T k5 s1 64->64 2x32",
            t(2, 32, 64, 64, 5, 1, 2, 0),
            true,
            true,
        ),
        // ... and at stride 2 (output rows 32 wide; a transposed convolution's input 64 wide:
        // two units per grid row)
        (
            "k5 s2 64->64 6x64",
            ConvGeom::conv(6, 64, 64, 64, 5, 2, 2),
            false,
            true,
        ),
        (
            "T k5 s2 64->64 2x64",
            t(2, 64, 64, 64, 5, 2, 2, 1),
            true,
            true,
        ),
        // ... over 32 gathered channels (one channel block: grid.y = the 5 rows of taps)
        (
            "same k5 32->64 3x32",
            ConvGeom::same(3, 32, 32, 64, 5),
            false,
            true,
        ),
        (
            "T k5 s1 64->32 2x32",
            t(2, 32, 64, 32, 5, 1, 2, 0),
            true,
            true,
        ),
        // v5s2 forward (48 outputs: not version 7's)
        ("T k5 s2 64->48", t(4, 5, 64, 48, 5, 2, 2, 1), true, false),
        // 32 channels: v6c32, dW v4r32
        (
            "same k5 32->32",
            ConvGeom::same(11, 18, 32, 32, 5),
            false,
            true,
        ),
        // version 3's 32 × 256 dW tiles (channels a multiple of 4), version 2's forward and dx
        // (not a multiple of 16)
        (
            "same k3 12->20",
            ConvGeom::same(7, 9, 12, 20, 3),
            false,
            true,
        ),
        // version 2 everywhere (6 channels)
        ("same k3 6->10", ConvGeom::same(7, 9, 6, 10, 3), false, true),
    ];
    for (ci, (name, geom, transposed, relu)) in cases.into_iter().enumerate() {
        let batch = 2;
        let seed = 4100 + 10 * ci as u64;
        let x = rand(batch * geom.in_len(), seed, 1.0);
        let w = rand(geom.weight_len(), seed + 1, 0.5);
        let b = rand(geom.c_out, seed + 2, 0.5);
        let (xr, wr) = (tf32_rounded(&x), tf32_rounded(&w));
        let mut y = vec![0.0f32; batch * geom.out_len()];
        let (xg, wg, bg) = (up(&g, &x), up(&g, &w), up(&g, &b));
        let mut yg = poisoned(&g, y.len());
        conv_fwd(&c, transposed, &geom, batch, &xr, &wr, &b, relu, &mut y);
        conv_fwd(&g, transposed, &geom, batch, &xg, &wg, &bg, relu, &mut yg);
        check_tol(&format!("{name} y, operands rounded"), &g, &yg, &y, TOL);
        let yg = up(&g, &y);
        let dy = rand(y.len(), seed + 3, 1.0);
        let dyr = tf32_rounded(&dy);
        let dyg = up(&g, &dy);
        let (mut dx, mut dw, mut db) = (
            vec![0.0f32; x.len()],
            vec![0.0f32; w.len()],
            vec![0.0f32; b.len()],
        );
        let (mut dxg, mut dwg, mut dbg) = (up(&g, &dx), up(&g, &dw), up(&g, &db));
        c.conv_bwd_set_dx(
            transposed, &geom, batch, &xr, &wr, &y, relu, &dyr, &mut dx, &mut dw, &mut db,
        );
        g.conv_bwd_set_dx(
            transposed, &geom, batch, &xg, &wg, &yg, relu, &dyg, &mut dxg, &mut dwg, &mut dbg,
        );
        check_tol(&format!("{name} dx, operands rounded"), &g, &dxg, &dx, TOL);
        check_tol(&format!("{name} dw, operands rounded"), &g, &dwg, &dw, TOL);
    }
    assert_kernels_ran(
        &g,
        |_| false,
        &[
            "conv_igemm_direct_wg5",
            "conv_igemm_adjoint_wg5_",
            "conv_igemm_adjoint_wg5s2",
            "conv_igemm_direct_wg5s2",
            "conv_igemm_direct_v6k5",
            "conv_igemm_adjoint_v6k5",
            "conv_igemm_adjoint_n8sk3",
            "conv_igemm_adjoint_v5n8",
            "conv_igemm_direct_c4",
            "conv_igemm_direct_v3",
            "conv_igemm_adjoint_v5s2",
            "conv_igemm_direct_v6c32",
            "conv_igemm_direct_tf32",
            "conv_dw_partial_v4k5s1",
            "conv_dw_partial_v4k5s2",
            "conv_dw_partial_wg5s1_",
            "conv_dw_partial_wg5s1t",
            "conv_dw_partial_wg5s2_",
            "conv_dw_partial_wg5s2t",
            "conv_dw_partial_c4tck3",
            "conv_dw_partial_c4tck5",
            "conv_dw_partial_k1tc",
            "conv_dw_partial_v4r32",
            "conv_dw_partial_v3r32",
            "conv_dw_partial_tf32",
        ],
    );
}

/// Version 4's 5×5 weight gradients at stride 1 in units of 32, which version 5 (`dw_v5`) or
/// the wgmma form (`dw_wgmma`) now computes wherever they apply: the conv and transposed-conv
/// cases of the tests above with both off.
fn dw4_u32_k5_parity(g: Cuda, tol: f64) {
    let cases = [
        (
            "same k5 64->64 2x64 dw4 u32, dw_v5 and dw_wgmma off",
            ConvGeom::same(2, 64, 64, 64, 5),
            false,
            1144,
        ),
        (
            "T k5 s1 64->64 2x32 dw4 u32, dw_v5 and dw_wgmma off",
            ConvGeom::transposed(2, 32, 64, 64, 5, 1, 2, 0),
            true,
            323,
        ),
    ];
    conv_cases_with_off(g, "dw_v5,dw_wgmma", &cases, tol);
}

/// `conv_case` (through a ReLU) for each (name, geometry, transposed, seed) under TF32 with the
/// fast paths in `off` switched off; the backend back, for the emulator's launch record.
fn conv_cases_with_off(
    g: Cuda,
    off: &str,
    cases: &[(&str, ConvGeom, bool, u64)],
    tol: f64,
) -> Cuda {
    let g = g
        .with_precision(Precision::Tf32)
        .with_fast_paths(FastPaths::all_but(off).unwrap());
    for &(name, geom, transposed, seed) in cases {
        conv_case(&g, name, geom, transposed, true, seed, tol);
    }
    g
}

/// In the emulator's launch record: no kernel named as `absent` says ran, and a kernel of each
/// kind in `kinds` (name prefixes) did.
fn assert_kernels_ran(g: &Cuda, absent: impl Fn(&str) -> bool, kinds: &[&str]) {
    let launched = g.emu_kernel_launches();
    assert!(!launched.keys().any(|k| absent(k)), "{launched:?}");
    for kind in kinds {
        assert!(
            launched.keys().any(|k| k.starts_with(kind)),
            "no {kind}* kernel ran: {launched:?}"
        );
    }
}

#[test]
fn emu_conv_dw4_u32_k5_without_dw5() {
    if let Some(g) = emu() {
        dw4_u32_k5_parity(g, TF32_TOL);
    }
}

#[test]
fn gpu_conv_dw4_u32_k5_without_dw5() {
    if let Some(g) = gpu() {
        dw4_u32_k5_parity(g, TF32_TOL);
    }
}

/// The 5×5 weight gradients in units of 32 that the wgmma form (`dw_wgmma`) takes where it can,
/// with it off (on an H100 or H200 this is their only per-op test): version 5 at stride 1, and
/// version 4's `v4k5s2u32` at stride 2; the conv and transposed-conv cases of the tests above.
fn dw_without_wgmma_parity(g: Cuda, tol: f64) -> Cuda {
    let t = ConvGeom::transposed;
    let cases = [
        (
            "same k5 64->128 3x32 dw5, dw_wgmma off",
            ConvGeom::same(3, 32, 64, 128, 5),
            false,
            1146,
        ),
        (
            "T k5 s1 64->64 2x32 dw5, dw_wgmma off",
            t(2, 32, 64, 64, 5, 1, 2, 0),
            true,
            323,
        ),
        (
            "k5 s2 64->64 6x64 dw4 u32, dw_wgmma off",
            ConvGeom::conv(6, 64, 64, 64, 5, 2, 2),
            false,
            1147,
        ),
        (
            "T k5 s2 op1 64->64 2x32 u32, dw_wgmma off",
            t(2, 32, 64, 64, 5, 2, 2, 1),
            true,
            322,
        ),
    ];
    conv_cases_with_off(g, "dw_wgmma", &cases, tol)
}

#[test]
fn emu_conv_dw_without_wgmma() {
    let Some(g) = emu() else { return };
    let g = dw_without_wgmma_parity(g, TF32_TOL);
    assert_kernels_ran(
        &g,
        |k| k.starts_with("conv_dw_partial_wg"),
        &["conv_dw_partial_v5k5s1", "conv_dw_partial_v4k5s2u32"],
    );
}

#[test]
fn gpu_conv_dw_without_wgmma() {
    if let Some(g) = gpu() {
        dw_without_wgmma_parity(g, TF32_TOL);
    }
}

/// The L2 read probe of the kernel benchmark (`l2_read_peak_f32`) reads what it says: each
/// thread's sum over its float4s at (e + it·S) mod n4, wrapping the buffer several times.
#[test]
fn emu_l2_read_probe_sums_the_float4s_it_reads() {
    let Some(g) = emu() else { return };
    let buf: Vec<f32> = (0..4 * 64).map(|i| (i % 13) as f32 / 8.0).collect();
    let (blocks, threads, iters) = (3, 32, 9);
    let (sums, ms) = g.l2_read_probe(&buf, iters, blocks, threads, None).unwrap();
    assert!(ms.is_none());
    let stride = blocks * threads;
    for (e, &got) in sums.iter().enumerate() {
        let mut s = [0.0f32; 4];
        for it in 0..iters as usize {
            let q = (e + it * stride) % 64;
            for (c, sc) in s.iter_mut().enumerate() {
                *sc += buf[4 * q + c];
            }
        }
        assert_eq!(got, ((s[0] + s[1]) + s[2]) + s[3], "thread {e}");
    }
}

/// The 64 → 64 5×5 passes that version 7 (`conv_wgmma`) takes where it can, with it off:
/// version 6 at stride 1 (forward and dx, direct and adjoint, pad 2 and 0) and `v5s2` at stride
/// 2 (both gathers: a transposed convolution's forward and a strided one's dx, and the other
/// way round).
fn conv_64_without_wgmma_parity(g: Cuda, tol: f64) -> Cuda {
    let t = ConvGeom::transposed;
    let cases = [
        (
            "same k5 64->64 13x37, conv_wgmma off",
            ConvGeom::same(13, 37, 64, 64, 5),
            false,
            331,
        ),
        (
            "k5 p0 64->64, conv_wgmma off",
            ConvGeom::conv(12, 21, 64, 64, 5, 1, 0),
            false,
            332,
        ),
        (
            "T k5 s2 op1 64->64, conv_wgmma off",
            t(5, 4, 64, 64, 5, 2, 2, 1),
            true,
            333,
        ),
        (
            "k5 s2 64->64 9x13, conv_wgmma off",
            ConvGeom::conv(9, 13, 64, 64, 5, 2, 2),
            false,
            334,
        ),
    ];
    conv_cases_with_off(g, "conv_wgmma", &cases, tol)
}

#[test]
fn emu_conv_64_without_wgmma() {
    let Some(g) = emu() else { return };
    let g = conv_64_without_wgmma_parity(g, TF32_TOL);
    assert_kernels_ran(
        &g,
        |k| k.contains("_wg5"),
        &[
            "conv_igemm_direct_v6k5",
            "conv_igemm_adjoint_v6k5",
            "conv_igemm_adjoint_v5s2k5",
            "conv_igemm_direct_v5s2k5",
        ],
    );
}

#[test]
fn gpu_conv_64_without_wgmma() {
    if let Some(g) = gpu() {
        conv_64_without_wgmma_parity(g, TF32_TOL);
    }
}

#[test]
fn gpu_conv2d_tf32_fwd_bwd() {
    if let Some(g) = gpu() {
        conv2d_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL, true);
    }
}

#[test]
fn gpu_conv_t2d_tf32_fwd_bwd() {
    if let Some(g) = gpu() {
        conv_t2d_fwd_bwd_parity(&g.with_precision(Precision::Tf32), TF32_TOL, true);
    }
}

/// The test harness itself, with the CPU standing in for the device: every comparison must come
/// out exact, and this runs everywhere (so the GPU tests are known to be well-formed).
#[test]
fn harness_runs_with_cpu_as_device() {
    let c = cpu();
    conv2d_fwd_bwd_parity(&c, TOL, true);
    conv_t2d_fwd_bwd_parity(&c, TOL, true);
    linear_fwd_bwd_parity(&c, TOL);
    layernorm_fwd_bwd_parity(&c);
    posembed_fwd_bwd_parity(&c);
    attention_fwd_bwd_parity(&c);
    gru_gates_fwd_bwd_parity(&c);
    composite_mse_fwd_bwd_parity(&c);
    elementwise_rng_and_host_reads_parity(&c);
    adam_step_parity(&c);
    opt_step_parity(&c);
    train_step_parity(
        cpu(),
        small_config(|m| m.implicit_diff = true),
        "harness implicit",
    );
    train_step_parity(
        cpu(),
        small_config(|m| m.implicit_diff = false),
        "harness bptt",
    );
}

// ---------------------------------------------------------------------------------------------
// Whole training steps.

/// A small model (8×8 images, K = 3, D = 8) with grad clipping and weight decay; `edit` changes it.
fn small_config(edit: impl FnOnce(&mut ModelConfig)) -> Config {
    let yaml = "Model:\n  num_slots: 3\n  num_heads: 1\n  num_layers: 2\n  feat_size: 8\n  slot_size: 8\n  \
         mlp_hidden_size: 12\n  max_iter_fwd: 3\n  resolution: 8\n  encoder_channels: [4, 6]\n  \
         decoder: broadcast\n  decoder_init_size: 2\n  decoder_channels: [6, 5, 4]\n\
         Training:\n  data_type: tetrominoes\n  batch_size: 3\n  lr: 0.001\n  warmup_steps: 0\n  \
         weight_decay: 0.01\n  grad_clip: 0.05\n  seed: 5\n";
    let mut cfg = Config::from_yaml(yaml).unwrap_or_else(|e| panic!("{e}"));
    edit(&mut cfg.model);
    cfg.validate().unwrap_or_else(|e| panic!("{e}"));
    cfg
}

/// L2 norm in f64.
fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt()
}

/// Relative errors of per-tensor lists; a tensor whose CPU norm is below 1e-3 of the largest is
/// compared against that largest norm (its values are rounding noise around a true zero).
/// Tensors with `skip[t]` are only checked to be finite.
fn check_tensors(
    what: &str,
    names: &[String],
    got: &[Vec<f32>],
    want: &[Vec<f32>],
    skip: &[bool],
    tol: f64,
) {
    let biggest = want.iter().map(|w| norm(w)).fold(0.0f64, f64::max);
    let mut worst = (0.0f64, String::new());
    for (t, ((name, gv), wv)) in names.iter().zip(got).zip(want).enumerate() {
        assert_eq!(gv.len(), wv.len(), "{what} {name}: length");
        if let Some(i) = gv.iter().position(|v| !v.is_finite()) {
            panic!("{what} {name}: element {i} is {}", gv[i]);
        }
        if skip[t] {
            continue;
        }
        let diff: f64 = gv
            .iter()
            .zip(wv)
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den = norm(wv).max(1e-3 * biggest).max(1e-300);
        let e = if diff == 0.0 { 0.0 } else { diff / den };
        if e > worst.0 {
            worst = (e, name.clone());
        }
        assert!(
            e <= tol,
            "{what} {name}: relative L2 error {e:.3e} > {tol:e}"
        );
    }
    eprintln!(
        "{what}: worst relative L2 error {:.2e} ({})",
        worst.0, worst.1
    );
}

/// The update half of `Session::train_step` (gradient norm, clipping, AdamW on every tensor),
/// written out so that the test can give both backends the same gradients first.
fn update<B: Backend>(s: &mut Session<B>) -> f64 {
    let sq: f64 = s.model.grads.iter().map(|g| s.be.sum_squares(g)).sum();
    let grad_norm = sq.sqrt();
    let t = &s.cfg.training;
    let grad_scale = match t.grad_clip {
        Some(c) if grad_norm > c => c / grad_norm,
        _ => 1.0,
    };
    let hp = AdamStep {
        lr: s.lr(),
        beta1: t.adam_beta1,
        beta2: t.adam_beta2,
        eps: t.adam_eps,
        weight_decay: t.weight_decay,
        t: s.step + 1,
        grad_scale,
    };
    for i in 0..s.model.params.len() {
        s.be.adam_step(
            &hp,
            &mut s.model.params[i],
            &s.model.grads[i],
            &mut s.adam_m[i],
            &mut s.adam_v[i],
        );
    }
    s.step += 1;
    grad_norm
}

fn close(what: &str, got: f64, want: f64, tol: f64) {
    eprintln!("{what}: cpu {want} gpu {got}");
    assert!(got.is_finite(), "{what}: {got}");
    assert!(
        (got - want).abs() <= tol * want.abs(),
        "{what}: {got} vs {want} (relative {:.3e})",
        (got - want).abs() / want.abs()
    );
}

/// Whole training steps on `g` and on `Cpu<f32>` from the same initial parameters and images.
/// Two steps: forward + backward (loss and every gradient compared), then the CPU's gradients
/// are given to `g` too (a gradient that is a true zero in exact arithmetic, such as the slot
/// LayerNorm bias or the alpha bias of the last decoder layer, is rounding noise that Adam
/// normalises to ±lr, so updates from the two backends' own gradients are not comparable) and
/// both update (gradient norm, clipping, AdamW): parameters and moments compared. A third step
/// goes through `Session::train_step` itself: loss and gradient norm compared.
fn train_step_parity<B: Backend>(g: B, cfg: Config, label: &str) -> B {
    train_step_parity_tol(g, cfg, label, TOL, STEP_GRAD_TOL)
}

/// [`train_step_parity`] with the tolerances for the loss (and gradient norm) and for the
/// gradients given. Returns the backend that ran the step.
fn train_step_parity_tol<B: Backend>(
    g: B,
    cfg: Config,
    label: &str,
    loss_tol: f64,
    grad_tol: f64,
) -> B {
    step_parity(g, cfg, label, loss_tol, grad_tol, true)
}

/// The first half of [`train_step_parity`]'s first step: the loss and every gradient of one
/// forward and backward pass, where the update and the later steps would run no kernel of
/// another kind (the fast-path switches choose forward and backward kernels only).
fn gradient_parity<B: Backend>(g: B, cfg: Config, label: &str) -> B {
    step_parity(g, cfg, label, TOL, STEP_GRAD_TOL, false)
}

fn step_parity<B: Backend>(
    g: B,
    cfg: Config,
    label: &str,
    loss_tol: f64,
    grad_tol: f64,
    whole_steps: bool,
) -> B {
    let mut sc = Session::new(cpu(), cfg.clone());
    let mut sg = Session::new(g, cfg.clone());
    let res = cfg.model.resolution;
    let names: Vec<String> = sc.model.arch.specs.iter().map(|s| s.name.clone()).collect();
    let nt = names.len();
    let none = vec![false; nt];
    let images = |step: u64| rand(cfg.training.batch_size * res * res * 3, 9000 + step, 1.0);
    for step in 0..2u64 {
        let tag = format!("{label} step {step}");
        let im = images(step);
        let (lc, _) = sc.forward_backward(&im);
        let (lg, _) = sg.forward_backward(&im);
        close(&format!("{tag} loss"), lg, lc, loss_tol);
        let gc: Vec<Vec<f32>> = sc.model.grads.clone();
        let gg: Vec<Vec<f32>> = sg
            .model
            .grads
            .iter()
            .map(|b| sg.be.download_f32(b))
            .collect();
        check_tensors(
            &format!("{tag} gradients"),
            &names,
            &gg,
            &gc,
            &none,
            grad_tol,
        );
        if !whole_steps {
            return sg.be;
        }
        for (buf, v) in sg.model.grads.iter_mut().zip(&gc) {
            sg.be.upload_f32(v, buf);
        }
        let (nc, ng) = (update(&mut sc), update(&mut sg));
        close(&format!("{tag} grad norm (same gradients)"), ng, nc, 1e-12);
        let pc: Vec<Vec<f32>> = sc.model.params.clone();
        let pg: Vec<Vec<f32>> = sg
            .model
            .params
            .iter()
            .map(|b| sg.be.download_f32(b))
            .collect();
        check_tensors(
            &format!("{tag} params after AdamW"),
            &names,
            &pg,
            &pc,
            &none,
            1e-6,
        );
        let mc: Vec<Vec<f32>> = sc.adam_m.clone();
        let mg: Vec<Vec<f32>> = sg.adam_m.iter().map(|b| sg.be.download_f32(b)).collect();
        check_tensors(&format!("{tag} adam m"), &names, &mg, &mc, &none, 1e-6);
        let vc: Vec<Vec<f32>> = sc.adam_v.clone();
        let vg: Vec<Vec<f32>> = sg.adam_v.iter().map(|b| sg.be.download_f32(b)).collect();
        check_tensors(&format!("{tag} adam v"), &names, &vg, &vc, &none, 1e-6);
    }
    let im = images(2);
    sc.train_step(&im);
    sg.train_step(&im);
    let (oc, og) = (sc.opt_report(), sg.opt_report());
    assert_eq!((oc.skipped, og.skipped), (0, 0), "{label}: step skipped");
    assert_eq!((oc.updates, og.updates), (1, 1), "{label}");
    close(
        &format!("{label} train_step loss"),
        og.last_loss,
        oc.last_loss,
        loss_tol,
    );
    close(
        &format!("{label} train_step grad norm"),
        og.last_grad_norm,
        oc.last_grad_norm,
        loss_tol,
    );
    assert_eq!(sc.step, sg.step);
    sg.be
}

/// Two heads, dropout and the full decoder, in either gradient mode.
fn heads_dropout_full(implicit: bool) -> Config {
    small_config(|m| {
        m.implicit_diff = implicit;
        m.num_heads = 2;
        m.dropout = 0.2;
        m.decoder = DecoderKind::Full;
        m.decoder_channels = Some(vec![6, 5]);
    })
}

emu_and_gpu_tests!(emu_train_step_bptt, gpu_train_step_bptt, |g, kind| {
    train_step_parity(
        g,
        small_config(|m| m.implicit_diff = false),
        &format!("{kind} bptt"),
    )
});
emu_and_gpu_tests!(
    emu_train_step_implicit,
    gpu_train_step_implicit,
    |g, kind| {
        train_step_parity(
            g,
            small_config(|m| m.implicit_diff = true),
            &format!("{kind} implicit"),
        )
    }
);
emu_and_gpu_tests!(
    emu_train_step_implicit_two_heads_dropout_full_decoder,
    gpu_train_step_implicit_two_heads_dropout_full_decoder,
    |g, kind| train_step_parity(
        g,
        heads_dropout_full(true),
        &format!("{kind} implicit, 2 heads, dropout, full decoder"),
    )
);
emu_and_gpu_tests!(
    emu_train_step_bptt_two_heads_dropout_full_decoder,
    gpu_train_step_bptt_two_heads_dropout_full_decoder,
    |g, kind| train_step_parity(
        g,
        heads_dropout_full(false),
        &format!("{kind} bptt, 2 heads, dropout, full decoder"),
    )
);

/// TF32 tolerance for the gradients of a whole step (the loss and gradient norm use TF32_TOL).
/// With TF32 in every convolution and linear layer, forward and backward, rounding compounds,
/// and small gradients that are sums of cancelling terms (the slot-attention LayerNorms and MLP
/// of this tiny D = 8 model) come out up to 8.5e-2 away from f32 in the emulator. That this is
/// rounding and not indexing is checked separately: with the emulator's TF32 rounding switched
/// off (`emu_train_step_tf32_exact_products_*`) the same kernels agree to STEP_GRAD_TOL.
const TF32_STEP_GRAD_TOL: f64 = 0.2;

emu_and_gpu_tests!(
    emu_train_step_tf32_implicit,
    gpu_train_step_tf32_implicit,
    |g, kind| {
        train_step_parity_tol(
            g.with_precision(Precision::Tf32),
            small_config(|m| m.implicit_diff = true),
            &format!("{kind} tf32 implicit"),
            TF32_TOL,
            TF32_STEP_GRAD_TOL,
        )
    }
);

#[test]
fn emu_train_step_tf32_bptt_two_heads_dropout_full_decoder() {
    let Some(g) = emu() else { return };
    train_step_parity_tol(
        g.with_precision(Precision::Tf32),
        heads_dropout_full(false),
        "emulated tf32 bptt, 2 heads, dropout, full decoder",
        TF32_TOL,
        TF32_STEP_GRAD_TOL,
    );
}

/// The tensor-core path of a whole step with full f32 operands (emulator only): f32 tolerances.
#[test]
fn emu_train_step_tf32_exact_products_implicit() {
    let Some(g) = emu() else { return };
    train_step_parity(
        g.with_precision(Precision::Tf32).with_emulator_exact_tf32(),
        small_config(|m| m.implicit_diff = true),
        "emulated tf32 kernels, exact products, implicit",
    );
}

/// Layers 16 and 32 wide, so that the whole step runs version 3 of the tensor-core passes
/// (gathered channels a multiple of 16) wherever it applies.
#[test]
fn emu_train_step_tf32_exact_products_16_wide() {
    let Some(g) = emu() else { return };
    train_step_parity(
        g.with_precision(Precision::Tf32).with_emulator_exact_tf32(),
        small_config(|m| {
            m.implicit_diff = true;
            m.encoder_channels = vec![16, 16];
            m.decoder_channels = Some(vec![16, 16, 4]);
            m.feat_size = 16;
            m.slot_size = 16;
            m.mlp_hidden_size = 32;
        }),
        "emulated tf32 kernels, exact products, implicit, 16 wide",
    );
}

/// Layers 16 wide with the full decoder and dropout: every fast path of the CUDA backend
/// applies. (The encoder's second layer maps 32 channels to 32 at stride 1, `v6c32` of the
/// activation passes; its third 32 to 64, so that its forward takes the 32-wide k-tiles of
/// `conv_k32`, a gather of a multiple of 32 channels into more than 32, and its weight gradient
/// version 4, `dw_v4`: 64 rows, 32 gathered channels; its fourth maps 64 to 64 at stride 1,
/// versions 5 and 6 of the activation passes, `conv_v5` and `conv_v6`.)
fn all_fast_paths_config() -> Config {
    small_config(|m| {
        m.implicit_diff = true;
        m.dropout = 0.1;
        m.encoder_channels = vec![32, 32, 64, 64];
        m.decoder = DecoderKind::Full;
        m.decoder_channels = Some(vec![16, 16]);
        m.feat_size = 16;
        m.slot_size = 16;
        m.mlp_hidden_size = 32;
    })
}

/// Whether kernel `name` belongs to fast path `path` (one of `FastPaths::NAMES`).
fn fast_path_kernel(path: &str, name: &str) -> bool {
    match path {
        "conv_v3" => name.starts_with("conv_igemm_") && name.contains("_v3"),
        "conv_k32" => name.starts_with("conv_igemm_") && name.contains("_k32_"),
        // (Version 6 runs within version 5.)
        "conv_v5" => {
            name.starts_with("conv_igemm_") && (name.contains("_v5") || name.contains("_v6"))
        }
        "conv_v6" => name.starts_with("conv_igemm_") && name.contains("_v6"),
        "conv_wgmma" => name.starts_with("conv_igemm_") && name.contains("_wg5"),
        "conv_c4" => name.starts_with("conv_igemm_") && name.contains("_c4"),
        "conv_n8s" => name.starts_with("conv_igemm_") && name.contains("_n8s"),
        "dw_v3" => name.starts_with("conv_dw_partial_v3"),
        "dw_v4" => name.starts_with("conv_dw_partial_v4"),
        "dw_units" => {
            name.starts_with("conv_dw_partial_v4") && (name.contains("u40") || name.contains("u32"))
        }
        "dw_v5" => name.starts_with("conv_dw_partial_v5"),
        "dw_wgmma" => name.starts_with("conv_dw_partial_wg"),
        // (Version 3, `dw_c4_tc`, runs within `dw_c4`.)
        "dw_c4" => name.starts_with("conv_dw_partial_c4"),
        "dw_c4_tc" => name.starts_with("conv_dw_partial_c4tc"),
        "dw_k1" => name.starts_with("conv_dw_partial_k1tc"),
        // (Version 2's kernels, version 3's aside: version 1 is attention_{fwd,bwd}_f32.)
        "attention_v2" => {
            name.starts_with("attention_")
                && !name.contains("_v3k")
                && !name.contains("_v4k")
                && name != "attention_fwd_f32"
                && name != "attention_bwd_f32"
        }
        "attention_v3" => name.starts_with("attention_") && name.contains("_v3k"),
        "attention_v4" => name.starts_with("attention_") && name.contains("_v4k"),
        "tokens" => name.starts_with("tokens_fwd_") || name.starts_with("tokens_bwd_"),
        "tokens_v3" => name.starts_with("tokens_fwd_v3") || name.starts_with("tokens_bwd_v3"),
        // (The fold's own kernel: its weight products, once per forward and backward.)
        "kv_fold" => name == "matmul_small_f32",
        "slot_cell" => name.starts_with("slot_query_") || name.starts_with("slot_update_"),
        "bcast_split" => name.starts_with("bconv_"),
        "conv_splitk" => name == "conv_splitk_reduce_f32",
        _ => panic!("no kernels listed for fast path {path}"),
    }
}

/// No fast path off, each one off alone, and all of them off.
fn fast_path_cases() -> Vec<(String, FastPaths)> {
    let mut cases = vec![("none".to_string(), FastPaths::ALL)];
    for name in FastPaths::NAMES {
        cases.push((name.to_string(), FastPaths::all_but(name).unwrap()));
    }
    cases.push(("all".to_string(), FastPaths::all_but("all").unwrap()));
    cases
}

/// Each fast path switched off (`SLOTFIX_CUDA_DISABLE`) leaves a training step's loss and
/// gradients equal to the CPU's, and none of that path's kernels runs while every other path's
/// still does; with all of them on, whole training steps equal the CPU's and each path's
/// kernels run. (Exact TF32 products, so f32 tolerances.)
#[test]
fn emu_each_fast_path_off_keeps_the_step_and_drops_its_kernels() {
    for (off, fast) in fast_path_cases() {
        let Some(g) = emu() else { return };
        let g = g
            .with_precision(Precision::Tf32)
            .with_emulator_exact_tf32()
            .with_fast_paths(fast);
        let label = format!("emulated, fast paths off: {off}");
        let g = match off.as_str() {
            "none" => train_step_parity(g, all_fast_paths_config(), &label),
            _ => gradient_parity(g, all_fast_paths_config(), &label),
        };
        let launched = g.emu_kernel_launches();
        for path in FastPaths::NAMES {
            let ran: Vec<&str> = launched
                .keys()
                .copied()
                .filter(|k| fast_path_kernel(path, k))
                .collect();
            // Split-K serves the one-image passes of the split broadcast convolution under
            // version 3: it runs only where both do.
            let needs: &[&str] = match path {
                "conv_splitk" => &["conv_v3", "bcast_split"],
                "conv_k32" => &["conv_v3"],
                // (Version 5 takes the permuted weights of version 3.)
                "conv_v5" => &["conv_v3"],
                // (Version 6 runs within version 5.)
                "conv_v6" => &["conv_v3", "conv_v5"],
                // (Version 7 replaces version 5 or 6 where it applies.)
                "conv_wgmma" => &["conv_v3", "conv_v5"],
                "conv_n8s" => &["conv_v3", "conv_v5"],
                "dw_units" => &["dw_v4"],
                // (Version 5 takes version 4's units of 32.)
                "dw_v5" => &["dw_v4", "dw_units"],
                // (The wgmma form takes version 4's units of 32.)
                "dw_wgmma" => &["dw_v4", "dw_units"],
                "dw_c4_tc" => &["dw_c4"],
                // (Version 3 of the attention kernels runs within version 2.)
                "attention_v3" => &["attention_v2"],
                // (Version 4 runs within version 2, where k = v: under the fold.)
                "attention_v4" => &["attention_v2", "kv_fold"],
                // (Version 3 is a form of the fused chain.)
                "tokens_v3" => &["tokens"],
                _ => &[],
            };
            // (Wider units, and version 5 within them (and its wgmma form), need grid rows 33
            // to 40 wide or a
            // multiple of 32, which this 8 × 8 model has not: the conv tests' u40, u32 and dw5
            // cases check them.)
            // (`dw_k1` needs a 1×1 layer of 64 inputs into a multiple of 64, `conv_n8s` a
            // gather of 64 channels into at most 8, which this 16-wide model has not: the
            // linear and conv tests' 64-wide cases check them.)
            let applies = !["dw_units", "dw_v5", "dw_wgmma", "dw_k1", "conv_n8s"].contains(&path);
            let on_all = |names: &[&str]| names.iter().all(|n| fast.is_on(n) == Some(true));
            // (Version 4 of the attention kernels replaces version 3 wherever it runs: this
            // model's attention, one head, folded.)
            let replaced = path == "attention_v3" && on_all(&["attention_v4", "kv_fold"]);
            let on = applies && !replaced && on_all(&[path]) && on_all(needs);
            assert_eq!(
                !ran.is_empty(),
                on,
                "{label}: fast path {path} is {}, but its kernels that ran are {ran:?}",
                if on { "on" } else { "off" }
            );
        }
    }
}

/// On the GPU: each escape hatch of `SLOTFIX_CUDA_DISABLE` gives the CPU's step too. In f32,
/// where four of the seven paths apply (the tensor-core versions and split-K need TF32; their
/// TF32 per-op tests run on the GPU too) and f32 tolerances hold. With TF32 rounding, this
/// 16-wide model's q-projection gradient after one update (7e-4 of the largest gradient's
/// norm) is off by 5e-4 of the largest, in the emulator too, whichever paths run: 0.46
/// against the TF32 step tolerance's floor of 1e-3 of the largest. Rounding, not indexing: with exact products the
/// emulator test above agrees to f32 tolerances. Which kernels ran is recorded only in the
/// emulator.
#[test]
fn gpu_each_fast_path_off_keeps_the_step() {
    for (off, fast) in fast_path_cases() {
        let Some(g) = gpu() else { return };
        train_step_parity(
            g.with_fast_paths(fast),
            all_fast_paths_config(),
            &format!("GPU f32, fast paths off: {off}"),
        );
    }
}

#[test]
fn emu_train_step_tf32_exact_products_bptt_two_heads_dropout_full_decoder() {
    let Some(g) = emu() else { return };
    train_step_parity(
        g.with_precision(Precision::Tf32).with_emulator_exact_tf32(),
        heads_dropout_full(false),
        "emulated tf32 kernels, exact products, bptt, 2 heads, dropout, full decoder",
    );
}

/// With the decoder's first convolution composed (`SLOTFIX_CUDA_DISABLE=bcast_split`), the
/// memory plan counts the broadcast input and its gradient, as the backend then allocates them.
#[test]
fn emu_memory_plan_follows_the_bcast_split_switch() {
    let Some(g) = emu() else { return };
    let cfg = small_config(|m| {
        m.decoder = DecoderKind::Full;
        m.decoder_channels = Some(vec![6, 5]);
    });
    let arch = slotfix::model::Arch::new(&cfg.model);
    let b = cfg.training.batch_size;
    let split = MemoryPlan::new(&g, &arch, b, 0).total();
    let g = g.with_fast_paths(FastPaths::all_but("bcast_split").unwrap());
    let composed = MemoryPlan::new(&g, &arch, b, 0).total();
    let broadcast = (b * arch.k * arch.dec_grid * arch.dec_grid * arch.d * 4) as u64;
    assert_eq!(
        composed - split,
        2 * broadcast,
        "the broadcast input and its gradient"
    );
    allocates_about_the_plan(g, &cfg, composed, 78);
}

/// A training step of `cfg` on `g` allocates at least the `planned` bytes and at most half as
/// much again (scratch buffers, the optimizer).
fn allocates_about_the_plan(g: Cuda, cfg: &Config, planned: u64, seed: u64) {
    let before = g.allocated_bytes();
    let mut s = Session::new(g, cfg.clone());
    let (b, res) = (cfg.training.batch_size, cfg.model.resolution);
    s.train_step(&rand(b * res * res * 3, seed, 1.0));
    let allocated = s.be.allocated_bytes() - before;
    assert!(
        allocated >= planned && allocated - planned <= planned / 2,
        "{allocated} bytes allocated, {planned} planned"
    );
}

/// With the fold off (`SLOTFIX_CUDA_DISABLE=kv_fold`), the memory plan counts k, v and d v (the
/// fold keeps none of them, d u takes d k's buffer, and it adds its small weights), as the
/// backend then allocates them.
#[test]
fn emu_memory_plan_follows_the_kv_fold_switch() {
    let Some(g) = emu() else { return };
    let cfg = small_config(|m| m.implicit_diff = true);
    let arch = slotfix::model::Arch::new(&cfg.model);
    assert!(arch.kv_foldable(), "one head, feat = d");
    let b = cfg.training.batch_size;
    let folded = MemoryPlan::new(&g, &arch, b, 0).total();
    let g = g.with_fast_paths(FastPaths::all_but("kv_fold").unwrap());
    let plain = MemoryPlan::new(&g, &arch, b, 0).total();
    let tokens = (b * arch.pixels() * arch.d * 4) as u64;
    // (The fold's own: W_qk, W_vi and their gradients, 4·d·feat floats each pair.)
    let fold_weights = (2 * 4 * arch.d * arch.feat * 4) as u64;
    assert_eq!(plain + fold_weights, folded + 3 * tokens, "k, v and d v");
    allocates_about_the_plan(g, &cfg, plain, 79);
}

/// Training steps queue their work, read nothing back and allocate nothing: the loss, gradient
/// norm and non-finite checks stay on the device until the host asks (`Session::opt_report`),
/// and scratch buffers come from the backend's pool after the first step.
fn train_steps_make_no_host_read_or_allocation(g: Cuda, full_decoder: bool, label: &str) {
    let mut cfg = small_config(|m| {
        m.implicit_diff = true;
        m.dropout = 0.1;
        if full_decoder {
            // (Its first convolution split by border classes: ops::bcastconv.)
            m.decoder = DecoderKind::Full;
            m.decoder_channels = Some(vec![6, 5]);
        }
    });
    // Eager steps, so that the launches per step are counted (a replay launches none).
    cfg.training.cuda_graph = false;
    let res = cfg.model.resolution;
    let before_session = g.allocated_bytes();
    let mut s = Session::new(g, cfg.clone());
    let images = rand(cfg.training.batch_size * res * res * 3, 77, 1.0);
    // The first step allocates the workspace. The memory plan (what `slotfix train` checks
    // against the free memory before it starts) counts every buffer of the session; the rest is
    // the kernels' scratch and the optimizer's tables, which must stay small beside it (here, at
    // a tiny shape, the TF32 kernels' fixed-size partials make it ~20%).
    s.train_step(&images);
    let plan = MemoryPlan::new(&s.be, &s.model.arch, cfg.training.batch_size, 0);
    let allocated = s.be.allocated_bytes() - before_session;
    assert!(
        allocated >= plan.total() && allocated - plan.total() <= plan.total() / 2,
        "{label}: {allocated} bytes allocated by a session and its first step, {} planned",
        plan.total()
    );
    eprintln!(
        "{label}: planned {} bytes, allocated {allocated} (scratch and tables {:.1}%)",
        plan.total(),
        100.0 * (allocated - plan.total()) as f64 / plan.total() as f64
    );
    let (before, allocs, launches) = (s.be.host_reads(), s.be.allocations(), s.be.launches());
    for _ in 0..3 {
        s.train_step(&images);
    }
    eprintln!(
        "{label}: {} kernel launches per training step",
        (s.be.launches() - launches) / 3
    );
    assert_eq!(
        s.be.host_reads(),
        before,
        "{label}: host reads inside training steps"
    );
    assert_eq!(
        s.be.allocations(),
        allocs,
        "{label}: allocations inside training steps"
    );
    let r = s.opt_report();
    assert_eq!(s.be.host_reads(), before + 1, "{label}");
    assert_eq!((r.updates, r.skipped), (4, 0), "{label}");
    assert!(
        r.last_loss.is_finite() && r.last_grad_norm > 0.0,
        "{label}: {r:?}"
    );
}

emu_and_gpu_tests!(
    emu_train_steps_make_no_host_read_or_allocation,
    gpu_train_steps_make_no_host_read_or_allocation,
    |g, kind| train_steps_make_no_host_read_or_allocation(g, false, &format!("{kind} f32"))
);
emu_and_gpu_tests!(
    emu_train_steps_tf32_make_no_host_read_or_allocation,
    gpu_train_steps_tf32_make_no_host_read_or_allocation,
    |g, kind| train_steps_make_no_host_read_or_allocation(
        g.with_precision(Precision::Tf32),
        true,
        &format!("{kind} tf32, full decoder")
    )
);

/// The kernels that the second eager training step of a session launches in the emulator, and
/// how many times each (the first allocates the workspace).
fn launches_of_an_eager_step(g: Cuda, mut cfg: Config, seed: u64) -> BTreeMap<&'static str, u64> {
    cfg.training.cuda_graph = false;
    let res = cfg.model.resolution;
    let images = rand(cfg.training.batch_size * res * res * 3, seed, 1.0);
    let mut s = Session::new(g, cfg);
    s.train_step(&images);
    let before = s.be.emu_kernel_launches();
    s.train_step(&images);
    s.be.emu_kernel_launches()
        .into_iter()
        .map(|(k, n)| (k, n - before.get(k).copied().unwrap_or(0)))
        .filter(|&(_, n)| n > 0)
        .collect()
}

/// The kernels one eager training step of a shipped config launches, by name, in the emulator
/// (batch 1; the count does not depend on the batch, nor on the resolution while the broadcast
/// decoder keeps its number of stride-2 layers: clevr6 runs at 32² from a 2×2 broadcast, 16×
/// less work than 128² from 8×8, with the same layers). Few launches per step is what keeps the small model under performance.md's
/// 3.0 ms (its kernels are short: a graph node still costs ~1–2 µs), so a change that adds
/// launches fails here and has to say why in this table.
#[test]
fn emu_launches_per_step_of_the_shipped_configs() {
    // (config, most launches per step: recorded 2026-11-25 with tokens v2; tetrominoes + 2 for
    // split-K's reduces of the position image's two one-image passes, which replace ~60 µs of
    // a few blocks' serial k-loops, predicted; both + 2 for the fold (`kv_fold`): its six
    // small weight products (matmul_small_f32) replace the four launches of Wk's and Wv's
    // weight gradients over every token, and the token chain stops writing k and v)
    for (file, most) in [("tetrominoes.yaml", 108), ("clevr6.yaml", 109)] {
        let Some(g) = emu() else { return };
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("configs")
            .join(file);
        let mut cfg = Config::load(&path).unwrap();
        cfg.training.batch_size = 1;
        if cfg.model.resolution > 32 {
            cfg.model.decoder_init_size /= cfg.model.resolution / 32;
            cfg.model.resolution = 32;
        }
        let mut per_kernel: Vec<(u64, &str)> =
            launches_of_an_eager_step(g.with_precision(Precision::Tf32), cfg, 4242)
                .into_iter()
                .map(|(k, n)| (n, k))
                .collect();
        per_kernel.sort_by(|a, b| b.cmp(a));
        let total: u64 = per_kernel.iter().map(|&(n, _)| n).sum();
        eprintln!("{file}: {total} launches per training step: {per_kernel:?}");
        assert!(
            total <= most,
            "{file}: {total} kernel launches per training step, {most} before: {per_kernel:?}"
        );
        assert!(
            total >= most * 9 / 10,
            "{file}: {total} launches; update the table"
        );
    }
}

/// `slotfix bench --kernels`: after the timed steps (replays of a captured step here), a few
/// eager steps with every launch timed. The table holds every kernel a step launches, as many
/// times as an eager step launches it; the CPU backend has no kernels to time.
#[test]
fn emu_bench_times_every_kernel_launch_of_a_step() {
    let cfg = small_config(|m| m.implicit_diff = true);
    assert!(cfg.training.cuda_graph, "the timed steps should be replays");
    let Some(g) = emu() else { return };
    let want = launches_of_an_eager_step(g, cfg.clone(), 31);
    let Some(g) = emu() else { return };
    let b = slotfix::bench::bench_step(g, &cfg, 2, true);
    assert!(b.graph, "the timed steps were not replays");
    let k = b
        .kernels
        .expect("the CUDA backend times its kernels")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(k.steps, 2);
    assert!(
        k.profile.host_clock,
        "the emulator times by the host's clock"
    );
    let got: BTreeMap<&str, u64> = k
        .profile
        .kernels
        .iter()
        .map(|t| (t.name, t.launches / 2))
        .collect();
    assert_eq!(got, want, "launches per step by kernel");
    assert!(k
        .profile
        .kernels
        .iter()
        .all(|t| t.ms > 0.0 && t.launches % 2 == 0));
    assert!(k.profile.kernels.windows(2).all(|w| w[0].ms >= w[1].ms));
    let table = k.table();
    eprintln!("{table}");
    assert!(table.contains(&format!("| all kernels | {} |", want.values().sum::<u64>())));
    // The CPU: nothing to time.
    let b = slotfix::bench::bench_step(cpu(), &cfg, 1, true);
    assert!(b.kernels.is_none());
}

/// With `cuda_graph`, the first step runs eagerly, the second is captured and every later one
/// replays it. The replayed steps must compute exactly what eager steps do, bit for bit (the
/// same kernels in the same order; every reduction has a fixed order): the slot noise and the
/// dropout masks of each step (the RNG counter), the learning rate of a warm-up that changes
/// every step, the bias corrections, and the optimizer's bookkeeping. Between steps another
/// user of the step scalars (an evaluation's slot noise) runs, as in a training run.
fn graph_steps_equal_eager_steps(
    graphed: Cuda,
    eager: Cuda,
    implicit: bool,
    full_decoder: bool,
    label: &str,
) {
    let mut cfg = small_config(|m| {
        m.implicit_diff = implicit;
        m.dropout = 0.1;
        // 16 and 32 wide: the v3 convolutions, with the phased stride-2 decoder (or the full
        // decoder's split first convolution), in the graph.
        m.encoder_channels = vec![16, 16];
        m.decoder_channels = Some(vec![16, 16, 4]);
        m.feat_size = 16;
        m.slot_size = 16;
        m.mlp_hidden_size = 32;
        if full_decoder {
            m.decoder = DecoderKind::Full;
        }
    });
    cfg.training.warmup_steps = 4;
    let mut sg = Session::new(graphed, cfg.clone());
    cfg.training.cuda_graph = false;
    let mut se = Session::new(eager, cfg.clone());
    let res = cfg.model.resolution;
    let steps = 6u64;
    for step in 0..steps {
        let images = rand(cfg.training.batch_size * res * res * 3, 500 + step, 1.0);
        let launches = sg.be.launches();
        let (og, oe) = (sg.train_step(&images), se.train_step(&images));
        assert_eq!(og.lr, oe.lr, "{label} step {step}");
        if step >= 2 {
            assert!(sg.replaying(), "{label}: step {step} is not a replay");
            assert_eq!(
                sg.be.launches(),
                launches,
                "{label}: a replay launched kernels"
            );
        }
        let (rg, re) = (sg.opt_report(), se.opt_report());
        assert_eq!(rg, re, "{label} step {step}: optimizer reports differ");
        // An evaluation's slot noise between steps moves the device's step counter.
        let mut noise = sg.be.alloc(7);
        sg.be
            .fill_normal(Philox::new(3), 1, 1000 + step as u32, &mut noise);
    }
    assert_eq!(sg.be.replays(), steps - 1, "{label}: replays");
    assert!(!se.replaying(), "{label}: cuda_graph: false replayed");
    assert_eq!(se.be.replays(), 0, "{label}");
    let rg = sg.opt_report();
    assert_eq!((rg.updates, rg.skipped), (steps, 0), "{label}: {rg:?}");
    assert!(rg.last_loss.is_finite(), "{label}: {rg:?}");
    let names: Vec<&str> = sg
        .model
        .arch
        .specs
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let pairs = [
        ("param", &sg.model.params, &se.model.params),
        ("adam m", &sg.adam_m, &se.adam_m),
        ("adam v", &sg.adam_v, &se.adam_v),
    ];
    for (what, g, e) in pairs {
        for ((name, bg), be) in names.iter().zip(g).zip(e) {
            let (vg, ve) = (sg.be.download_f32(bg), se.be.download_f32(be));
            let same = vg.iter().zip(&ve).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{label}: {what} {name} differs after {steps} steps (replayed vs eager)"
            );
        }
    }
    let ws = |s: &Session<Cuda>| s.be.download_f32(&s.workspace().expect("trained").masks);
    assert_eq!(ws(&sg), ws(&se), "{label}: masks of the last step");
}

emu_and_gpu_tests!(
    emu_graph_steps_equal_eager_steps,
    gpu_graph_steps_equal_eager_steps,
    |g, kind| {
        let again = || if kind == "gpu" { gpu() } else { emu() }.expect("another backend");
        graph_steps_equal_eager_steps(
            g.with_precision(Precision::Tf32),
            again().with_precision(Precision::Tf32),
            true,
            false,
            &format!("{kind} implicit"),
        );
        graph_steps_equal_eager_steps(
            again().with_precision(Precision::Tf32),
            again().with_precision(Precision::Tf32),
            false,
            true,
            &format!("{kind} bptt, full decoder"),
        )
    }
);

/// A step that cannot be captured (here: a fixed-point tolerance switched on after the warm-up
/// step, whose residual is a host read) is queued eagerly instead, and training goes on with
/// the same results as a session that never tried.
#[test]
fn emu_failed_capture_falls_back_to_eager_steps() {
    let (Some(g1), Some(g2)) = (emu(), emu()) else {
        return;
    };
    let cfg = small_config(|m| m.implicit_diff = true);
    let mut tried = Session::new(g1, cfg.clone());
    let mut eager_cfg = cfg.clone();
    eager_cfg.training.cuda_graph = false;
    let mut eager = Session::new(g2, eager_cfg);
    let res = cfg.model.resolution;
    for step in 0..4u64 {
        let images = rand(cfg.training.batch_size * res * res * 3, 700 + step, 1.0);
        if step == 1 {
            // The next step is the one captured: make it read the residual on the host.
            tried.model.arch.fwd_tol = Some(1e-30);
            eager.model.arch.fwd_tol = Some(1e-30);
        }
        tried.train_step(&images);
        eager.train_step(&images);
        assert!(!tried.replaying(), "step {step} replayed");
        assert_eq!(tried.opt_report(), eager.opt_report(), "step {step}");
    }
    assert_eq!(tried.be.replays(), 0);
    let a: Vec<Vec<f32>> = tried
        .model
        .params
        .iter()
        .map(|b| tried.be.download_f32(b))
        .collect();
    let b: Vec<Vec<f32>> = eager
        .model
        .params
        .iter()
        .map(|b| eager.be.download_f32(b))
        .collect();
    assert!(a == b, "parameters differ after the fallback");
}

/// Inside a capture, what a replay could not repeat stops with its name.
#[test]
fn emu_capture_refuses_host_reads_uploads_and_allocations() {
    let Some(g) = emu() else { return };
    let mut buf = g.alloc(4);
    for what in ["host read", "host-to-device copy", "device allocation"] {
        g.capture_begin().expect("capture");
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match what {
            "host read" => drop(g.download_f32(&buf)),
            "host-to-device copy" => g.upload_f32(&[1.0; 4], &mut buf),
            _ => drop(g.alloc(3)),
        }))
        .expect_err(what);
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains(what) && msg.contains("inside a captured training step"),
            "{what}: {msg}"
        );
        let _ = g.capture_end();
    }
}

/// `train::train` end to end on the CUDA backend (here in the emulator, with the tensor-core
/// convolutions): it trains on real data, logs, evaluates, renders, checkpoints and resumes like
/// the CPU path, and its logged losses follow the CPU's.
#[test]
fn emu_trains_evaluates_checkpoints_and_resumes_end_to_end() {
    let Some(g) = emu() else { return };
    let g = g.with_precision(Precision::Tf32);
    let yaml = |dir: &std::path::Path, steps: usize| {
        format!(
            "Model:\n  num_slots: 3\n  slot_size: 16\n  mlp_hidden_size: 32\n  max_iter_fwd: 2\n  \
             resolution: 16\n  encoder_channels: [8, 8]\n  feat_size: 16\n  decoder: full\n  \
             decoder_channels: [8, 8]\nTraining:\n  data_type: tetrominoes\n  num_train: 200\n  \
             batch_size: 4\n  max_steps: {steps}\n  lr: 0.002\n  warmup_steps: 2\n  \
             log_interval: 4\n  save_interval: 4\n  save_dir: {}\nTesting:\n  batch_size: 8\n  \
             num_test: 8\n",
            dir.display()
        )
    };
    let quiet = slotfix::train::TrainOptions {
        quiet: true,
        ..Default::default()
    };
    let losses = |dir: &std::path::Path| -> Vec<f64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let (dg, dc) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cfg_g = Config::from_yaml(&yaml(dg.path(), 8)).unwrap();
    let cfg_c = Config::from_yaml(&yaml(dc.path(), 8)).unwrap();
    let sg = slotfix::train::train(g, &cfg_g, &quiet).unwrap();
    let sc = slotfix::train::train(cpu(), &cfg_c, &quiet).unwrap();
    assert_eq!((sg.steps, sc.steps), (8, 8));
    let (lg, lc) = (losses(dg.path()), losses(dc.path()));
    eprintln!("logged losses: emulated tf32 {lg:?}, CPU {lc:?}");
    assert_eq!(lg.len(), 2);
    for (a, b) in lg.iter().zip(&lc) {
        assert!(
            (a - b).abs() <= 2e-2 * b.abs(),
            "logged losses {lg:?} vs CPU {lc:?}"
        );
    }
    assert!(sg.last_eval.as_ref().unwrap().fg_ari.is_some());
    assert!(dg.path().join("images").join("step_00000008.png").exists());
    assert!(slotfix::checkpoint::path_for_step(dg.path(), 8).exists());
    // Resume on the emulated backend for 4 more steps.
    let cfg_g = Config::from_yaml(&yaml(dg.path(), 12)).unwrap();
    let resumed = slotfix::train::TrainOptions {
        resume: true,
        quiet: true,
        ..Default::default()
    };
    let g = Cuda::emulated().unwrap().with_precision(Precision::Tf32);
    let s = slotfix::train::train(g, &cfg_g, &resumed).unwrap();
    assert_eq!(s.steps, 12);
    assert!(slotfix::checkpoint::path_for_step(dg.path(), 12).exists());
}

#[test]
fn device_selection_never_panics() {
    use slotfix::config::Device;
    use slotfix::device::{select, Chosen};
    let present = slotfix::device::cuda_present();
    let (chosen, _) = select(Device::Auto).unwrap();
    // `auto` takes the GPU whenever one is present.
    assert_eq!(chosen == Chosen::Cuda, present);
    assert_eq!(select(Device::Cuda).is_ok(), present);
    assert_eq!(select(Device::Cpu).unwrap().0, Chosen::Cpu);
    if require_gpu() {
        assert!(
            present,
            "SLOTFIX_REQUIRE_GPU=1 but no CUDA device is usable"
        );
    }
}

/// `slotfix dump-step` on the CUDA backend writes what `tools/replay_step.py` replays in PyTorch
/// (the GPU session's `replay` phase): the same batch, slot noise and dropout masks as the CPU's
/// dump (bit for bit: they come from the same generator and loader), the same parameters, and
/// the loss, gradients, reconstruction and masks of the step within the f32 tolerances. A dump
/// whose inputs differed from what the device computed with would make that replay meaningless.
fn dump_step_parity(g: Cuda, kind: &str) {
    fn dump<B: Backend>(be: B, cfg: &Config) -> slotfix::checkpoint::Checkpoint {
        let ds = slotfix::train::open_data(cfg, slotfix::data::Split::Train).unwrap();
        let mut s = Session::new(be, cfg.clone());
        slotfix::dump::dump_step(&mut s, ds.as_ref()).unwrap()
    }
    let cfg = heads_dropout_full(true);
    let (got, want) = (dump(g, &cfg), dump(cpu(), &cfg));
    assert_eq!(
        got.tensors.keys().collect::<Vec<_>>(),
        want.tensors.keys().collect::<Vec<_>>()
    );
    assert!(got
        .tensors
        .keys()
        .any(|k| k.starts_with("input.dropout_mask.")));
    assert!(
        got.meta["backend"].starts_with("cuda ("),
        "{}",
        got.meta["backend"]
    );
    assert!(
        want.meta["backend"].starts_with("cpu"),
        "{}",
        want.meta["backend"]
    );
    let (mut names, mut gv, mut wv) = (vec![], vec![], vec![]);
    for (name, (shape, w)) in &want.tensors {
        let (gshape, gt) = &got.tensors[name];
        assert_eq!(gshape, shape, "{name}: shape");
        if name.starts_with("grad.") || name.starts_with("output.") {
            names.push(name.clone());
            gv.push(gt.clone());
            wv.push(w.clone());
        } else {
            // The inputs and the parameters: what both backends computed from.
            assert!(gt == w, "{kind} dump: {name} differs from the CPU's");
        }
    }
    let skip = vec![false; names.len()];
    check_tensors(
        &format!("{kind} dump"),
        &names,
        &gv,
        &wv,
        &skip,
        STEP_GRAD_TOL,
    );
}

emu_and_gpu_tests!(
    emu_dump_step_matches_the_cpu,
    gpu_dump_step_matches_the_cpu,
    |g, kind| { dump_step_parity(g, kind) }
);
