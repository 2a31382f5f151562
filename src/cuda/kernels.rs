//! The CUDA kernel sources, embedded at build time, and the kernels each file defines. Each file
//! is compiled as one NVRTC program, free of the CUDA toolkit's headers (NVRTC needs nothing but
//! libnvrtc); the only headers it includes are those of `kernels/` ([`HEADERS`]), pasted into the
//! program's source here.

/// Helpers shared by every kernel file (block and warp reductions), prepended to each file's
/// source by [`KernelFile::full_source`].
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// The headers of `kernels/` that a kernel file may `#include "…"` (besides `common.cuh`, which
/// comes first in every program), by name.
pub const HEADERS: &[(&str, &str)] = &[
    ("conv_tc.cuh", include_str!("../../kernels/conv_tc.cuh")),
    ("wgmma.cuh", include_str!("../../kernels/wgmma.cuh")),
    (
        "conv_tc_v5.cuh",
        include_str!("../../kernels/conv_tc_v5.cuh"),
    ),
];

/// The header a line `#include "name"` includes.
fn included(line: &str) -> Option<&str> {
    let quoted = line.trim().strip_prefix("#include")?.trim();
    quoted.strip_prefix('"')?.strip_suffix('"')
}

/// Append `text` (the file `name`) to `out` under its own name and line numbers, with each header
/// of [`HEADERS`] that it includes pasted in place of the `#include` the first time (a later
/// include of the same header is dropped, as `#pragma once` would). An include of anything else
/// is left as it is, for NVRTC to report with the file and line.
fn paste_includes(name: &str, text: &str, pasted: &mut Vec<&'static str>, out: &mut String) {
    out.push_str(&format!("#line 1 \"{name}\"\n"));
    for (i, line) in text.lines().enumerate() {
        let header = included(line).and_then(|h| HEADERS.iter().find(|(n, _)| *n == h));
        let Some(&(h, h_text)) = header else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        if !pasted.contains(&h) {
            pasted.push(h);
            paste_includes(h, h_text, pasted, out);
        }
        out.push_str(&format!("#line {} \"{name}\"\n", i + 2));
    }
}

/// One `.cu` file of `kernels/`.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    /// File name under `kernels/`, also the NVRTC program name (it appears in compiler errors).
    pub name: &'static str,
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines (all loaded at start-up).
    pub kernels: &'static [&'static str],
    /// Hopper only: compiled for sm_90a (the architecture-specific features of compute
    /// capability 9.0, such as `wgmma`), on 9.0 devices only; elsewhere it is not compiled and
    /// its kernels are not loaded ([`KernelFile::arch_for`]).
    pub sm90a: bool,
}

impl KernelFile {
    /// The architecture to compile this file for on a device of architecture `device` (e.g.
    /// "sm_90"), or None when it is not for that device.
    pub fn arch_for(&self, device: &'static str) -> Option<&'static str> {
        match (self.sm90a, device) {
            (false, _) => Some(device),
            (true, "sm_90") => Some("sm_90a"),
            (true, _) => None,
        }
    }

    /// What NVRTC compiles: the shared helpers, then [`KernelFile::expanded_source`].
    pub fn full_source(&self) -> String {
        format!("{COMMON}\n{}", self.expanded_source())
    }

    /// The file under its own name and line numbers, with the headers it includes pasted in
    /// (each under its own name and line numbers too).
    pub fn expanded_source(&self) -> String {
        let mut out = String::new();
        paste_includes(self.name, self.source, &mut Vec::new(), &mut out);
        out
    }
}

pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        name: "conv.cu",
        source: include_str!("../../kernels/conv.cu"),
        sm90a: false,
        kernels: &[
            "conv2d_fwd_f32",
            "conv2d_bwd_dx_f32",
            "conv2d_bwd_dw_f32",
            "col_sum_partial_f32",
            "conv_t2d_fwd_f32",
            "conv_t2d_bwd_dx_f32",
            "conv_t2d_bwd_dw_f32",
        ],
    },
    KernelFile {
        name: "conv_tc.cu",
        source: include_str!("../../kernels/conv_tc.cu"),
        sm90a: false,
        kernels: &[
            "conv_igemm_direct_tf32",
            "conv_igemm_adjoint_tf32",
            "conv_w_nk_tf32",
            "conv_igemm_direct_v3_tf32",
            "conv_igemm_adjoint_v3_tf32",
            "conv_igemm_direct_v3n32_tf32",
            "conv_igemm_adjoint_v3n32_tf32",
            "conv_igemm_direct_v3_k32_tf32",
            "conv_igemm_adjoint_v3_k32_tf32",
            "conv_igemm_direct_c4k3_tf32",
            "conv_igemm_adjoint_c4k3_tf32",
            "conv_igemm_direct_c4k5_tf32",
            "conv_igemm_adjoint_c4k5_tf32",
            "conv_igemm_direct_c4n32k3_tf32",
            "conv_igemm_adjoint_c4n32k3_tf32",
            "conv_igemm_direct_c4n32k5_tf32",
            "conv_igemm_adjoint_c4n32k5_tf32",
            "conv_dw_partial_tf32",
            "conv_dw_partial_v3_tf32",
            "conv_dw_partial_v3r32_tf32",
            "conv_dw_partial_v4k3s1_tf32",
            "conv_dw_partial_v4k3s2_tf32",
            "conv_dw_partial_v4k5s1_tf32",
            "conv_dw_partial_v4k5s2_tf32",
            "conv_dw_partial_v4r32k3s1_tf32",
            "conv_dw_partial_v4r32k3s2_tf32",
            "conv_dw_partial_v4r32k5s1_tf32",
            "conv_dw_partial_v4r32k5s2_tf32",
            "conv_dw_partial_v4r32k3s1u40_tf32",
            "conv_dw_partial_v4r32k5s1u40_tf32",
            "conv_dw_partial_v4k3s1u32_tf32",
            "conv_dw_partial_v4k3s2u32_tf32",
            "conv_dw_partial_v4k5s1u32_tf32",
            "conv_dw_partial_v4k5s2u32_tf32",
            "conv_dw_partial_v5k5s1_tf32",
            "conv_dw_partial_c4k3_f32",
            "conv_dw_partial_c4k5_f32",
            "conv_dw_partial_c4r32k3_f32",
            "conv_dw_partial_c4r32k5_f32",
            "conv_dw_partial_c4tck3_tf32",
            "conv_dw_partial_c4tck5_tf32",
            "conv_dw_partial_c4tcr32k3_tf32",
            "conv_dw_partial_c4tcr32k5_tf32",
            "conv_dw_partial_k1tc_tf32",
            "conv_dw_reduce_f32",
            "conv_splitk_reduce_f32",
        ],
    },
    KernelFile {
        name: "conv_tc_v5.cu",
        source: include_str!("../../kernels/conv_tc_v5.cu"),
        sm90a: false,
        kernels: &[
            "conv_igemm_direct_v5k3_tf32",
            "conv_igemm_adjoint_v5k3_tf32",
            "conv_igemm_direct_v5k5_tf32",
            "conv_igemm_adjoint_v5k5_tf32",
            "conv_igemm_direct_v5n8k3_tf32",
            "conv_igemm_adjoint_v5n8k3_tf32",
            "conv_igemm_direct_v5n8k5_tf32",
            "conv_igemm_adjoint_v5n8k5_tf32",
            "conv_igemm_direct_v5c32k3_tf32",
            "conv_igemm_adjoint_v5c32k3_tf32",
            "conv_igemm_direct_v5c32k5_tf32",
            "conv_igemm_adjoint_v5c32k5_tf32",
            "conv_igemm_direct_v5c32n8k3_tf32",
            "conv_igemm_adjoint_v5c32n8k3_tf32",
            "conv_igemm_direct_v5c32n8k5_tf32",
            "conv_igemm_adjoint_v5c32n8k5_tf32",
            "conv_igemm_adjoint_v5s2k3_tf32",
            "conv_igemm_adjoint_v5s2k5_tf32",
            "conv_igemm_direct_v5s2k3_tf32",
            "conv_igemm_direct_v5s2k5_tf32",
            "conv_igemm_direct_n8sk3_tf32",
            "conv_igemm_adjoint_n8sk3_tf32",
            "conv_igemm_direct_n8sk5_tf32",
            "conv_igemm_adjoint_n8sk5_tf32",
        ],
    },
    KernelFile {
        name: "conv_tc_v6.cu",
        source: include_str!("../../kernels/conv_tc_v6.cu"),
        sm90a: false,
        kernels: &[
            "conv_igemm_direct_v6c32k3_tf32",
            "conv_igemm_adjoint_v6c32k3_tf32",
            "conv_igemm_direct_v6c32k5_tf32",
            "conv_igemm_adjoint_v6c32k5_tf32",
            "conv_igemm_direct_v6k5_tf32",
            "conv_igemm_adjoint_v6k5_tf32",
        ],
    },
    KernelFile {
        name: "peak.cu",
        source: include_str!("../../kernels/peak.cu"),
        sm90a: false,
        kernels: &["mma_peak_tf32", "l2_read_peak_f32"],
    },
    KernelFile {
        name: "wgmma.cu",
        source: include_str!("../../kernels/wgmma.cu"),
        sm90a: true,
        kernels: &["wgmma_probe_tf32", "wgmma_peak_tf32"],
    },
    KernelFile {
        name: "conv_wgmma.cu",
        source: include_str!("../../kernels/conv_wgmma.cu"),
        sm90a: true,
        kernels: &[
            "conv_igemm_direct_wg5_tf32",
            "conv_igemm_adjoint_wg5_tf32",
            "conv_igemm_adjoint_wg5s2_tf32",
            "conv_igemm_direct_wg5s2_tf32",
            "conv_dw_partial_wg5s1_tf32",
            "conv_dw_partial_wg5s1t_tf32",
            "conv_dw_partial_wg5s2_tf32",
            "conv_dw_partial_wg5s2t_tf32",
        ],
    },
    KernelFile {
        name: "linear.cu",
        source: include_str!("../../kernels/linear.cu"),
        sm90a: false,
        kernels: &[
            "linear_fwd_f32",
            "relu_mask_f32",
            "linear_bwd_dx_f32",
            "linear_bwd_dw_partial_f32",
            "sum_partials_f32",
            "matmul_small_f32",
        ],
    },
    KernelFile {
        name: "layernorm.cu",
        source: include_str!("../../kernels/layernorm.cu"),
        sm90a: false,
        kernels: &[
            "layernorm_fwd_f32",
            "layernorm_bwd_dx_f32",
            "layernorm_params_partial_f32",
        ],
    },
    KernelFile {
        name: "attention.cu",
        source: include_str!("../../kernels/attention.cu"),
        sm90a: false,
        kernels: &[
            "attention_fwd_f32",
            "attention_bwd_f32",
            "attention_fwd_partial_f32",
            "attention_fwd_partial_v3k4_f32",
            "attention_fwd_partial_v3k8_f32",
            "attention_fwd_partial_v4k4_f32",
            "attention_fwd_partial_v4k8_f32",
            "attention_bwd_stats_v3k4_f32",
            "attention_bwd_stats_v3k8_f32",
            "attention_bwd_main_v3k4_f32",
            "attention_bwd_main_v3k8_f32",
            "attention_bwd_stats_v4k4_f32",
            "attention_bwd_stats_v4k8_f32",
            "attention_bwd_main_v4k4_f32",
            "attention_bwd_main_v4k8_f32",
            "attention_fwd_reduce_f32",
            "attention_bwd_stats_f32",
            "attention_bwd_main_f32",
            "attention_bwd_dq_reduce_f32",
        ],
    },
    KernelFile {
        name: "gru.cu",
        source: include_str!("../../kernels/gru.cu"),
        sm90a: false,
        kernels: &["gru_gates_fwd_f32", "gru_gates_bwd_f32"],
    },
    KernelFile {
        name: "posembed.cu",
        source: include_str!("../../kernels/posembed.cu"),
        sm90a: false,
        kernels: &[
            "softpos_add_fwd_f32",
            "broadcast_pos_fwd_f32",
            "posembed_params_partial_f32",
            "broadcast_pos_bwd_dz_f32",
        ],
    },
    KernelFile {
        name: "tokens.cu",
        source: include_str!("../../kernels/tokens.cu"),
        sm90a: false,
        kernels: &[
            "tokens_fwd_f32",
            "tokens_fwd_tf32",
            "tokens_fwd_v3_tf32",
            "tokens_fwd_v3w32_tf32",
            "tokens_bwd_f32",
            "tokens_bwd_tf32",
            "tokens_bwd_v3_tf32",
            "tokens_bwd_v3w32_tf32",
            "tokens_bwd_reduce_f32",
        ],
    },
    KernelFile {
        name: "bcastconv.cu",
        source: include_str!("../../kernels/bcastconv.cu"),
        sm90a: false,
        kernels: &[
            "bconv_weight_classes_f32",
            "bconv_slot_classes_f32",
            "bconv_out_f32",
            "bconv_bwd_classes_f32",
            "bconv_bwd_pos_f32",
            "bconv_bwd_dz_f32",
            "bconv_bwd_dwc_f32",
            "bconv_bwd_dw_fold_f32",
        ],
    },
    KernelFile {
        name: "slotcell.cu",
        source: include_str!("../../kernels/slotcell.cu"),
        sm90a: false,
        kernels: &[
            "slot_query_fwd_f32",
            "slot_update_fwd_f32",
            "slot_update_bwd_f32",
            "slot_update_bwd_params_partial_f32",
            "slot_update_bwd_params_reduce_f32",
            "slot_query_bwd_f32",
            "slot_query_bwd_params_partial_f32",
            "slot_query_bwd_params_reduce_f32",
        ],
    },
    KernelFile {
        name: "composite.cu",
        source: include_str!("../../kernels/composite.cu"),
        sm90a: false,
        kernels: &[
            "composite_fwd_f32",
            "composite_loss_f32",
            "composite_bwd_f32",
        ],
    },
    KernelFile {
        name: "elementwise.cu",
        source: include_str!("../../kernels/elementwise.cu"),
        sm90a: false,
        kernels: &[
            "fill_normal_f32",
            "dropout_f32",
            "slot_init_fwd_f32",
            "slot_init_bwd_f32",
            "add_assign_f32",
            "scale_f32",
            "fill_f32",
        ],
    },
    KernelFile {
        name: "optim.cu",
        source: include_str!("../../kernels/optim.cu"),
        sm90a: false,
        kernels: &[
            "adam_f32",
            "opt_control_f64",
            "sum_squares_multi_f32",
            "adam_multi_f32",
            "sum_squares_partial_f32",
            "diff_squares_partial_f32",
            "sum_partials_f64",
        ],
    },
];

/// The names of the `extern "C" __global__` functions defined in a source (a plain text scan,
/// used to check the table above against the files). Kernels stamped out by an entry macro
/// (`#define X_ENTRY(NAME, ...)` whose body declares `NAME`, used as `X_ENTRY(name, ...)` at the
/// start of a line) count by those uses.
pub fn declared_kernels(source: &str) -> Vec<String> {
    let mut out: Vec<String> = source
        .lines()
        .filter_map(|line| {
            let (mac, args) = line.split_once('(')?;
            let is_use = mac.ends_with("_ENTRY")
                && mac
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            is_use.then(|| args.split(',').next().unwrap_or("").trim().to_string())
        })
        .collect();
    let mut rest = source;
    let marker = "extern \"C\" __global__ void ";
    while let Some(at) = rest.find(marker) {
        rest = &rest[at + marker.len()..];
        // `extern "C" __global__ void __launch_bounds__(N) name(...)`
        if let Some(after) = rest.strip_prefix("__launch_bounds__") {
            rest = after[after.find(')').map_or(0, |p| p + 1)..].trim_start();
        }
        // (A macro definition continues its line with a backslash.)
        let name: String = rest
            .trim_start_matches(|c: char| c.is_whitespace() || c == '\\')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // (`NAME`: the parameter of an entry macro's definition, counted by its uses above.)
        if name != "NAME" {
            out.push(name);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_exactly_the_kernels_of_each_file() {
        let mut all = std::collections::HashSet::new();
        for f in KERNEL_FILES {
            let mut declared = declared_kernels(f.source);
            let mut listed: Vec<String> = f.kernels.iter().map(|s| s.to_string()).collect();
            declared.sort();
            listed.sort();
            assert_eq!(declared, listed, "{}", f.name);
            for k in f.kernels {
                assert!(all.insert(*k), "kernel {k} defined twice");
            }
            // Free of the toolkit's headers (NVRTC on the GPU machines has none): the only
            // includes are of kernels/'s own headers, and none is left in what NVRTC compiles.
            for line in f
                .source
                .lines()
                .filter(|l| l.trim().starts_with("#include"))
            {
                let h = included(line).unwrap_or_else(|| panic!("{}: {line}", f.name));
                assert!(HEADERS.iter().any(|(n, _)| *n == h), "{}: {line}", f.name);
            }
            let full = f.full_source();
            let left = full.lines().find(|l| l.trim().starts_with("#include"));
            assert_eq!(left, None, "{}", f.name);
        }
        for (name, text) in HEADERS {
            assert!(declared_kernels(text).is_empty(), "{name} defines kernels");
        }
    }

    /// Every header of kernels/ is in HEADERS (common.cuh aside, which every program starts with).
    #[test]
    fn headers_lists_every_header_of_kernels() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cuh") && n != "common.cuh")
            .collect();
        on_disk.sort();
        let mut listed: Vec<&str> = HEADERS.iter().map(|(n, _)| *n).collect();
        listed.sort();
        assert_eq!(on_disk, listed);
    }

    /// A header is pasted once per program, in place of its first include, and each part keeps
    /// its own file name and line numbers: line L of a file is the line after the last
    /// `#line N "file"` directive above it, at distance L − N.
    #[test]
    fn includes_are_pasted_once_under_their_own_names_and_lines() {
        let f = KERNEL_FILES
            .iter()
            .find(|f| f.name == "conv_tc_v6.cu")
            .unwrap();
        let text = f.expanded_source();
        for h in ["conv_tc.cuh", "conv_tc_v5.cuh"] {
            let starts = text.matches(&format!("#line 1 \"{h}\"\n")).count();
            assert_eq!(starts, 1, "{h}");
        }
        // Map every line back to (file, line) and compare with the files themselves.
        let source_of = |name: &str| -> &str {
            if name == f.name {
                return f.source;
            }
            HEADERS.iter().find(|(n, _)| *n == name).unwrap().1
        };
        let (mut file, mut line) = ("", 0usize);
        let mut mapped = 0;
        for l in text.lines() {
            if let Some(d) = l.strip_prefix("#line ") {
                let (n, name) = d.split_once(' ').unwrap();
                line = n.parse().unwrap();
                file = name.trim_matches('"');
                continue;
            }
            assert_eq!(
                source_of(file).lines().nth(line - 1),
                Some(l),
                "{file}:{line}"
            );
            line += 1;
            mapped += 1;
        }
        let includes = 2; // conv_tc_v6.cu's and conv_tc_v5.cuh's
        let total: usize = [f.name, "conv_tc.cuh", "conv_tc_v5.cuh"]
            .iter()
            .map(|n| source_of(n).lines().count())
            .sum();
        assert_eq!(mapped, total - includes);
    }
}
