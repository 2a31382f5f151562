//! Datasets for object discovery: two procedural datasets generated on demand (Tetrominoes,
//! Multi-dSprites) and two PNG loaders (CLEVR v1.0 with the official preprocessing, and a plain
//! folder of images with optional masks).
//!
//! Every dataset hands out images as `[H, W, 3]` channels-last `f32` in `[-1, 1]` (`x / 255 * 2 - 1`)
//! and, where it has them, masks as `[H, W]` entity ids with 0 = background.
//!
//! The procedural datasets hold no pixels: example `i` is a pure function of `(seed, split, i)`
//! through [`Philox`] on [`stream::DATA`], so any example can be rendered on any thread, in any
//! order, and always comes out the same. The file datasets decode every PNG once (in parallel) into
//! `u8` memory, optionally through a cache file, and only convert to `f32` in [`Dataset::get`].

mod dsprites;
mod files;
mod tetrominoes;

pub use dsprites::MultiDsprites;
pub use files::FileDataset;
pub use tetrominoes::{Tetrominoes, PALETTE as TETROMINO_PALETTE};

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;

use crate::rng::{stream, Philox};

/// Which part of a dataset to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "test",
        }
    }
}

/// Where the examples come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// Procedural Tetrominoes (no files).
    Tetrominoes,
    /// Procedural Multi-dSprites, coloured sprites on a grey background (no files).
    MultiDsprites,
    /// CLEVR v1.0 PNGs, official preprocessing to 128x128 (see [`FileDataset`]).
    Clevr,
    /// A folder of `images/*.png` with optional `masks/*.png` (see [`FileDataset`]).
    Folder,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Tetrominoes => "tetrominoes",
            Source::MultiDsprites => "multi_dsprites",
            Source::Clevr => "CLEVR",
            Source::Folder => "folder",
        }
    }

    /// Whether the examples are generated rather than read from files.
    pub fn is_embedded(self) -> bool {
        matches!(self, Source::Tetrominoes | Source::MultiDsprites)
    }
}

/// Everything [`open`] needs to build a dataset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSpec {
    pub source: Source,
    /// Root folder of CLEVR / folder data; ignored by the embedded datasets.
    pub root: Option<PathBuf>,
    pub split: Split,
    /// Number of examples. Embedded: default 60 000 (train) / 320 (test). Files: the first `num`
    /// files in name order (all files when `None`, and at most as many as exist).
    pub num: Option<usize>,
    /// Side of the square images the model expects.
    pub resolution: usize,
    /// Embedded only: tetrominoes draws exactly this many (default 3), multi_dsprites
    /// `2..=max_objects` (default 5).
    pub max_objects: Option<usize>,
    /// Generation seed of the embedded data. Train and test use disjoint Philox steps, so the two
    /// splits never share an example.
    pub seed: u64,
    /// Threads for decoding / rendering (0 = rayon's global pool).
    pub num_workers: usize,
    /// Folder where file datasets may keep a decoded cache file.
    pub cache_dir: Option<PathBuf>,
}

impl DataSpec {
    /// A spec with the defaults: no root, default size and object count, seed 0, global pool, no cache.
    pub fn new(source: Source, split: Split, resolution: usize) -> Self {
        Self {
            source,
            root: None,
            split,
            num: None,
            resolution,
            max_objects: None,
            seed: 0,
            num_workers: 0,
            cache_dir: None,
        }
    }
}

/// A dataset could not be opened. The message names the file or folder and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError(pub String);

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// Random access to examples. Implementations are immutable after opening, so `get` may be called
/// from many threads at once.
pub trait Dataset: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn resolution(&self) -> usize;

    fn has_masks(&self) -> bool;

    /// Upper bound on mask ids + 1 (background included); 1 for datasets without masks.
    fn max_entities(&self) -> usize;

    /// Write example i: image `[H,W,3]` channels-last f32 in `[-1,1]`; mask `[H,W]` entity ids
    /// (0 = background) if requested and available (left untouched otherwise).
    ///
    /// Panics if `i >= len()` or a buffer has the wrong length (caller bugs, not bad data).
    fn get(&self, i: usize, image: &mut [f32], mask: Option<&mut [u8]>);

    /// The dedicated thread pool asked for by `num_workers`, if any; [`load_batch`] runs in it.
    fn pool(&self) -> Option<&rayon::ThreadPool> {
        None
    }

    /// One line for logs: what was opened and how.
    fn describe(&self) -> String {
        format!(
            "{} examples, {}x{}, masks: {}",
            self.len(),
            self.resolution(),
            self.resolution(),
            self.has_masks()
        )
    }
}

/// Open the dataset described by `spec`.
pub fn open(spec: &DataSpec) -> Result<Box<dyn Dataset>, DataError> {
    if spec.resolution == 0 {
        return Err(DataError(format!(
            "{}: resolution must be positive",
            spec.source.name()
        )));
    }
    Ok(match spec.source {
        Source::Tetrominoes => Box::new(Tetrominoes::new(spec)?),
        Source::MultiDsprites => Box::new(MultiDsprites::new(spec)?),
        Source::Clevr | Source::Folder => Box::new(FileDataset::open(spec)?),
    })
}

/// A batch of examples, images `[batch, H, W, 3]` and masks `[batch, H, W]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    /// Present when masks were asked for and the dataset has them.
    pub masks: Option<Vec<u8>>,
    pub batch: usize,
    pub resolution: usize,
}

/// Gather examples `indices` in parallel (rayon) into one batch. Runs in the dataset's own pool when
/// it has one (`num_workers > 0`), else in the current rayon pool.
pub fn load_batch(ds: &dyn Dataset, indices: &[usize], with_masks: bool) -> Batch {
    let resolution = ds.resolution();
    let pixels = resolution * resolution;
    let mut images = vec![0.0f32; indices.len() * pixels * 3];
    let mut masks = (with_masks && ds.has_masks()).then(|| vec![0u8; indices.len() * pixels]);
    let mut gather = || match masks.as_mut() {
        Some(masks) => images
            .par_chunks_mut(pixels * 3)
            .zip(masks.par_chunks_mut(pixels))
            .zip(indices.par_iter())
            .for_each(|((image, mask), &i)| ds.get(i, image, Some(mask))),
        None => images
            .par_chunks_mut(pixels * 3)
            .zip(indices.par_iter())
            .for_each(|(image, &i)| ds.get(i, image, None)),
    };
    match ds.pool() {
        Some(pool) => pool.install(gather),
        None => gather(),
    }
    Batch {
        images,
        masks,
        batch: indices.len(),
        resolution,
    }
}

/// A deterministic epoch permutation of `0..n` from `(seed, epoch)`: Fisher-Yates driven by
/// Philox on [`stream::SHUFFLE`] with step = epoch and index = position.
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let rng = Philox::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(stream::SHUFFLE, epoch, i as u64, i as u64 + 1) as usize;
        order.swap(i, j);
    }
    order
}

/// `u8` -> `[-1, 1]` as `x / 255 * 2 - 1`, so 0 and 255 map to exactly -1 and 1.
const UNIT: [f32; 256] = {
    let mut table = [0.0f32; 256];
    let mut v = 0;
    while v < 256 {
        table[v] = v as f32 / 255.0 * 2.0 - 1.0;
        v += 1;
    }
    table
};

/// Pixel value `v` (0..=255) in the model's `[-1, 1]` range.
#[inline]
pub fn to_unit(v: u8) -> f32 {
    UNIT[v as usize]
}

/// The Philox step of example `index` of `split`. The test split lives in the upper half of the
/// step range, so train and test never draw the same numbers.
fn example_step(split: Split, index: usize) -> u32 {
    let offset = match split {
        Split::Train => 0,
        Split::Test => TEST_STEP_OFFSET,
    };
    offset + index as u32
}

const TEST_STEP_OFFSET: u32 = 0x8000_0000;

/// Examples of one split must fit below [`TEST_STEP_OFFSET`].
const MAX_EMBEDDED_EXAMPLES: usize = TEST_STEP_OFFSET as usize;

/// Sequential random draws for one example: Philox on `stream::DATA` at the example's step, with
/// the index counting draws, so the sequence depends on nothing but (seed, split, example).
struct Draws {
    rng: Philox,
    step: u32,
    next: u64,
}

impl Draws {
    fn new(seed: u64, split: Split, index: usize) -> Self {
        Self {
            rng: Philox::new(seed),
            step: example_step(split, index),
            next: 0,
        }
    }

    /// Uniform integer in `[0, n)`.
    fn below(&mut self, n: u64) -> u64 {
        self.next += 1;
        self.rng.below(stream::DATA, self.step, self.next - 1, n)
    }

    /// Uniform in `[0, 1)`.
    fn uniform(&mut self) -> f64 {
        self.next += 1;
        self.rng.uniform(stream::DATA, self.step, self.next - 1)
    }
}

/// Number of examples of an embedded dataset, with the defaults of the brief.
fn embedded_len(spec: &DataSpec) -> Result<usize, DataError> {
    let len = spec.num.unwrap_or(match spec.split {
        Split::Train => 60_000,
        Split::Test => 320,
    });
    if len == 0 || len > MAX_EMBEDDED_EXAMPLES {
        return Err(DataError(format!(
            "{}: num = {len} examples; expected 1..={MAX_EMBEDDED_EXAMPLES}",
            spec.source.name()
        )));
    }
    Ok(len)
}

/// The dedicated pool for `num_workers > 0` (None = use the current / global pool).
fn make_pool(num_workers: usize) -> Result<Option<Arc<rayon::ThreadPool>>, DataError> {
    if num_workers == 0 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(num_workers)
        .thread_name(|i| format!("slotfix-data-{i}"))
        .build()
        .map(|pool| Some(Arc::new(pool)))
        .map_err(|e| {
            DataError(format!(
                "cannot start {num_workers} data worker threads: {e}"
            ))
        })
}

/// Length checks shared by every `get`.
fn check_buffers(ds: &dyn Dataset, i: usize, image: &[f32], mask: Option<&[u8]>) {
    let pixels = ds.resolution() * ds.resolution();
    assert!(
        i < ds.len(),
        "example {i} out of range (dataset has {})",
        ds.len()
    );
    assert_eq!(
        image.len(),
        pixels * 3,
        "image buffer must hold H*W*3 values"
    );
    if let Some(mask) = mask {
        assert_eq!(mask.len(), pixels, "mask buffer must hold H*W values");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(ds: &dyn Dataset, i: usize) -> (Vec<f32>, Vec<u8>) {
        let r = ds.resolution();
        let mut image = vec![0.0; r * r * 3];
        let mut mask = vec![0; r * r];
        ds.get(i, &mut image, Some(&mut mask));
        (image, mask)
    }

    fn spec(source: Source, split: Split, resolution: usize, seed: u64) -> DataSpec {
        DataSpec {
            seed,
            num: Some(50),
            ..DataSpec::new(source, split, resolution)
        }
    }

    #[test]
    fn embedded_datasets_are_deterministic_and_splits_differ() {
        for (source, res) in [(Source::Tetrominoes, 35), (Source::MultiDsprites, 64)] {
            let train = open(&spec(source, Split::Train, res, 7)).unwrap();
            let train_again = open(&spec(source, Split::Train, res, 7)).unwrap();
            let test = open(&spec(source, Split::Test, res, 7)).unwrap();
            let other_seed = open(&spec(source, Split::Train, res, 8)).unwrap();
            for i in [0, 1, 17] {
                let a = render(train.as_ref(), i);
                assert_eq!(a, render(train_again.as_ref(), i), "{source:?} {i}");
                assert_eq!(a, render(train.as_ref(), i), "{source:?} {i} (repeat)");
                assert_ne!(
                    a,
                    render(train.as_ref(), i + 1),
                    "{source:?} {i} vs {}",
                    i + 1
                );
                assert_ne!(a, render(test.as_ref(), i), "{source:?} train vs test {i}");
                assert_ne!(
                    a,
                    render(other_seed.as_ref(), i),
                    "{source:?} seed 7 vs 8, {i}"
                );
            }
        }
    }

    #[test]
    fn embedded_defaults_and_validation() {
        let ds = open(&DataSpec::new(Source::Tetrominoes, Split::Train, 35)).unwrap();
        assert_eq!(
            (ds.len(), ds.max_entities(), ds.has_masks()),
            (60_000, 4, true)
        );
        let ds = open(&DataSpec::new(Source::MultiDsprites, Split::Test, 64)).unwrap();
        assert_eq!((ds.len(), ds.max_entities()), (320, 6));
        let zero = DataSpec {
            num: Some(0),
            ..DataSpec::new(Source::Tetrominoes, Split::Train, 35)
        };
        assert!(open(&zero).is_err());
        assert!(open(&DataSpec::new(Source::MultiDsprites, Split::Train, 0)).is_err());
    }

    #[test]
    fn load_batch_matches_get() {
        for workers in [0, 2] {
            let spec = DataSpec {
                num_workers: workers,
                ..spec(Source::MultiDsprites, Split::Train, 32, 3)
            };
            let ds = open(&spec).unwrap();
            let indices = [4, 0, 9];
            let batch = load_batch(ds.as_ref(), &indices, true);
            assert_eq!((batch.batch, batch.resolution), (3, 32));
            let masks = batch.masks.as_ref().unwrap();
            for (k, &i) in indices.iter().enumerate() {
                let (image, mask) = render(ds.as_ref(), i);
                assert_eq!(
                    &batch.images[k * 32 * 32 * 3..(k + 1) * 32 * 32 * 3],
                    &image[..]
                );
                assert_eq!(&masks[k * 32 * 32..(k + 1) * 32 * 32], &mask[..]);
            }
            assert!(load_batch(ds.as_ref(), &indices, false).masks.is_none());
        }
    }

    #[test]
    fn epoch_order_is_a_deterministic_permutation() {
        for n in [0, 1, 2, 10, 1000] {
            let order = epoch_order(n, 5, 3);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>());
            assert_eq!(order, epoch_order(n, 5, 3));
        }
        assert_ne!(epoch_order(1000, 5, 3), epoch_order(1000, 5, 4));
        assert_ne!(epoch_order(1000, 5, 3), epoch_order(1000, 6, 3));
        assert_ne!(epoch_order(1000, 5, 3), (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn unit_scale_endpoints() {
        assert_eq!(to_unit(0), -1.0);
        assert_eq!(to_unit(255), 1.0);
        assert!((to_unit(128) - (128.0 / 255.0 * 2.0 - 1.0)).abs() < 1e-7);
    }
}
