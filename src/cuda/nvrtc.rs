//! Loading the CUDA libraries and compiling the kernel files with NVRTC: what can be checked
//! without a GPU (only libnvrtc is needed to compile), and the resources ptxas reports.

use super::kernels::KernelFile;
use cudarc::driver::CudaContext;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use std::panic::catch_unwind;

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

/// Compile one kernel file with NVRTC to PTX for `arch` (e.g. "sm_90"). The error names the file
/// and carries the compiler log.
///
/// The compile targets the virtual architecture (`compute_90` for `sm_90`): its PTX is the PTX
/// that the real architecture's compile gives (`nvrtc_kernel_cache_ptx_matches_the_checked_compile`
/// compares them), without running ptxas on it, which the driver does anyway when it loads the
/// PTX; ptxas added 10–30 % to the compile of conv_tc.cu when it was one file (sm_90 77–96 s,
/// compute_90 58–87 s on one core of the development machine, 2026-11-26, a noisy machine:
/// three pairs of runs).
pub fn compile_file(file: &KernelFile, arch: &'static str) -> Result<Ptx, String> {
    let opts = CompileOptions {
        name: Some(file.name.to_string()),
        options: vec![format!("--gpu-architecture={}", virtual_arch(arch))],
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

/// The virtual architecture of a real one: "sm_90" → "compute_90" (a virtual one is kept).
fn virtual_arch(arch: &str) -> String {
    match arch.strip_prefix("sm_") {
        Some(version) => format!("compute_{version}"),
        None => arch.to_string(),
    }
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

/// One NVRTC compile of `file` for a real architecture such as "sm_90" (no GPU needed).
struct MachineCode {
    log: String,
    ptx: String,
    cubin: Vec<u8>,
}

/// Compile `file` to machine code for `arch` with the extra NVRTC `options`: the compiler log,
/// the PTX and the CUBIN.
fn compile_machine_code(
    file: &KernelFile,
    arch: &str,
    options: &[&str],
) -> Result<MachineCode, String> {
    use cudarc::nvrtc::{result, sys};
    let src = std::ffi::CString::new(file.full_source()).map_err(|e| e.to_string())?;
    let name = std::ffi::CString::new(file.name).map_err(|e| e.to_string())?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| format!("{e:?}"))?;
    let mut opts = vec![format!("--gpu-architecture={arch}")];
    opts.extend(options.iter().map(|o| o.to_string()));
    let compiled = unsafe { result::compile_program(prog, &opts) };
    let log = unsafe { result::get_program_log(prog) }.map_err(|e| format!("{e:?}"));
    let outputs = compiled.is_ok().then(|| unsafe {
        let mut size = 0usize;
        sys::nvrtcGetCUBINSize(prog, &mut size).result()?;
        let mut cubin = vec![0u8; size];
        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()).result()?;
        let ptx = result::get_ptx(prog)?;
        Ok::<_, cudarc::nvrtc::result::NvrtcError>((ptx, cubin))
    });
    let _ = unsafe { result::destroy_program(prog) };
    let log = unsafe { std::ffi::CStr::from_ptr(log?.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    compiled.map_err(|e| {
        format!(
            "NVRTC could not compile kernels/{} for {arch}: {e:?}\n{log}",
            file.name
        )
    })?;
    let (ptx, cubin) = outputs
        .unwrap_or_else(|| unreachable!("compiled"))
        .map_err(|e| format!("NVRTC: the machine code of kernels/{}: {e:?}", file.name))?;
    let ptx = unsafe { std::ffi::CStr::from_ptr(ptx.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    Ok(MachineCode { log, ptx, cubin })
}

/// Everything one compile of a kernel file for a real architecture gives: what the checks
/// without a GPU read (CI compiles each file once per architecture).
#[derive(Clone, Debug)]
pub struct CheckedCompile {
    /// The PTX (equal to what [`compile_file`] gives for the virtual architecture).
    pub ptx: String,
    /// The machine code.
    pub cubin: Vec<u8>,
    /// Each kernel's registers, static shared memory and spills, from ptxas's report: what
    /// decides how many blocks fit on an SM, known before any GPU runs.
    pub resources: Vec<KernelResources>,
}

/// Compile `file` to machine code for `arch` (e.g. "sm_90") with `ptxas -v`: its PTX, its
/// machine code and each kernel's resources.
pub fn compile_checked(file: &KernelFile, arch: &str) -> Result<CheckedCompile, String> {
    let code = compile_machine_code(file, arch, &["--ptxas-options=-v"])?;
    let resources = parse_ptxas_log(&code.log);
    if resources.is_empty() {
        return Err(format!(
            "no ptxas report for kernels/{} in the NVRTC log:\n{}",
            file.name, code.log
        ));
    }
    Ok(CheckedCompile {
        ptx: code.ptx,
        cubin: code.cubin,
        resources,
    })
}

/// The machine code (CUBIN) of `file` for `arch`, compiled by NVRTC: what the backend loads when
/// the driver refuses NVRTC's PTX (a driver older than libnvrtc rejects its newer PTX version;
/// machine code for the device's own architecture has no such gate).
pub fn compile_cubin(file: &KernelFile, arch: &str) -> Result<Vec<u8>, String> {
    compile_machine_code(file, arch, &[]).map(|code| code.cubin)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_virtual_architecture_of_a_real_one() {
        assert_eq!(virtual_arch("sm_90"), "compute_90");
        assert_eq!(virtual_arch("sm_80"), "compute_80");
        assert_eq!(virtual_arch("compute_86"), "compute_86");
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
            sm90a: false,
        };
        let e = compile_file(&broken, "sm_90").unwrap_err();
        assert!(e.contains("kernels/broken.cu"), "{e}");
        assert!(e.contains("sm_90"), "{e}");
        assert!(e.contains("undefined_name"), "no compiler log in: {e}");
    }
}
