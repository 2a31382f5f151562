//! Procedural Tetrominoes in the style of DeepMind's multi-object dataset: a black background and
//! `n` non-overlapping, saturated-colour tetrominoes.
//!
//! Differences from the DeepMind release, which has 35x35 images with 17 shape/orientation
//! variants: all 19 fixed tetrominoes are used (every rotation of I, O, T, S, Z, J, L), positions
//! are at pixel (not block) granularity, and the colours of different pieces are drawn
//! independently (two pieces may share a colour).

use std::sync::Arc;

use super::{
    check_buffers, embedded_len, make_pool, to_unit, DataError, DataSpec, Dataset, Draws, Split,
};

/// The 19 fixed tetrominoes as `(row, col)` cells, each normalised to touch row 0 and column 0.
pub(crate) const SHAPES: [[(u8, u8); 4]; 19] = [
    // I
    [(0, 0), (0, 1), (0, 2), (0, 3)],
    [(0, 0), (1, 0), (2, 0), (3, 0)],
    // O
    [(0, 0), (0, 1), (1, 0), (1, 1)],
    // T
    [(0, 0), (0, 1), (0, 2), (1, 1)],
    [(0, 1), (1, 0), (1, 1), (1, 2)],
    [(0, 0), (1, 0), (1, 1), (2, 0)],
    [(0, 1), (1, 0), (1, 1), (2, 1)],
    // S
    [(0, 1), (0, 2), (1, 0), (1, 1)],
    [(0, 0), (1, 0), (1, 1), (2, 1)],
    // Z
    [(0, 0), (0, 1), (1, 1), (1, 2)],
    [(0, 1), (1, 0), (1, 1), (2, 0)],
    // J
    [(0, 0), (1, 0), (1, 1), (1, 2)],
    [(0, 0), (0, 1), (1, 0), (2, 0)],
    [(0, 0), (0, 1), (0, 2), (1, 2)],
    [(0, 1), (1, 1), (2, 0), (2, 1)],
    // L
    [(0, 2), (1, 0), (1, 1), (1, 2)],
    [(0, 0), (1, 0), (2, 0), (2, 1)],
    [(0, 0), (0, 1), (0, 2), (1, 0)],
    [(0, 0), (0, 1), (1, 1), (2, 1)],
];

/// The six saturated colours: red, green, blue, yellow, cyan, magenta.
pub const PALETTE: [[u8; 3]; 6] = [
    [255, 0, 0],
    [0, 255, 0],
    [0, 0, 255],
    [255, 255, 0],
    [0, 255, 255],
    [255, 0, 255],
];

/// Random placements tried per piece before the scene is started over.
const PIECE_ATTEMPTS: usize = 50;
/// Scene attempts; the last one falls back to a raster scan, so generation always ends.
const SCENE_ATTEMPTS: usize = 100;

/// One placed piece: shape index, colour index, top-left corner in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub shape: usize,
    pub colour: usize,
    pub x: usize,
    pub y: usize,
}

/// Procedural Tetrominoes, rendered on demand from `(seed, split, index)`.
pub struct Tetrominoes {
    seed: u64,
    split: Split,
    len: usize,
    resolution: usize,
    objects: usize,
    block: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// Side of one block in pixels: 5 px at the original 35x35, scaled with the resolution.
pub fn block_size(resolution: usize) -> usize {
    ((resolution * 5 + 17) / 35).max(1)
}

/// Width and height of a shape in cells.
fn extent(shape: usize) -> (usize, usize) {
    let cells = &SHAPES[shape];
    let w = cells.iter().map(|c| c.1).max().unwrap_or(0) as usize + 1;
    let h = cells.iter().map(|c| c.0).max().unwrap_or(0) as usize + 1;
    (w, h)
}

impl Tetrominoes {
    pub fn new(spec: &DataSpec) -> Result<Self, DataError> {
        let len = embedded_len(spec)?;
        let resolution = spec.resolution;
        let objects = spec.max_objects.unwrap_or(3);
        let block = block_size(resolution);
        if resolution < 4 * block {
            return Err(DataError(format!(
                "tetrominoes: resolution {resolution} is too small for a tetromino of {block}px blocks"
            )));
        }
        // Half the image area keeps random placement quick (and possible) for every scene.
        let area = objects * 4 * block * block;
        if objects == 0 || objects > 254 || 2 * area > resolution * resolution {
            return Err(DataError(format!(
                "tetrominoes: max_objects = {objects} pieces of {block}px blocks do not fit in \
                 {resolution}x{resolution}; expected 1..={}",
                (resolution * resolution / (8 * block * block)).clamp(1, 254)
            )));
        }
        Ok(Self {
            seed: spec.seed,
            split: spec.split,
            len,
            resolution,
            objects,
            block,
            pool: make_pool(spec.num_workers)?,
        })
    }

    /// Side of one block in pixels.
    pub fn block(&self) -> usize {
        self.block
    }

    /// The pieces of example `i`, in drawing order (mask id = position + 1).
    ///
    /// Whole scenes are rejection-sampled: when a piece finds no free spot in `PIECE_ATTEMPTS`
    /// random tries, the scene starts over with fresh draws, which keeps crowded scenes uniform
    /// instead of jammed. Only the last scene attempt falls back to a raster scan for a free spot,
    /// and drops a piece if there is none (vanishingly rare below the area limit of `new`).
    pub(crate) fn scene(&self, i: usize) -> Vec<Piece> {
        let mut draws = Draws::new(self.seed, self.split, i);
        let mut attempt = 1;
        loop {
            if let Some(pieces) = self.try_scene(&mut draws, attempt >= SCENE_ATTEMPTS) {
                return pieces;
            }
            attempt += 1;
        }
    }

    fn try_scene(&self, draws: &mut Draws, last: bool) -> Option<Vec<Piece>> {
        let mut pieces: Vec<Piece> = Vec::with_capacity(self.objects);
        for _ in 0..self.objects {
            let colour = draws.below(PALETTE.len() as u64) as usize;
            let mut placed = None;
            for _ in 0..PIECE_ATTEMPTS {
                let shape = draws.below(SHAPES.len() as u64) as usize;
                let (w, h) = extent(shape);
                let x = draws.below((self.resolution - w * self.block + 1) as u64) as usize;
                let y = draws.below((self.resolution - h * self.block + 1) as u64) as usize;
                let piece = Piece {
                    shape,
                    colour,
                    x,
                    y,
                };
                if self.fits(&pieces, &piece) {
                    placed = Some(piece);
                    break;
                }
            }
            if placed.is_none() {
                if !last {
                    return None;
                }
                let first = draws.below(SHAPES.len() as u64) as usize;
                placed = (0..SHAPES.len())
                    .find_map(|k| self.first_fit(&pieces, (first + k) % SHAPES.len(), colour));
            }
            pieces.extend(placed);
        }
        Some(pieces)
    }

    fn first_fit(&self, pieces: &[Piece], shape: usize, colour: usize) -> Option<Piece> {
        let (w, h) = extent(shape);
        (0..=self.resolution - h * self.block)
            .flat_map(|y| {
                (0..=self.resolution - w * self.block).map(move |x| Piece {
                    shape,
                    colour,
                    x,
                    y,
                })
            })
            .find(|piece| self.fits(pieces, piece))
    }

    /// Whether `piece` overlaps none of `pieces` (pieces already lie inside the image).
    fn fits(&self, pieces: &[Piece], piece: &Piece) -> bool {
        let b = self.block;
        let cells =
            |p: &Piece| SHAPES[p.shape].map(|(r, c)| (p.x + c as usize * b, p.y + r as usize * b));
        let new = cells(piece);
        pieces.iter().all(|other| {
            cells(other).iter().all(|&(ox, oy)| {
                new.iter()
                    .all(|&(nx, ny)| nx + b <= ox || ox + b <= nx || ny + b <= oy || oy + b <= ny)
            })
        })
    }
}

impl Dataset for Tetrominoes {
    fn len(&self) -> usize {
        self.len
    }

    fn resolution(&self) -> usize {
        self.resolution
    }

    fn has_masks(&self) -> bool {
        true
    }

    fn max_entities(&self) -> usize {
        self.objects + 1
    }

    fn get(&self, i: usize, image: &mut [f32], mut mask: Option<&mut [u8]>) {
        check_buffers(self, i, image, mask.as_deref());
        image.fill(-1.0);
        if let Some(mask) = mask.as_deref_mut() {
            mask.fill(0);
        }
        let (res, b) = (self.resolution, self.block);
        for (k, piece) in self.scene(i).iter().enumerate() {
            let colour = PALETTE[piece.colour].map(to_unit);
            for &(r, c) in &SHAPES[piece.shape] {
                let (x0, y0) = (piece.x + c as usize * b, piece.y + r as usize * b);
                for y in y0..y0 + b {
                    let row = y * res;
                    image[(row + x0) * 3..(row + x0 + b) * 3]
                        .chunks_exact_mut(3)
                        .for_each(|px| px.copy_from_slice(&colour));
                    if let Some(mask) = mask.as_deref_mut() {
                        mask[row + x0..row + x0 + b].fill(k as u8 + 1);
                    }
                }
            }
        }
    }

    fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool.as_deref()
    }

    fn describe(&self) -> String {
        format!(
            "tetrominoes (procedural, seed {}, {} split): {} examples, {}x{}, {} pieces of {}px blocks",
            self.seed,
            self.split.name(),
            self.len,
            self.resolution,
            self.resolution,
            self.objects,
            self.block
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::data::Source;

    fn dataset(resolution: usize, objects: usize) -> Tetrominoes {
        let spec = DataSpec {
            num: Some(200),
            max_objects: Some(objects),
            seed: 11,
            ..DataSpec::new(Source::Tetrominoes, Split::Train, resolution)
        };
        Tetrominoes::new(&spec).unwrap()
    }

    /// Normalised cell set of a shape, for comparing shapes up to translation.
    fn normalise(cells: &[(i32, i32)]) -> Vec<(i32, i32)> {
        let r0 = cells.iter().map(|c| c.0).min().unwrap();
        let c0 = cells.iter().map(|c| c.1).min().unwrap();
        let mut out: Vec<_> = cells.iter().map(|&(r, c)| (r - r0, c - c0)).collect();
        out.sort_unstable();
        out
    }

    #[test]
    fn shapes_are_the_19_fixed_tetrominoes() {
        // Generate every rotation of the 7 one-sided tetrominoes and compare with the table.
        let bases: [[(i32, i32); 4]; 7] = [
            [(0, 0), (0, 1), (0, 2), (0, 3)],
            [(0, 0), (0, 1), (1, 0), (1, 1)],
            [(0, 0), (0, 1), (0, 2), (1, 1)],
            [(0, 1), (0, 2), (1, 0), (1, 1)],
            [(0, 0), (0, 1), (1, 1), (1, 2)],
            [(0, 0), (1, 0), (1, 1), (1, 2)],
            [(0, 2), (1, 0), (1, 1), (1, 2)],
        ];
        let mut generated = BTreeSet::new();
        for base in bases {
            let mut cells = base.to_vec();
            for _ in 0..4 {
                generated.insert(normalise(&cells));
                cells = cells.iter().map(|&(r, c)| (c, -r)).collect();
            }
        }
        let table: BTreeSet<_> = SHAPES
            .iter()
            .map(|s| normalise(&s.map(|(r, c)| (r as i32, c as i32))))
            .collect();
        assert_eq!(generated.len(), 19);
        assert_eq!(table, generated);
        // Already normalised in the table.
        for s in SHAPES {
            let cells = s.map(|(r, c)| (r as i32, c as i32));
            let mut sorted = cells.to_vec();
            sorted.sort_unstable();
            assert_eq!(normalise(&cells), sorted);
        }
    }

    #[test]
    fn block_is_five_pixels_at_35() {
        assert_eq!(block_size(35), 5);
        assert_eq!(block_size(64), 9);
        assert_eq!(block_size(128), 18);
        assert_eq!(block_size(7), 1);
    }

    #[test]
    fn scenes_have_n_disjoint_palette_pieces_on_black() {
        for (res, objects) in [(35, 3), (20, 2), (64, 4), (35, 6)] {
            let ds = dataset(res, objects);
            let b = ds.block();
            let mut image = vec![0.0; res * res * 3];
            let mut mask = vec![0; res * res];
            let palette: Vec<[f32; 3]> = PALETTE.iter().map(|c| c.map(to_unit)).collect();
            for i in 0..40 {
                ds.get(i, &mut image, Some(&mut mask));
                let mut counts = vec![0usize; objects + 1];
                let mut colours = vec![None; objects + 1];
                for (p, &id) in mask.iter().enumerate() {
                    let rgb = [image[3 * p], image[3 * p + 1], image[3 * p + 2]];
                    counts[id as usize] += 1;
                    if id == 0 {
                        assert_eq!(rgb, [-1.0; 3], "background pixel {p} of example {i}");
                    } else {
                        assert!(palette.contains(&rgb), "colour {rgb:?} not in palette");
                        // One colour per piece.
                        assert_eq!(*colours[id as usize].get_or_insert(rgb), rgb);
                    }
                }
                for (id, &count) in counts.iter().enumerate().skip(1) {
                    assert_eq!(count, 4 * b * b, "res {res}, example {i}, piece {id}");
                }
                assert_eq!(ds.scene(i).len(), objects);
            }
        }
    }

    #[test]
    fn crowded_scenes_place_every_piece_inside_without_overlap() {
        // 6 pieces at 35x35 cover half the image: scenes often start over.
        let ds = dataset(35, 6);
        for i in 0..300 {
            let pieces = ds.scene(i);
            assert_eq!(pieces.len(), 6);
            for (k, p) in pieces.iter().enumerate() {
                assert!(ds.fits(&pieces[..k], p));
                let (w, h) = extent(p.shape);
                assert!(p.x + w * ds.block() <= 35 && p.y + h * ds.block() <= 35);
            }
        }
    }

    #[test]
    fn fallback_scan_finds_the_first_free_spot() {
        let ds = dataset(35, 3);
        assert_eq!(
            ds.first_fit(&[], 0, 1),
            Some(Piece {
                shape: 0,
                colour: 1,
                x: 0,
                y: 0
            })
        );
        // An O at the origin: a horizontal I (20x5 px) first fits right of it, at x = 10.
        let o = Piece {
            shape: 2,
            colour: 0,
            x: 0,
            y: 0,
        };
        assert_eq!(
            ds.first_fit(&[o], 0, 1),
            Some(Piece {
                shape: 0,
                colour: 1,
                x: 10,
                y: 0
            })
        );
        // Vertical I's (5x20 px) at x = 7 and x = 22 leave no 20 px wide gap in rows 0..20, so
        // the first free row for a horizontal I is 20.
        let walls = [
            Piece {
                shape: 1,
                colour: 0,
                x: 7,
                y: 0,
            },
            Piece {
                shape: 1,
                colour: 0,
                x: 22,
                y: 0,
            },
        ];
        assert_eq!(
            ds.first_fit(&walls, 0, 1),
            Some(Piece {
                shape: 0,
                colour: 1,
                x: 0,
                y: 20
            })
        );
    }

    #[test]
    fn impossible_settings_are_errors() {
        let spec = |res, objects| DataSpec {
            max_objects: Some(objects),
            ..DataSpec::new(Source::Tetrominoes, Split::Train, res)
        };
        assert!(Tetrominoes::new(&spec(35, 7)).is_err());
        assert!(Tetrominoes::new(&spec(35, 0)).is_err());
        assert!(Tetrominoes::new(&spec(3, 1)).is_err());
        let err = Tetrominoes::new(&spec(35, 7)).err().unwrap().to_string();
        assert!(err.contains("max_objects = 7"), "{err}");
    }
}
