//! Kernel signatures read from the sources, and the checks the emulator makes at every launch
//! against them: what would fail or misbehave on a GPU but runs fine on the CPU.

use super::super::kernels::KERNEL_FILES;
use std::collections::HashMap;
use std::sync::OnceLock;

/// The identifier `s` ends with (after trailing blanks): `float X` → `X`, `void k1` → `k1`.
pub(super) fn trailing_ident(s: &str) -> &str {
    let s = s.trim_end();
    let start = s
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    &s[start..]
}

/// A pointer parameter of a kernel, as its signature declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PtrParam {
    /// `const T*`: the kernel only reads through it.
    pub is_const: bool,
    /// `__restrict__`: the kernel promises that nothing else reaches what it points at.
    pub restrict: bool,
}

/// What the emulator checks each launch against: a kernel's signature as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelSig {
    /// `None` for a value, the pointer's qualifiers for a pointer.
    pub params: Vec<Option<PtrParam>>,
    /// The most threads per block it may be launched with (`__launch_bounds__`): a launch with
    /// more fails on a GPU.
    pub max_threads: Option<u32>,
}

/// The signature of every `extern "C" __global__` function of `source`, by name; a
/// `__launch_bounds__` given by a name is looked up among `source`'s `#define NAME number`
/// lines. A kernel defined inside a `#define` is listed under the first argument of each use of
/// that macro (`V3_ENTRY(conv_igemm_direct_v3_tf32, …)`).
pub fn kernel_sigs(source: &str) -> Vec<(String, KernelSig)> {
    let defined = |name: &str| -> Option<u32> {
        source.lines().find_map(|l| {
            let mut w = l.strip_prefix("#define ")?.split_whitespace();
            (w.next()? == name).then(|| w.next()?.parse().ok())?
        })
    };
    let mut out = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("extern \"C\" __global__") {
        // The macro this definition sits in, if any: a `#define` line continued up to here.
        let before = &source[..source.len() - rest.len() + at];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let mut start = line_start;
        while start > 0 && before[..start - 1].ends_with('\\') {
            start = before[..start - 1].rfind('\n').map_or(0, |i| i + 1);
        }
        let macro_name = before[start..]
            .trim_start()
            .strip_prefix("#define ")
            .map(|m| m.split('(').next().unwrap_or("").trim().to_string());
        rest = &rest[at + "extern \"C\" __global__".len()..];
        // The name is the identifier before the first '(' that is not __launch_bounds__'s.
        let mut head = rest;
        let mut skipped = 0;
        let mut bound: Option<&str> = None;
        let open = loop {
            let Some(p) = head.find('(') else { break None };
            let before = head[..p].trim_end();
            if before.ends_with("__launch_bounds__") {
                let close = head[p..].find(')').map_or(head.len(), |c| p + c + 1);
                bound = Some(head[p + 1..close - 1].trim());
                skipped += close;
                head = &head[close..];
                continue;
            }
            break Some(skipped + p);
        };
        // (A second argument, the minimum blocks per SM, only steers the register allocation.)
        let max_threads = bound.map(|b| {
            let b = b.split(',').next().unwrap_or(b).trim();
            b.parse()
                .ok()
                .or_else(|| defined(b))
                .unwrap_or_else(|| panic!("__launch_bounds__({b}): not a number or a #define"))
        });
        let Some(open) = open else { break };
        let name = trailing_ident(&rest[..open]).to_string();
        let mut depth = 0;
        let mut close = open;
        for (i, c) in rest[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = open + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let params: Vec<Option<PtrParam>> = rest[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.find('*').map(|star| PtrParam {
                    is_const: p[..star].split_whitespace().any(|w| w == "const"),
                    restrict: p.contains("__restrict__"),
                })
            })
            .collect();
        let sig = KernelSig {
            params,
            max_threads,
        };
        match macro_name {
            Some(m) => {
                let uses = source
                    .lines()
                    .filter_map(|l| l.strip_prefix(&format!("{m}(")))
                    .map(|args| args.split(',').next().unwrap_or("").trim().to_string());
                out.extend(uses.map(|k| (k, sig.clone())));
            }
            None => out.push((name, sig)),
        }
        rest = &rest[close..];
    }
    out
}

/// Pointer arguments of one launch that alias against their kernel's declaration: two buffers
/// whose bytes overlap where one of them is `__restrict__` and one of them is written. On a GPU
/// that is undefined behaviour the compiler acts on (a `const __restrict__` read may go through
/// the non-coherent read-only cache and miss the other pointer's writes); the emulator would
/// run it as the programmer meant. `ranges[i]` is argument i's byte range, None for a value.
pub fn restrict_violations(
    params: &[Option<PtrParam>],
    ranges: &[Option<(u64, u64)>],
) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for i in 0..ranges.len() {
        for j in i + 1..ranges.len() {
            let (Some(a), Some(b)) = (ranges[i], ranges[j]) else {
                continue;
            };
            let (Some(Some(pa)), Some(Some(pb))) = (params.get(i), params.get(j)) else {
                continue;
            };
            let overlap = a.0 < a.1 && b.0 < b.1 && a.0 < b.1 && b.0 < a.1;
            if overlap && (pa.restrict || pb.restrict) && (!pa.is_const || !pb.is_const) {
                out.push((i, j));
            }
        }
    }
    out
}

/// [`kernel_sigs`] of kernel `name` of `kernels/` (parsed once per process, each file as NVRTC
/// is given it: after `common.cuh`, with its headers pasted in).
pub fn sig_of(name: &str) -> Option<&'static KernelSig> {
    static MAP: OnceLock<HashMap<String, KernelSig>> = OnceLock::new();
    MAP.get_or_init(|| {
        KERNEL_FILES
            .iter()
            .flat_map(|f| kernel_sigs(&f.full_source()))
            .collect()
    })
    .get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_signatures_parse_into_pointer_qualifiers_and_launch_bounds() {
        let src = r#"
#define THREADS 128 // per block
// a comment that names k2( and extern "C" nothing
extern "C" __global__ void k1(int n, const float* __restrict__ x, float* y, Dims d) {}
extern "C" __global__ void __launch_bounds__(256)
k2(const float* a, float* __restrict__ out) {}
#define ENTRY(NAME, X)                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS)               \
        NAME(const unsigned* __restrict__ wt, int m, float* __restrict__ o) { body(X); }
ENTRY(k3, 1)
ENTRY(k4, 2)
extern "C" __global__ void __launch_bounds__(THREADS, 4)
k5(float* y) {}
"#;
        let p = |c, r| {
            Some(PtrParam {
                is_const: c,
                restrict: r,
            })
        };
        let sig = |params, max_threads| KernelSig {
            params,
            max_threads,
        };
        let macro_made = sig(vec![p(true, true), None, p(false, true)], Some(128));
        assert_eq!(
            kernel_sigs(src),
            vec![
                (
                    "k1".to_string(),
                    sig(vec![None, p(true, true), p(false, false), None], None)
                ),
                (
                    "k2".to_string(),
                    sig(vec![p(true, false), p(false, true)], Some(256))
                ),
                ("k3".to_string(), macro_made.clone()),
                ("k4".to_string(), macro_made),
                ("k5".to_string(), sig(vec![p(false, false)], Some(128))),
            ]
        );
    }

    #[test]
    fn every_kernel_has_a_parsed_signature() {
        for f in KERNEL_FILES {
            for k in f.kernels {
                let s = sig_of(k).unwrap_or_else(|| panic!("{}: {k} not parsed", f.name));
                assert!(!s.params.is_empty(), "{k}: no parameters");
            }
        }
        // Spot checks against the sources.
        let p = |c, r| {
            Some(PtrParam {
                is_const: c,
                restrict: r,
            })
        };
        let add = sig_of("add_assign_f32").unwrap();
        assert_eq!(add.params, [None, p(false, true), p(true, true)]);
        assert_eq!(add.max_threads, None);
        let v3 = sig_of("conv_igemm_direct_v3n32_tf32").unwrap();
        assert_eq!((v3.params.len(), v3.max_threads), (10, Some(256)));
        assert_eq!(sig_of("tokens_fwd_f32").unwrap().max_threads, Some(128));
    }

    #[test]
    fn restrict_violations_need_an_overlap_a_restrict_and_a_write() {
        let p = |c, r| {
            Some(PtrParam {
                is_const: c,
                restrict: r,
            })
        };
        let buf = |a: u64, b: u64| Some((a, b));
        // Read-only aliases are fine, restrict or not.
        assert!(
            restrict_violations(&[p(true, true), p(true, true)], &[buf(0, 8), buf(0, 8)])
                .is_empty()
        );
        // A write through an alias of a restrict pointer is not.
        assert_eq!(
            restrict_violations(&[p(true, true), p(false, true)], &[buf(0, 8), buf(4, 12)]),
            vec![(0, 1)]
        );
        assert_eq!(
            restrict_violations(&[p(false, false), p(true, true)], &[buf(0, 8), buf(0, 8)]),
            vec![(0, 1)]
        );
        // Neither restrict: the kernel made no promise.
        assert!(
            restrict_violations(&[p(false, false), p(false, false)], &[buf(0, 8), buf(0, 8)])
                .is_empty()
        );
        // Adjacent, not overlapping; empty buffers; values.
        assert!(
            restrict_violations(&[p(false, true), p(false, true)], &[buf(0, 8), buf(8, 16)])
                .is_empty()
        );
        assert!(
            restrict_violations(&[p(false, true), p(false, true)], &[buf(4, 4), buf(0, 8)])
                .is_empty()
        );
        assert!(restrict_violations(&[None, p(false, true)], &[None, buf(0, 8)]).is_empty());
    }
}
