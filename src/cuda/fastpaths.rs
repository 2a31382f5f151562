//! The CUDA backend's fast paths, each of which can be switched off.
//!
//! Every fast path has a slower fallback that computes the same function and is tested against
//! the same CPU reference: an older kernel version, or the composition of single-op kernels.
//! Switching one off (`SLOTFIX_CUDA_DISABLE=tokens,slot_cell`, or `all`) does two jobs:
//! - an escape hatch: if a fast kernel misbehaves on some GPU, training goes on without it
//!   (and without a rebuild);
//! - an ablation: `slotfix bench` with one path off measures what that path is worth in a whole
//!   training step (`bash tools/gpu_session.sh ablate`).

/// Environment variable naming the fast paths to switch off.
pub const DISABLE_ENV: &str = "SLOTFIX_CUDA_DISABLE";

/// Which fast paths the CUDA backend may take (all of them by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastPaths {
    /// Version 3 of the tensor-core activation passes (`conv_igemm_*_v3*`); off: version 2.
    pub conv_v3: bool,
    /// Within version 3 of the activation passes, k-tiles of 32 channels on the 128 × 64 tiles
    /// where the gathered channels are a multiple of 32 (`conv_igemm_*_v3_k32_tf32`, with more
    /// than 48 KiB of shared memory); off: k-tiles of 16.
    pub conv_k32: bool,
    /// Version 5 of the activation passes where it applies (3×3 or 5×5; stride 1 with 64
    /// gathered channels into more than 32 or at most 8 outputs, or 32 into at most 32; stride
    /// 2 with 64 gathered channels into more than 32, by phases): the output tile's halo staged
    /// once (`conv_igemm_*_v5*_tf32`); off: version 3.
    pub conv_v5: bool,
    /// Within version 5, version 6 where it applies (stride 1: 5×5 with 64 gathered channels
    /// into more than 32 outputs, or 32 into 9 to 32): 4 warps per block, each with twice
    /// version 5's pixels (64 × 32 channels, `conv_igemm_*_v6k5_tf32`; 32 × 32, `*_v6c32*`);
    /// off: version 5's 8 warps.
    pub conv_v6: bool,
    /// Version 7 on Hopper (compute capability 9.0, sm_90a): the 5×5 passes of 64 gathered
    /// channels into 64 outputs at stride 1, and at stride 2 by phases as `v5s2` (transposed
    /// convolutions' forwards and input gradients), on the warpgroup MMA
    /// (`conv_igemm_*_wg5*_tf32`: the weights in registers, the output tile's pixels read by
    /// the tensor cores from the halo); off, and on other devices: version 6 (`v5s2` at
    /// stride 2).
    pub conv_wgmma: bool,
    /// Version 5 for at most 4 gathered channels (stride 1, 3×3 or 5×5, more than 8 outputs:
    /// the first layer's forward, the last layer's input gradient): two taps per k-step of the
    /// mma (`conv_igemm_*_c4*_tf32`); off: version 2.
    pub conv_c4: bool,
    /// Within version 5, its passes of 64 gathered channels into at most 8 outputs (the
    /// CLEVR decoder's last layer's forward) streamed where the source is not masked
    /// (`conv_igemm_*_n8s*_tf32`: blocks walk 4 × 16 output tiles with the next tile's halo
    /// copied by cp.async while the current one is multiplied); off: version 5's `v5n8`.
    pub conv_n8s: bool,
    /// Version 3 of the tensor-core weight-gradient passes (`conv_dw_partial_v3*`, with the
    /// bias gradient from the GEMM's operand sums); off: version 2 and a column-sum pass.
    pub dw_v3: bool,
    /// Version 4 of the weight-gradient passes where it applies (`conv_dw_partial_v4k*`: 64
    /// rows, 32 gathered channels, 3×3 or 5×5, stride 1 or 2; a block per row of taps, which
    /// share one strip of source pixels); off: version 3.
    pub dw_v4: bool,
    /// Within version 4, wider units where the grid rows allow: 40 positions for 32-row blocks
    /// at stride 1 over rows 33 to 40 wide (the small models' 35 × 35: one unit per grid row;
    /// `conv_dw_partial_v4r32k*s1u40`), 32 for 64-row blocks over rows a multiple of 32 wide
    /// (clevr6's: half the barriers; `conv_dw_partial_v4k*u32`); off: units of 16.
    pub dw_units: bool,
    /// Within version 4 with units of 32, version 5 for 5×5 at stride 1
    /// (`conv_dw_partial_v5k5s1_tf32`: 4 warps of all 64 rows instead of 8 of 32, the operands
    /// copied to shared memory by cp.async); off: version 4's 8 warps.
    pub dw_v5: bool,
    /// On Hopper (compute capability 9.0, sm_90a), the 5×5 weight gradients in version 4's
    /// units of 32 (version 5's at stride 1, `v4k5s2u32`'s at stride 2) on the warpgroup MMA
    /// (`conv_dw_partial_wg5s*_tf32`: per unit of 32 positions 4 products m64n160k8, A from
    /// registers loaded straight from memory, the strip's pixels read by the tensor cores from
    /// shared memory); off, and on other devices: versions 5 and 4.
    pub dw_wgmma: bool,
    /// Weight gradients for at most 4 gathered channels (64 or 32 rows, 3×3 or 5×5, stride 1:
    /// the first layer's, and a transposed last layer's) in f32 FMAs, each tap's 4 channels one
    /// shared broadcast (`conv_dw_partial_c4*`); off: version 2 or 3.
    pub dw_c4: bool,
    /// Within `dw_c4`, its version on the tensor cores (`conv_dw_partial_c4tc*`: TF32 mma, two
    /// taps' 4 channels a column tile; the next tile's A copied by cp.async while the current
    /// one is multiplied); off: `dw_c4`'s f32 FMAs.
    pub dw_c4_tc: bool,
    /// Weight gradients of 1×1 convolutions with 64 gathered channels and a multiple of 64
    /// rows (the linear layers' under TF32: the token chain's four) streamed on the tensor
    /// cores (`conv_dw_partial_k1tc_tf32`: both operands' next 64 positions copied by cp.async
    /// while the current ones are multiplied); off: version 3 (or 2).
    pub dw_k1: bool,
    /// Version 2 of the attention kernels (tokens split over blocks); off: version 1, one block
    /// per image and head.
    pub attention_v2: bool,
    /// Within version 2, version 3 of the attention kernels where it applies (k ≤ 8, head
    /// widths 8, 16, 32 or 64): the slot count a compile-time constant
    /// (`attention_*_v3k*`); off: version 2's forward and backward.
    pub attention_v3: bool,
    /// Version 4 of the attention kernels (`attention_*_v4k*_f32`), where k and v are one tensor
    /// (u, under `kv_fold`) and one head: each kernel copies its block's rows to shared memory
    /// once and reads them there; off: version 3.
    pub attention_v4: bool,
    /// The fused token chain (`tokens_{fwd,bwd}_{f32,tf32}`); off: the single ops.
    pub tokens: bool,
    /// Within the fused chain on the tensor cores, version 3 of its forward and backward
    /// (`tokens_{fwd,bwd}_v3*_tf32`: persistent blocks with the weights staged once, a warp per
    /// 16 tokens, the chain in registers, no barrier per tile); off: version 2.
    pub tokens_v3: bool,
    /// Slot attention reads u with Wk and Wv folded into the slot cell's weights (`model.rs`,
    /// "The fold"; one head and feat = d): the token chain writes no k, v, attention reads one
    /// tensor and its backward writes one. Off: k and v as the reference computes them.
    pub kv_fold: bool,
    /// The fused slot cell (`slot_query_*`, `slot_update_*`); off: the single ops.
    pub slot_cell: bool,
    /// The decoder's first convolution split by border classes (`bcast_conv_*`); off: the
    /// broadcast input is built and convolved (more memory: its buffers are allocated).
    pub bcast_split: bool,
    /// Split-K for the one-image convolutions of that split (the position image's forward and
    /// input gradient under version 3: their reduction split over blocks, then
    /// `conv_splitk_reduce_f32`); off: a few blocks run the whole reduction.
    pub conv_splitk: bool,
}

impl Default for FastPaths {
    fn default() -> Self {
        FastPaths::ALL
    }
}

impl FastPaths {
    pub const ALL: FastPaths = FastPaths {
        conv_v3: true,
        conv_k32: true,
        conv_v5: true,
        conv_v6: true,
        conv_wgmma: true,
        conv_c4: true,
        conv_n8s: true,
        dw_v3: true,
        dw_v4: true,
        dw_units: true,
        dw_v5: true,
        dw_wgmma: true,
        dw_c4: true,
        dw_c4_tc: true,
        dw_k1: true,
        attention_v2: true,
        attention_v3: true,
        attention_v4: true,
        tokens: true,
        tokens_v3: true,
        kv_fold: true,
        slot_cell: true,
        bcast_split: true,
        conv_splitk: true,
    };
    pub const NONE: FastPaths = FastPaths {
        conv_v3: false,
        conv_k32: false,
        conv_v5: false,
        conv_v6: false,
        conv_wgmma: false,
        conv_c4: false,
        conv_n8s: false,
        dw_v3: false,
        dw_v4: false,
        dw_units: false,
        dw_v5: false,
        dw_wgmma: false,
        dw_c4: false,
        dw_c4_tc: false,
        dw_k1: false,
        attention_v2: false,
        attention_v3: false,
        attention_v4: false,
        tokens: false,
        tokens_v3: false,
        kv_fold: false,
        slot_cell: false,
        bcast_split: false,
        conv_splitk: false,
    };

    /// The names `SLOTFIX_CUDA_DISABLE` takes, in a fixed order.
    pub const NAMES: [&'static str; 24] = [
        "conv_v3",
        "conv_k32",
        "conv_v5",
        "conv_v6",
        "conv_wgmma",
        "conv_c4",
        "conv_n8s",
        "dw_v3",
        "dw_v4",
        "dw_units",
        "dw_v5",
        "dw_wgmma",
        "dw_c4",
        "dw_c4_tc",
        "dw_k1",
        "attention_v2",
        "attention_v3",
        "attention_v4",
        "tokens",
        "tokens_v3",
        "kv_fold",
        "slot_cell",
        "bcast_split",
        "conv_splitk",
    ];

    fn flag(&mut self, name: &str) -> Option<&mut bool> {
        Some(match name {
            "conv_v3" => &mut self.conv_v3,
            "conv_k32" => &mut self.conv_k32,
            "conv_v5" => &mut self.conv_v5,
            "conv_v6" => &mut self.conv_v6,
            "conv_wgmma" => &mut self.conv_wgmma,
            "conv_c4" => &mut self.conv_c4,
            "conv_n8s" => &mut self.conv_n8s,
            "dw_v3" => &mut self.dw_v3,
            "dw_v4" => &mut self.dw_v4,
            "dw_units" => &mut self.dw_units,
            "dw_v5" => &mut self.dw_v5,
            "dw_wgmma" => &mut self.dw_wgmma,
            "dw_c4" => &mut self.dw_c4,
            "dw_c4_tc" => &mut self.dw_c4_tc,
            "dw_k1" => &mut self.dw_k1,
            "attention_v2" => &mut self.attention_v2,
            "attention_v3" => &mut self.attention_v3,
            "attention_v4" => &mut self.attention_v4,
            "tokens" => &mut self.tokens,
            "tokens_v3" => &mut self.tokens_v3,
            "kv_fold" => &mut self.kv_fold,
            "slot_cell" => &mut self.slot_cell,
            "bcast_split" => &mut self.bcast_split,
            "conv_splitk" => &mut self.conv_splitk,
            _ => return None,
        })
    }

    /// Whether fast path `name` (one of [`FastPaths::NAMES`]) is on.
    pub fn is_on(&self, name: &str) -> Option<bool> {
        let mut copy = *self;
        copy.flag(name).map(|f| *f)
    }

    /// Every path on except those in `list`: names separated by commas (spaces allowed), or
    /// `all`; an empty list switches nothing off. An unknown name is an error that lists the
    /// allowed ones.
    pub fn all_but(list: &str) -> Result<FastPaths, String> {
        let mut fp = FastPaths::ALL;
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if name == "all" {
                fp = FastPaths::NONE;
                continue;
            }
            match fp.flag(name) {
                Some(f) => *f = false,
                None => {
                    return Err(format!(
                        "{DISABLE_ENV}: unknown fast path `{name}`; allowed: {}, all",
                        FastPaths::NAMES.join(", ")
                    ))
                }
            }
        }
        Ok(fp)
    }

    /// From `SLOTFIX_CUDA_DISABLE` (all on when it is unset or empty).
    pub fn from_env() -> Result<FastPaths, String> {
        match std::env::var(DISABLE_ENV) {
            Ok(list) => FastPaths::all_but(&list),
            Err(std::env::VarError::NotPresent) => Ok(FastPaths::ALL),
            Err(e) => Err(format!("{DISABLE_ENV}: {e}")),
        }
    }

    /// The names of the paths that are off, in [`FastPaths::NAMES`] order.
    pub fn off(&self) -> Vec<&'static str> {
        FastPaths::NAMES
            .into_iter()
            .filter(|n| self.is_on(n) == Some(false))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_into_paths_switched_off() {
        assert_eq!(FastPaths::all_but("").unwrap(), FastPaths::ALL);
        assert_eq!(FastPaths::all_but(" , ").unwrap(), FastPaths::ALL);
        assert_eq!(FastPaths::all_but("all").unwrap(), FastPaths::NONE);
        let fp = FastPaths::all_but("tokens, bcast_split").unwrap();
        assert_eq!(fp.off(), vec!["tokens", "bcast_split"]);
        assert!(
            fp.conv_v3
                && fp.conv_k32
                && fp.conv_v5
                && fp.conv_v6
                && fp.conv_wgmma
                && fp.conv_c4
                && fp.conv_n8s
                && fp.dw_v3
                && fp.dw_v4
                && fp.dw_units
                && fp.dw_v5
                && fp.dw_wgmma
                && fp.dw_c4
                && fp.dw_c4_tc
                && fp.dw_k1
                && fp.attention_v2
                && fp.attention_v3
                && fp.tokens_v3
                && fp.slot_cell
                && fp.conv_splitk
        );
        assert!(!fp.tokens && !fp.bcast_split);
        // Each name switches off exactly its own flag.
        for name in FastPaths::NAMES {
            let fp = FastPaths::all_but(name).unwrap();
            assert_eq!(fp.off(), vec![name]);
        }
        assert_eq!(FastPaths::NONE.off(), FastPaths::NAMES.to_vec());
        assert!(FastPaths::ALL.off().is_empty());
    }

    /// The README's table of fast paths has one row per name, in the same order.
    #[test]
    fn the_readme_lists_every_fast_path() {
        let readme = include_str!("../../README.md");
        let rows: Vec<&str> = readme
            .lines()
            .filter_map(|l| l.strip_prefix("| `")?.split('`').next())
            .filter(|name| FastPaths::NAMES.contains(name))
            .collect();
        assert_eq!(rows, FastPaths::NAMES.to_vec());
    }

    #[test]
    fn an_unknown_name_is_an_error_that_lists_the_allowed_ones() {
        let e = FastPaths::all_but("tokens,slotcell").unwrap_err();
        assert!(e.contains("`slotcell`"), "{e}");
        assert!(e.contains("slot_cell") && e.contains("all"), "{e}");
        assert!(e.starts_with(DISABLE_ENV), "{e}");
    }
}
