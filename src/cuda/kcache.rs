//! NVRTC's output kept on disk between processes, and compiled in parallel when it is not there.
//!
//! Compiling every kernel file takes minutes of CPU (NVRTC 13.0 on the development machine:
//! ~11 s when the cache was written, 144 s on 2026-11-27, nearly all of it `conv_tc*.cu`),
//! and every `slotfix` command and test process that opens the CUDA backend used to pay it. The
//! PTX of a file depends only on its source (with `common.cuh` and the headers it includes), the
//! target architecture, the NVRTC version and the options, so it is stored under a hash of those:
//! `$SLOTFIX_KERNEL_CACHE` if set (`off` disables the cache), else
//! `$XDG_CACHE_HOME/slotfix/kernels`, else `~/.cache/slotfix/kernels`. A missing, unreadable or
//! truncated entry is compiled again; a failure to write one costs nothing but the next
//! process's compile. The driver caches the PTX → machine code step itself (its JIT cache).

use super::kernels::KernelFile;
use super::{compile_file, Ptx};
use std::path::PathBuf;

/// Environment variable: the cache folder, or `off`.
pub const CACHE_ENV: &str = "SLOTFIX_KERNEL_CACHE";

/// Last line of every entry: an entry without it was cut short.
const TRAILER: &str = "// end of slotfix kernel cache entry\n";

/// Part of every key, to be changed whenever what goes into an entry changes.
const FORMAT: &str = "slotfix-ptx-1";

/// FNV-1a over `parts` (each followed by a zero byte): stable across Rust versions, as an
/// on-disk key must be.
pub(crate) fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Where compiled kernels are kept (or not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// A cache in `dir`; None: no cache.
    pub fn at(dir: Option<PathBuf>) -> KernelCache {
        KernelCache { dir }
    }

    /// From `SLOTFIX_KERNEL_CACHE`, `XDG_CACHE_HOME` or `HOME` (none of them: no cache).
    pub fn from_env() -> KernelCache {
        KernelCache::from_vars(|k| std::env::var_os(k))
    }

    /// [`KernelCache::from_env`] with the variables read through `var`.
    fn from_vars(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> KernelCache {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let dir = match var(CACHE_ENV) {
            Some(v) if v == "off" => None,
            Some(v) => Some(PathBuf::from(v)),
            None => var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .map(|d| d.join("slotfix").join("kernels")),
        };
        KernelCache { dir }
    }

    pub fn dir(&self) -> Option<&PathBuf> {
        self.dir.as_ref()
    }

    fn entry(&self, f: &KernelFile, arch: &str, nvrtc: &str) -> Option<PathBuf> {
        let key = fnv1a(&[FORMAT, arch, nvrtc, &f.full_source()]);
        let stem = f.name.trim_end_matches(".cu");
        Some(
            self.dir
                .as_ref()?
                .join(format!("{stem}-{arch}-{key:016x}.ptx")),
        )
    }

    /// The stored PTX of `f`, if a whole entry is there.
    fn load(&self, f: &KernelFile, arch: &str, nvrtc: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.entry(f, arch, nvrtc)?).ok()?;
        text.ends_with(TRAILER).then_some(text)
    }

    /// Store `ptx` for `f` (best effort: written to a private file, then renamed into place, so
    /// that a reader never sees half an entry even when processes race).
    fn store(&self, f: &KernelFile, arch: &str, nvrtc: &str, ptx: &str) {
        let Some(path) = self.entry(f, arch, nvrtc) else {
            return;
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let text = format!("{}\n{TRAILER}", ptx.trim_end_matches(['\0', '\n']));
        let ok = path
            .parent()
            .is_some_and(|d| std::fs::create_dir_all(d).is_ok())
            && std::fs::write(&tmp, text).is_ok()
            && std::fs::rename(&tmp, &path).is_ok();
        if !ok {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// The version of the loaded libnvrtc, as "major.minor".
fn nvrtc_version() -> String {
    let (mut major, mut minor) = (0, 0);
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        format!("{major}.{minor}")
    } else {
        "unknown".into()
    }
}

/// The PTX of one kernel file and where it came from.
pub struct FilePtx {
    pub file: &'static KernelFile,
    pub ptx: Ptx,
    /// Read from the cache (true) or compiled by this call.
    pub cached: bool,
}

/// The PTX of every file of `files` for a device of architecture `arch`, each compiled for its
/// own [`KernelFile::arch_for`] (a file not for this device is left out): from `cache` where it
/// holds an entry, the rest compiled by NVRTC, one thread per file (NVRTC programs are
/// independent; the output is the same as a serial compile, which `nvrtc_kernel_cache_*`
/// checks), then stored. `on_compile` is called once, before compiling, with the number of files
/// to compile (for a progress line).
pub fn ptx_for_all(
    files: &'static [KernelFile],
    arch: &'static str,
    cache: &KernelCache,
    on_compile: impl FnOnce(usize),
) -> Result<Vec<FilePtx>, String> {
    let nvrtc = nvrtc_version();
    let targets: Vec<(&'static KernelFile, &'static str)> = files
        .iter()
        .filter_map(|f| Some((f, f.arch_for(arch)?)))
        .collect();
    let mut out: Vec<Option<FilePtx>> = targets
        .iter()
        .map(|&(file, arch)| {
            cache.load(file, arch, &nvrtc).map(|text| FilePtx {
                file,
                ptx: Ptx::from_src(text),
                cached: true,
            })
        })
        .collect();
    let missing: Vec<usize> = (0..targets.len()).filter(|&i| out[i].is_none()).collect();
    if !missing.is_empty() {
        on_compile(missing.len());
        let compiled: Vec<(usize, Result<Ptx, String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = missing
                .iter()
                .map(|&i| {
                    let (f, a) = targets[i];
                    (i, s.spawn(move || compile_file(f, a)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(i, h)| {
                    let r = h.join().unwrap_or_else(|_| {
                        Err(format!("NVRTC panicked on kernels/{}", targets[i].0.name))
                    });
                    (i, r)
                })
                .collect()
        });
        for (i, r) in compiled {
            let ptx = r?;
            let (file, arch) = targets[i];
            cache.store(file, arch, &nvrtc, &ptx.to_src());
            out[i] = Some(FilePtx {
                file,
                ptx,
                cached: false,
            });
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// Compile `f` again, bypassing the cache, and store the result: for an entry that the driver
/// rejected.
pub fn recompile(
    f: &'static KernelFile,
    arch: &'static str,
    cache: &KernelCache,
) -> Result<Ptx, String> {
    let ptx = compile_file(f, arch)?;
    cache.store(f, arch, &nvrtc_version(), &ptx.to_src());
    Ok(ptx)
}

/// The architecture name of a CUDA device of compute capability `major.minor`, as the backend
/// compiles for it and keys its cache entries: "sm_90" for 9.0.
pub fn arch_of(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// `name` checked as an architecture the kernels compile for: "sm_" and a compute capability of
/// 8.0 or newer, as [`arch_of`] writes it ("sm_80", "sm_86", "sm_90", "sm_120", …).
pub fn parse_arch(name: &str) -> Result<String, String> {
    let digits = name.strip_prefix("sm_").unwrap_or("");
    let ok = (2..=3).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && digits.parse::<u32>().is_ok_and(|v| v >= 80);
    match ok {
        true => Ok(name.to_string()),
        false => Err(format!(
            "--arch {name:?}: give a GPU architecture as sm_ and its compute capability, 8.0 or \
             newer (the kernels use sm_80 instructions): sm_80 (A100), sm_86 (RTX 30), \
             sm_89 (L4, RTX 40), sm_90 (H100, H200), sm_100, sm_120"
        )),
    }
}

/// What [`fill`] did.
#[derive(Clone, Debug)]
pub struct Filled {
    pub dir: PathBuf,
    /// Files compiled now, and files whose entry was already there.
    pub compiled: usize,
    pub cached: usize,
}

/// Compile every kernel file for `arch` ([`parse_arch`]) into `cache`, where a later process on
/// a GPU of that architecture finds it and starts without compiling; only libnvrtc is needed
/// (no driver, no GPU), so a cluster's login node can do it before a GPU job. `on_compile` as
/// for [`ptx_for_all`]. Fails when there is no cache folder (`SLOTFIX_KERNEL_CACHE=off`, no
/// home) or libnvrtc cannot be loaded.
pub fn fill(
    files: &'static [KernelFile],
    arch: &str,
    cache: &KernelCache,
    on_compile: impl FnOnce(usize),
) -> Result<Filled, String> {
    let arch = parse_arch(arch)?;
    let Some(dir) = cache.dir().cloned() else {
        return Err(format!(
            "no kernel cache to fill: {CACHE_ENV} is `off`, or neither it, XDG_CACHE_HOME nor \
             HOME is set"
        ));
    };
    if !super::nvrtc_available() {
        let how = "`pip install nvidia-cuda-nvrtc==13.0.88` gives one";
        return Err(format!(
            "libnvrtc cannot be loaded: put the folder that holds libnvrtc.so.13 on \
             LD_LIBRARY_PATH ({how})"
        ));
    }
    // ptx_for_all keeps the architecture for its threads; one short string per call.
    let arch: &'static str = Box::leak(arch.into_boxed_str());
    let out = ptx_for_all(files, arch, cache, on_compile)?;
    let cached = out.iter().filter(|f| f.cached).count();
    Ok(Filled {
        dir,
        compiled: out.len() - cached,
        cached,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_folder_comes_from_the_environment() {
        let with = |vars: &[(&str, &str)]| {
            let vars: Vec<(String, String)> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            KernelCache::from_vars(move |k| {
                vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.into())
            })
        };
        let dir = |p: &str| KernelCache::at(Some(PathBuf::from(p)));
        assert_eq!(with(&[("HOME", "/h")]), dir("/h/.cache/slotfix/kernels"));
        assert_eq!(
            with(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]),
            dir("/x/slotfix/kernels")
        );
        assert_eq!(with(&[("HOME", "/h"), (CACHE_ENV, "/k")]), dir("/k"));
        assert_eq!(
            with(&[("HOME", "/h"), (CACHE_ENV, "off")]),
            KernelCache::at(None)
        );
        // Empty values count as unset.
        assert_eq!(
            with(&[("HOME", "/h"), (CACHE_ENV, ""), ("XDG_CACHE_HOME", "")]),
            dir("/h/.cache/slotfix/kernels")
        );
        assert_eq!(with(&[]), KernelCache::at(None));
    }

    #[test]
    fn architectures_are_sm_and_a_capability_of_8_0_or_newer() {
        for ok in ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"] {
            assert_eq!(parse_arch(ok).as_deref(), Ok(ok));
        }
        assert_eq!(arch_of(9, 0), "sm_90");
        assert_eq!(arch_of(12, 0), "sm_120");
        for bad in [
            "sm_75",
            "sm_7",
            "90",
            "compute_90",
            "sm_9a",
            "sm_",
            "",
            "sm_1000",
            "SM_90",
        ] {
            let e = parse_arch(bad).unwrap_err();
            assert!(e.contains("sm_90 (H100, H200)"), "{bad}: {e}");
        }
    }

    #[test]
    fn filling_without_a_cache_folder_says_so() {
        let e = fill(&[], "sm_90", &KernelCache::at(None), |_| {}).unwrap_err();
        assert!(
            e.contains("no kernel cache") && e.contains(CACHE_ENV),
            "{e}"
        );
        let e = fill(&[], "sm_75", &KernelCache::at(None), |_| {}).unwrap_err();
        assert!(e.contains("--arch \"sm_75\""), "{e}");
    }

    #[test]
    fn fnv1a_is_the_published_function() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; each part is followed by a zero byte here, so
        // check that by hand: fnv1a(["a"]) = FNV-1a("a\0").
        let mut h: u64 = 0xaf63_dc4c_8601_ec8c;
        h = h.wrapping_mul(0x0000_0100_0000_01b3); // ^ 0 is a no-op
        assert_eq!(fnv1a(&["a"]), h);
        assert_ne!(fnv1a(&["ab", "c"]), fnv1a(&["a", "bc"]));
    }
}
