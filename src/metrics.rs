//! Foreground Adjusted Rand Index (FG-ARI), as used by DeepMind's
//! `multi_object_datasets` segmentation metrics and the Slot Attention paper.
//!
//! Conventions:
//! - The predicted segmentation is the argmax over slots of the alpha masks
//!   (ties go to the lowest slot index).
//! - The true segmentation holds entity ids; id 0 is background and those
//!   pixels are dropped before anything is counted.
//! - An image with fewer than 2 foreground pixels has no pixel pairs, so ARI
//!   is undefined there: [`fg_ari`] returns `None` and [`fg_ari_batch`] leaves
//!   the image out of both the sum and the count.
//! - When the ARI denominator is 0 the two partitions are identical (both a
//!   single group, or both all singletons), and the score is 1.

use rayon::prelude::*;

/// Argmax over K of masks laid out `[K, H*W]` (one image) -> predicted slot id per pixel.
///
/// Ties resolve to the lowest slot index; NaN never wins a comparison, so a pixel
/// whose masks are all NaN is assigned slot 0.
///
/// # Panics
/// If `masks.len() != k * pixels`, `k == 0`, or `k` does not fit in a `u16` id.
pub fn argmax_segmentation(masks: &[f32], k: usize, pixels: usize) -> Vec<u16> {
    assert!(k > 0, "argmax_segmentation: k must be > 0");
    assert!(
        k <= usize::from(u16::MAX) + 1,
        "argmax_segmentation: k = {k} does not fit in u16 slot ids"
    );
    assert_eq!(
        masks.len(),
        k * pixels,
        "argmax_segmentation: masks must be [K, pixels]"
    );
    let mut best_value = masks[..pixels].to_vec();
    let mut best_slot = vec![0u16; pixels];
    // Slot-major sweep: each pass reads one contiguous [pixels] plane.
    for slot in 1..k {
        let plane = &masks[slot * pixels..(slot + 1) * pixels];
        for ((value, best), id) in plane.iter().zip(&mut best_value).zip(&mut best_slot) {
            // `value > best` is false for NaN on either side, so a NaN best
            // (from slot 0) is replaced explicitly by the first real value.
            if *value > *best || (best.is_nan() && !value.is_nan()) {
                *best = *value;
                *id = slot as u16;
            }
        }
    }
    best_slot
}

/// FG-ARI of one image; `None` when fewer than 2 foreground pixels.
///
/// `pred` holds predicted group ids, `truth` entity ids with 0 = background.
/// Background pixels are ignored whatever their prediction.
///
/// # Panics
/// If `pred.len() != truth.len()`.
pub fn fg_ari(pred: &[u16], truth: &[u8]) -> Option<f64> {
    assert_eq!(
        pred.len(),
        truth.len(),
        "fg_ari: pred and truth must have one entry per pixel"
    );

    // Map the predicted ids that occur on foreground to dense rows, in order of
    // first appearance, so the table stays small whatever the id values are.
    let max_pred = pred
        .iter()
        .zip(truth)
        .filter(|&(_, &t)| t != 0)
        .map(|(&p, _)| p)
        .max()?;
    let mut row_of_pred = vec![u32::MAX; usize::from(max_pred) + 1];
    let mut rows = 0usize;
    const COLS: usize = 256; // every u8 entity id gets a column
    let mut table: Vec<u64> = Vec::new();
    let mut n: u64 = 0;
    for (&p, &t) in pred.iter().zip(truth) {
        if t == 0 {
            continue;
        }
        let slot = &mut row_of_pred[usize::from(p)];
        if *slot == u32::MAX {
            *slot = rows as u32;
            rows += 1;
            table.resize(rows * COLS, 0);
        }
        table[*slot as usize * COLS + usize::from(t)] += 1;
        n += 1;
    }
    if n < 2 {
        return None;
    }

    // Ordered-pair counts x(x - 1), summed exactly in integers.
    let pairs = |x: u64| x * x.saturating_sub(1);
    let rand_index: u64 = table.iter().map(|&c| pairs(c)).sum();
    let pred_pairs: u64 = table
        .chunks_exact(COLS)
        .map(|row| pairs(row.iter().sum()))
        .sum();
    let truth_pairs: u64 = (0..COLS)
        .map(|col| pairs(table[col..].iter().step_by(COLS).sum()))
        .sum();
    let all_pairs = n * (n - 1);

    // With x = A/N, y = B/N the denominator is N((x + y)/2 - xy), which is 0 only
    // for x = y = 0 (both all singletons) or x = y = 1 (both a single group):
    // identical partitions either way. Tested exactly to avoid 0/0 in floats.
    if pred_pairs == truth_pairs && (pred_pairs == 0 || pred_pairs == all_pairs) {
        return Some(1.0);
    }

    let (ri, a, b, nn) = (
        rand_index as f64,
        pred_pairs as f64,
        truth_pairs as f64,
        all_pairs as f64,
    );
    let expected = a * b / nn;
    let max_index = (a + b) / 2.0;
    Some((ri - expected) / (max_index - expected))
}

/// FG-ARI over a batch: masks `[B, K, P]`, truth `[B, P]`.
///
/// Returns `(sum, count)` over the images that have a score (see [`fg_ari`]), so
/// callers can average across batches as `total_sum / total_count`. Images are
/// scored in parallel but summed in order, so the result is deterministic.
///
/// # Panics
/// If the slice lengths do not match `batch`, `k` and `pixels`.
pub fn fg_ari_batch(
    masks: &[f32],
    truth: &[u8],
    batch: usize,
    k: usize,
    pixels: usize,
) -> (f64, usize) {
    assert_eq!(
        masks.len(),
        batch * k * pixels,
        "fg_ari_batch: masks must be [B, K, P]"
    );
    assert_eq!(
        truth.len(),
        batch * pixels,
        "fg_ari_batch: truth must be [B, P]"
    );
    if batch == 0 || pixels == 0 {
        return (0.0, 0);
    }
    let scores: Vec<Option<f64>> = masks
        .par_chunks_exact(k * pixels)
        .zip(truth.par_chunks_exact(pixels))
        .map(|(image_masks, image_truth)| {
            fg_ari(&argmax_segmentation(image_masks, k, pixels), image_truth)
        })
        .collect();
    scores
        .into_iter()
        .flatten()
        .fold((0.0, 0), |(sum, count), score| (sum + score, count + 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    /// SplitMix64: a tiny deterministic generator so tests need no `rand` crate.
    struct SplitMix(u64);
    impl SplitMix {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn below(&mut self, bound: u64) -> u64 {
            self.next_u64() % bound
        }
    }

    /// ARI from the pair-confusion matrix (Hubert & Arabie, as in scikit-learn's
    /// `adjusted_rand_score`), counted by visiting every unordered pixel pair:
    /// shares no code or formula with the contingency-table path.
    fn ari_by_pair_counting(pred: &[u16], truth: &[u8]) -> Option<f64> {
        let kept: Vec<(u16, u8)> = pred
            .iter()
            .zip(truth)
            .filter(|&(_, &t)| t != 0)
            .map(|(&p, &t)| (p, t))
            .collect();
        if kept.len() < 2 {
            return None;
        }
        // together_both: same group in both; only_pred / only_truth: same group
        // in one partition only; apart_both: different groups in both.
        let (mut together_both, mut only_pred, mut only_truth, mut apart_both) =
            (0u64, 0u64, 0u64, 0u64);
        for i in 0..kept.len() {
            for j in i + 1..kept.len() {
                let same_pred = kept[i].0 == kept[j].0;
                let same_truth = kept[i].1 == kept[j].1;
                match (same_pred, same_truth) {
                    (true, true) => together_both += 1,
                    (true, false) => only_pred += 1,
                    (false, true) => only_truth += 1,
                    (false, false) => apart_both += 1,
                }
            }
        }
        if only_pred == 0 && only_truth == 0 {
            return Some(1.0); // the partitions agree on every pair
        }
        let (tp, fp, fn_, tn) = (
            together_both as f64,
            only_pred as f64,
            only_truth as f64,
            apart_both as f64,
        );
        Some(2.0 * (tp * tn - fn_ * fp) / ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn)))
    }

    #[test]
    fn argmax_picks_highest_slot_and_first_on_ties() {
        // K = 3 slots, 4 pixels, laid out [K, P].
        let masks = [
            0.1, 0.5, 0.3, 0.2, // slot 0
            0.8, 0.5, 0.3, 0.1, // slot 1
            0.1, 0.0, 0.4, 0.7, // slot 2
        ];
        assert_eq!(argmax_segmentation(&masks, 3, 4), vec![1, 0, 2, 2]);
    }

    #[test]
    fn argmax_skips_nan() {
        let masks = [f32::NAN, 0.2, 0.3, f32::NAN];
        assert_eq!(argmax_segmentation(&masks, 2, 2), vec![1, 0]);
    }

    #[test]
    fn perfect_segmentation_is_one() {
        let truth = [0, 1, 1, 2, 2, 3, 3, 3, 0];
        let pred = [5, 0, 0, 1, 1, 2, 2, 2, 7];
        assert_eq!(fg_ari(&pred, &truth), Some(1.0));
    }

    #[test]
    fn permuted_labels_are_one() {
        let truth = [1, 1, 2, 2, 3, 3, 3, 0, 0];
        let pred = [3, 3, 1, 1, 0, 0, 0, 2, 2];
        assert_abs_diff_eq!(fg_ari(&pred, &truth).unwrap(), 1.0, epsilon = 1e-12);
    }

    #[test]
    fn single_predicted_cluster_over_several_objects_is_zero() {
        let truth = [0, 1, 1, 1, 2, 2, 3, 3, 3, 3];
        let pred = [4; 10];
        assert_eq!(fg_ari(&pred, &truth), Some(0.0));
    }

    #[test]
    fn both_single_group_is_one() {
        let truth = [0, 0, 2, 2, 2, 2];
        let pred = [1, 0, 3, 3, 3, 3];
        assert_eq!(fg_ari(&pred, &truth), Some(1.0));
    }

    #[test]
    fn both_all_singletons_is_one() {
        let truth = [1, 2, 3, 0];
        let pred = [7, 8, 9, 7];
        assert_eq!(fg_ari(&pred, &truth), Some(1.0));
    }

    #[test]
    fn fewer_than_two_foreground_pixels_is_none() {
        assert_eq!(fg_ari(&[], &[]), None);
        assert_eq!(fg_ari(&[0, 1, 2], &[0, 0, 0]), None);
        assert_eq!(fg_ari(&[0, 1, 2], &[0, 3, 0]), None);
    }

    #[test]
    fn background_predictions_are_ignored() {
        let mut rng = SplitMix(7);
        let truth: Vec<u8> = (0..200).map(|_| rng.below(4) as u8).collect();
        let pred: Vec<u16> = (0..200).map(|_| rng.below(5) as u16).collect();
        let reference = fg_ari(&pred, &truth).unwrap();
        for round in 0..10 {
            let mut changed = pred.clone();
            for (p, &t) in changed.iter_mut().zip(&truth) {
                if t == 0 {
                    *p = (rng.below(1000) + round) as u16;
                }
            }
            assert_eq!(fg_ari(&changed, &truth).unwrap(), reference);
        }
    }

    #[test]
    fn hand_computed_case() {
        // Foreground pixels (truth, pred):
        //   (1,0) (1,0) (1,1) (2,1) (2,1) (2,1); two background pixels are ignored.
        // Contingency table n_ij, rows = pred, cols = truth:
        //            truth 1  truth 2 | a_i
        //   pred 0      2        0    |  2
        //   pred 1      1        3    |  4
        //   b_j         3        3    |  n = 6
        // RI = 2*1 + 0 + 0 + 3*2 = 8
        // A  = 2*1 + 4*3 = 14,  B = 3*2 + 3*2 = 12,  n(n-1) = 30
        // E  = 14*12/30 = 5.6,  max = (14+12)/2 = 13
        // ARI = (8 - 5.6) / (13 - 5.6) = 2.4 / 7.4 = 12/37
        let truth = [1, 1, 1, 2, 2, 2, 0, 0];
        let pred = [0, 0, 1, 1, 1, 1, 0, 1];
        assert_abs_diff_eq!(fg_ari(&pred, &truth).unwrap(), 12.0 / 37.0, epsilon = 1e-15);
    }

    #[test]
    fn matches_pair_counting_definition_on_random_inputs() {
        let mut rng = SplitMix(42);
        for case in 0..300 {
            let pixels = 2 + rng.below(60) as usize;
            let n_truth = 1 + rng.below(5);
            let n_pred = 1 + rng.below(6);
            // Every 10th case keeps truth to one object to exercise the edge cases.
            let truth: Vec<u8> = (0..pixels)
                .map(|_| {
                    if case % 10 == 0 {
                        rng.below(2) as u8
                    } else {
                        rng.below(n_truth + 1) as u8
                    }
                })
                .collect();
            let pred: Vec<u16> = (0..pixels).map(|_| rng.below(n_pred) as u16).collect();
            let fast = fg_ari(&pred, &truth);
            let slow = ari_by_pair_counting(&pred, &truth);
            match (fast, slow) {
                (Some(f), Some(s)) => assert!(
                    (f - s).abs() < 1e-12,
                    "case {case}: contingency {f} vs pair counting {s}"
                ),
                (None, None) => {}
                other => panic!("case {case}: definedness differs: {other:?}"),
            }
        }
    }

    #[test]
    fn random_predictions_average_near_zero() {
        let mut rng = SplitMix(1234);
        let (side, k, images) = (32usize, 7usize, 200usize);
        let pixels = side * side;
        let mut total = 0.0;
        for _ in 0..images {
            // Truth: background plus three axis-aligned boxes (later ones on top).
            let mut truth = vec![0u8; pixels];
            for object in 1..=3u8 {
                let (x0, y0) = (rng.below(24) as usize, rng.below(24) as usize);
                let (w, h) = (4 + rng.below(8) as usize, 4 + rng.below(8) as usize);
                for y in y0..(y0 + h).min(side) {
                    for x in x0..(x0 + w).min(side) {
                        truth[y * side + x] = object;
                    }
                }
            }
            let pred: Vec<u16> = (0..pixels).map(|_| rng.below(k as u64) as u16).collect();
            total += fg_ari(&pred, &truth).unwrap();
        }
        let mean = total / images as f64;
        assert!(
            mean.abs() < 0.05,
            "mean FG-ARI of random predictions = {mean}"
        );
    }

    #[test]
    fn batch_sums_scored_images_and_skips_empty_ones() {
        // B = 3 images, K = 2 slots, P = 4 pixels.
        #[rustfmt::skip]
        let masks = [
            // image 0: slots split pixels {0,1} / {2,3}, matching truth -> 1
            0.9, 0.9, 0.1, 0.1,   0.1, 0.1, 0.9, 0.9,
            // image 1: slot 0 everywhere over two objects -> 0
            0.9, 0.9, 0.9, 0.9,   0.1, 0.1, 0.1, 0.1,
            // image 2: a single foreground pixel -> skipped
            0.5, 0.5, 0.5, 0.5,   0.1, 0.1, 0.1, 0.1,
        ];
        let truth = [1, 1, 2, 2, 1, 1, 2, 2, 0, 0, 3, 0];
        let (sum, count) = fg_ari_batch(&masks, &truth, 3, 2, 4);
        assert_eq!(count, 2);
        assert_abs_diff_eq!(sum, 1.0, epsilon = 1e-12);
        assert_eq!(fg_ari_batch(&[], &[], 0, 2, 4), (0.0, 0));
    }
}
