//! PNG datasets, decoded once into memory.
//!
//! **CLEVR** (`Source::Clevr`): CLEVR v1.0 images, looked up in this order:
//! `root/images/{train,val}/*.png`, `root/{train,val}/*.png`, then `root/*.png` (a plain folder of
//! PNGs, used for both splits, only when `root` has no `images`, `train` or `val` subfolder).
//! Train reads `train`, Test reads `val`. Preprocessing follows the
//! official Slot Attention code: RGB (alpha dropped), crop rows 29..221 and columns 64..256 of the
//! 320x240 image, resize the 192x192 crop to 128x128, scale to [-1, 1] and clip. The resize is
//! the official `tf.image.resize` bilinear (half-pixel centres, no antialiasing) computed in f32;
//! the result is stored rounded to u8 (at most 1/510 off). Other resolutions are refused.
//! No masks.
//!
//! **Folder** (`Source::Folder`): `root/images/*.png`, every image exactly `resolution` square, and
//! optionally `root/masks/<same file name>` (8-bit grayscale, or 8-bit RGB/RGBA whose first channel
//! is the entity id; 0 = background). When both `root/train` and `root/test` exist, each split reads
//! its own subfolder (`root/train/images`, `root/test/masks`, ...); otherwise both splits read the
//! whole of `root`. When a masks folder exists every image must have a mask.
//!
//! Files are sorted by name and the first `num` are used (all when `None`). Decoding runs once, in
//! parallel (a dedicated pool of `num_workers` threads, or rayon's global pool for 0), into `u8`
//! memory. With a `cache_dir`, the decoded bytes are also written to a raw cache file (header:
//! magic, version, n, resolution, mask flag, max entity count, and a hash of the preprocessing,
//! the file names, sizes and modification times); a later open with unchanged files reads it back
//! instead of decoding. The cache is written to a temporary file and renamed into place, so an
//! interrupted run never leaves a truncated cache behind.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use image::imageops;
use image::{DynamicImage, ImageFormat};
use rayon::prelude::*;

use super::{check_buffers, make_pool, to_unit, DataError, DataSpec, Dataset, Source, Split};

/// CLEVR v1.0 image size and the official crop and output size.
const CLEVR_WIDTH: u32 = 320;
const CLEVR_HEIGHT: u32 = 240;
const CLEVR_CROP_TOP: u32 = 29;
const CLEVR_CROP_LEFT: u32 = 64;
const CLEVR_CROP: u32 = 192;
const CLEVR_RESOLUTION: usize = 128;

const CACHE_MAGIC: [u8; 8] = *b"SLFXDATA";
/// Bump whenever the preprocessing or the file layout changes, so old caches are ignored.
const CACHE_VERSION: u32 = 1;
const CACHE_HEADER_LEN: usize = 48;

/// Images (and masks) decoded from PNG files and held in memory as `u8`.
pub struct FileDataset {
    source: Source,
    image_dir: PathBuf,
    resolution: usize,
    len: usize,
    /// `[n, H, W, 3]`.
    images: Vec<u8>,
    /// `[n, H, W]` entity ids.
    masks: Option<Vec<u8>>,
    max_entities: usize,
    from_cache: bool,
    /// How the data was loaded, for [`Dataset::describe`].
    note: String,
    pool: Option<Arc<rayon::ThreadPool>>,
}

/// The files one split reads.
struct Listing {
    image_dir: PathBuf,
    images: Vec<PathBuf>,
    /// Same length as `images` when the dataset has masks.
    masks: Option<Vec<PathBuf>>,
}

impl FileDataset {
    /// List, decode (or read the cache) and keep everything in memory.
    pub fn open(spec: &DataSpec) -> Result<Self, DataError> {
        let source = spec.source;
        if !matches!(source, Source::Clevr | Source::Folder) {
            return Err(DataError(format!(
                "{} is not a file dataset",
                source.name()
            )));
        }
        if source == Source::Clevr && spec.resolution != CLEVR_RESOLUTION {
            return Err(DataError(format!(
                "CLEVR: resolution {} requested, but the official preprocessing produces \
                 {CLEVR_RESOLUTION}x{CLEVR_RESOLUTION}; set resolution to {CLEVR_RESOLUTION}",
                spec.resolution
            )));
        }
        if spec.resolution == 0 || spec.resolution > u32::MAX as usize {
            return Err(DataError(format!(
                "{}: invalid resolution {}",
                source.name(),
                spec.resolution
            )));
        }
        if spec.num == Some(0) {
            return Err(DataError(format!(
                "{}: num = 0; expected at least one example",
                source.name()
            )));
        }
        let root = spec.root.as_deref().ok_or_else(|| {
            DataError(format!(
                "{} data needs a root folder (data_root), but none was given",
                source.name()
            ))
        })?;
        let listing = match source {
            Source::Clevr => list_clevr(root, spec.split, spec.num, spec.max_objects)?,
            _ => list_folder(root, spec.split, spec.num)?,
        };
        let resolution = spec.resolution;
        if source == Source::Folder {
            check_first_size(&listing, resolution)?;
        }
        let pool = make_pool(spec.num_workers)?;
        let hash = content_hash(source, resolution, &listing)?;
        let cache_path = spec
            .cache_dir
            .as_deref()
            .map(|dir| cache_file(dir, source, spec.split, resolution, &listing));

        if let Some(path) = &cache_path {
            if let Some(cached) = read_cache(
                path,
                listing.images.len(),
                resolution,
                listing.masks.is_some(),
                hash,
            ) {
                return Ok(Self {
                    source,
                    image_dir: listing.image_dir,
                    resolution,
                    len: listing.images.len(),
                    images: cached.images,
                    masks: cached.masks,
                    max_entities: cached.max_entities,
                    from_cache: true,
                    note: format!("read from cache {}", path.display()),
                    pool,
                });
            }
        }

        let start = Instant::now();
        let decode = || decode_all(source, resolution, &listing);
        let (images, masks) = match &pool {
            Some(pool) => pool.install(decode),
            None => decode(),
        }?;
        let max_entities = masks
            .as_ref()
            .map_or(1, |m| m.iter().copied().max().unwrap_or(0) as usize + 1);
        let mut note = format!("decoded in {:.1} s", start.elapsed().as_secs_f64());
        if let Some(path) = &cache_path {
            match write_cache(
                path,
                resolution,
                &images,
                masks.as_deref(),
                max_entities,
                hash,
            ) {
                Ok(()) => note.push_str(&format!(", cached to {}", path.display())),
                // A cache is an optimisation: failing to write one must not stop training.
                Err(e) => note.push_str(&format!(", cache not written: {e}")),
            }
        }
        Ok(Self {
            source,
            image_dir: listing.image_dir,
            resolution,
            len: listing.images.len(),
            images,
            masks,
            max_entities,
            from_cache: false,
            note,
            pool,
        })
    }

    /// Whether this dataset was read from the cache file instead of being decoded.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// The folder the images were listed from.
    pub fn image_dir(&self) -> &Path {
        &self.image_dir
    }

    /// The preprocessed pixels of example `i`, `[H, W, 3]` `u8`.
    pub fn image_u8(&self, i: usize) -> &[u8] {
        let size = self.resolution * self.resolution * 3;
        &self.images[i * size..(i + 1) * size]
    }
}

impl Dataset for FileDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn resolution(&self) -> usize {
        self.resolution
    }

    fn has_masks(&self) -> bool {
        self.masks.is_some()
    }

    fn max_entities(&self) -> usize {
        self.max_entities
    }

    fn get(&self, i: usize, image: &mut [f32], mask: Option<&mut [u8]>) {
        check_buffers(self, i, image, mask.as_deref());
        // to_unit maps 0..=255 into [-1, 1] exactly, so the official clip is implicit.
        for (out, &v) in image.iter_mut().zip(self.image_u8(i)) {
            *out = to_unit(v);
        }
        if let (Some(out), Some(masks)) = (mask, &self.masks) {
            let pixels = self.resolution * self.resolution;
            out.copy_from_slice(&masks[i * pixels..(i + 1) * pixels]);
        }
    }

    fn pool(&self) -> Option<&rayon::ThreadPool> {
        self.pool.as_deref()
    }

    fn describe(&self) -> String {
        format!(
            "{} {}: {} images, {}x{}, masks: {} ({})",
            self.source.name(),
            self.image_dir.display(),
            self.len,
            self.resolution,
            self.resolution,
            self.has_masks(),
            self.note
        )
    }
}

/// Sorted `*.png` files of `dir` (case-insensitive extension); an error if there is none.
fn list_pngs(dir: &Path, what: &str) -> Result<Vec<PathBuf>, DataError> {
    let entries = fs::read_dir(dir)
        .map_err(|e| DataError(format!("{what}: cannot read folder {}: {e}", dir.display())))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry
            .map_err(|e| DataError(format!("{what}: cannot read folder {}: {e}", dir.display())))?;
        let path = entry.path();
        let is_png = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("png"));
        if is_png && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(DataError(format!(
            "{what}: no .png files found in {}",
            dir.display()
        )));
    }
    files.sort();
    Ok(files)
}

fn truncate(mut files: Vec<PathBuf>, num: Option<usize>) -> Vec<PathBuf> {
    if let Some(n) = num {
        files.truncate(n);
    }
    files
}

/// Object counts per image file name from CLEVR's `scenes/CLEVR_<split>_scenes.json`.
fn clevr_object_counts(
    root: &Path,
    sub: &str,
) -> Result<std::collections::HashMap<String, usize>, DataError> {
    #[derive(serde::Deserialize)]
    struct Scene {
        image_filename: String,
        objects: Vec<serde::de::IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Scenes {
        scenes: Vec<Scene>,
    }
    let path = root.join("scenes").join(format!("CLEVR_{sub}_scenes.json"));
    let file = std::fs::File::open(&path).map_err(|e| {
        DataError(format!(
            "CLEVR: max_objects needs the scene descriptions {} to count objects: {e}",
            path.display()
        ))
    })?;
    let scenes: Scenes = serde_json::from_reader(std::io::BufReader::new(file))
        .map_err(|e| DataError(format!("CLEVR: {}: {e}", path.display())))?;
    Ok(scenes
        .scenes
        .into_iter()
        .map(|s| (s.image_filename, s.objects.len()))
        .collect())
}

/// CLEVR images of `split`; with `max_objects`, only scenes with at most that many objects
/// (CLEVR6 = 6), counted from the scene descriptions.
fn list_clevr(
    root: &Path,
    split: Split,
    num: Option<usize>,
    max_objects: Option<usize>,
) -> Result<Listing, DataError> {
    let sub = match split {
        Split::Train => "train",
        Split::Test => "val",
    };
    if !root.is_dir() {
        return Err(DataError(format!(
            "CLEVR: folder {} not found (expected the CLEVR v1.0 root with images/{{train,val}}/*.png)",
            root.display()
        )));
    }
    let candidates = [root.join("images").join(sub), root.join(sub)];
    let has_split_layout = ["images", "train", "val"]
        .iter()
        .any(|d| root.join(d).is_dir());
    let image_dir = match candidates.iter().find(|dir| dir.is_dir()) {
        Some(dir) => dir.clone(),
        // A CLEVR tree without this split is an error, not a reason to read the root itself.
        None if has_split_layout => {
            return Err(DataError(format!(
                "CLEVR: folder {} not found (the {} split reads images/{sub}/*.png)",
                candidates[0].display(),
                split.name()
            )))
        }
        // No split folders: accept a plain folder of PNGs.
        None => root.to_path_buf(),
    };
    let mut images = list_pngs(&image_dir, "CLEVR").map_err(|e| {
        DataError(format!(
            "{e} (expected CLEVR v1.0 PNGs in {}/images/{sub}/ or a folder of PNGs)",
            root.display()
        ))
    })?;
    if let Some(max) = max_objects {
        let counts = clevr_object_counts(root, sub)?;
        images.retain(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            counts.get(name).is_some_and(|&c| c <= max)
        });
        if images.is_empty() {
            return Err(DataError(format!(
                "CLEVR: no scene of the {} split has at most {max} objects",
                split.name()
            )));
        }
    }
    Ok(Listing {
        image_dir,
        images: truncate(images, num),
        masks: None,
    })
}

fn list_folder(root: &Path, split: Split, num: Option<usize>) -> Result<Listing, DataError> {
    if !root.is_dir() {
        return Err(DataError(format!(
            "folder: {} not found (expected images/*.png and optionally masks/*.png inside)",
            root.display()
        )));
    }
    let (train, test) = (root.join("train"), root.join("test"));
    let base = if train.is_dir() && test.is_dir() {
        match split {
            Split::Train => train,
            Split::Test => test,
        }
    } else {
        root.to_path_buf()
    };
    let image_dir = base.join("images");
    if !image_dir.is_dir() {
        return Err(DataError(format!(
            "folder: {} not found (expected a folder of .png images)",
            image_dir.display()
        )));
    }
    let images = truncate(list_pngs(&image_dir, "folder")?, num);
    let mask_dir = base.join("masks");
    let masks = if mask_dir.is_dir() {
        let masks: Vec<PathBuf> = images
            .iter()
            .filter_map(|p| p.file_name())
            .map(|name| mask_dir.join(name))
            .collect();
        if let Some(missing) = masks.iter().find(|m| !m.is_file()) {
            return Err(DataError(format!(
                "folder: mask {} not found (every image needs a mask of the same name once {} exists)",
                missing.display(),
                mask_dir.display()
            )));
        }
        Some(masks)
    } else {
        None
    };
    Ok(Listing {
        image_dir,
        images,
        masks,
    })
}

/// FNV-1a, 64 bit: stable across Rust versions and platforms, unlike `DefaultHasher`.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }
}

/// Hash of everything the decoded bytes depend on: preprocessing, and every file's name, size and
/// modification time.
fn content_hash(source: Source, resolution: usize, listing: &Listing) -> Result<u64, DataError> {
    let mut h = Fnv::new();
    h.u64(CACHE_VERSION as u64)
        .str(source.name())
        .u64(resolution as u64);
    let masks = listing.masks.iter().flatten();
    h.u64(listing.images.len() as u64)
        .u64(listing.masks.is_some() as u64);
    for path in listing.images.iter().chain(masks) {
        let meta = fs::metadata(path)
            .map_err(|e| DataError(format!("cannot read {}: {e}", path.display())))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        h.str(&path.file_name().unwrap_or_default().to_string_lossy())
            .u64(meta.len())
            .u64(mtime as u64)
            .u64((mtime >> 64) as u64);
    }
    Ok(h.0)
}

/// One cache file per (source, folder, split, resolution): a changed folder overwrites its own
/// cache instead of piling up new ones.
fn cache_file(
    dir: &Path,
    source: Source,
    split: Split,
    resolution: usize,
    listing: &Listing,
) -> PathBuf {
    let folder = fs::canonicalize(&listing.image_dir).unwrap_or_else(|_| listing.image_dir.clone());
    let mut h = Fnv::new();
    h.str(&folder.to_string_lossy()).u64(resolution as u64);
    let tag = source.name().to_ascii_lowercase();
    dir.join(format!(
        "slotfix-{tag}-{}-{resolution}-{:016x}.bin",
        split.name(),
        h.0
    ))
}

fn decode_all(
    source: Source,
    resolution: usize,
    listing: &Listing,
) -> Result<(Vec<u8>, Option<Vec<u8>>), DataError> {
    let pixels = resolution * resolution;
    let mut images = vec![0u8; listing.images.len() * pixels * 3];
    // Decoding tens of thousands of PNGs takes a while: show progress (hidden when stderr is not
    // a terminal).
    let pb = indicatif::ProgressBar::new(listing.images.len() as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template("decoding {pos}/{len} images [{bar:30}] ETA {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    images
        .par_chunks_mut(pixels * 3)
        .zip(listing.images.par_iter())
        .try_for_each(|(out, path)| {
            let image = read_png(path)?;
            pb.inc(1);
            match source {
                Source::Clevr => clevr_preprocess(path, image, out),
                _ => folder_image(path, image, resolution, out),
            }
        })?;
    pb.finish_and_clear();
    let masks = match &listing.masks {
        None => None,
        Some(paths) => {
            let mut masks = vec![0u8; paths.len() * pixels];
            masks
                .par_chunks_mut(pixels)
                .zip(paths.par_iter())
                .try_for_each(|(out, path)| folder_mask(path, read_png(path)?, resolution, out))?;
            Some(masks)
        }
    };
    Ok((images, masks))
}

fn read_png(path: &Path) -> Result<DynamicImage, DataError> {
    let bytes =
        fs::read(path).map_err(|e| DataError(format!("cannot read {}: {e}", path.display())))?;
    image::load_from_memory_with_format(&bytes, ImageFormat::Png)
        .map_err(|e| DataError(format!("{}: not a readable PNG: {e}", path.display())))
}

/// The official CLEVR preprocessing into `out` (`[128, 128, 3]`).
fn clevr_preprocess(path: &Path, image: DynamicImage, out: &mut [u8]) -> Result<(), DataError> {
    let (w, h) = (image.width(), image.height());
    if (w, h) != (CLEVR_WIDTH, CLEVR_HEIGHT) {
        return Err(DataError(format!(
            "{}: image is {w}x{h}, expected {CLEVR_WIDTH}x{CLEVR_HEIGHT} (CLEVR v1.0)",
            path.display()
        )));
    }
    let rgb = image.into_rgb8();
    let crop = imageops::crop_imm(
        &rgb,
        CLEVR_CROP_LEFT,
        CLEVR_CROP_TOP,
        CLEVR_CROP,
        CLEVR_CROP,
    )
    .to_image();
    resize_bilinear(&crop, CLEVR_RESOLUTION, out);
    Ok(())
}

/// The official resize: `tf.image.resize(..., method="bilinear")` (half-pixel centres, no
/// antialiasing), computed in f32 and rounded to 8 bits for storage (at most 1/510 away from the
/// float result in [0, 1] units).
fn resize_bilinear(src: &image::RgbImage, size: usize, out: &mut [u8]) {
    let (w, h) = (src.width() as usize, src.height() as usize);
    // For each output coordinate: (lower index, upper index, weight of the upper one).
    let taps = |n_in: usize| -> Vec<(usize, usize, f32)> {
        let scale = n_in as f32 / size as f32;
        (0..size)
            .map(|o| {
                let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                let lo = (x.floor() as usize).min(n_in - 1);
                let hi = (lo + 1).min(n_in - 1);
                (lo, hi, x - lo as f32)
            })
            .collect()
    };
    let (xs, ys) = (taps(w), taps(h));
    let raw = src.as_raw();
    let at = |x: usize, y: usize, c: usize| raw[(y * w + x) * 3 + c] as f32;
    for (oy, &(y0, y1, fy)) in ys.iter().enumerate() {
        for (ox, &(x0, x1, fx)) in xs.iter().enumerate() {
            for c in 0..3 {
                let top = at(x0, y0, c) + (at(x1, y0, c) - at(x0, y0, c)) * fx;
                let bottom = at(x0, y1, c) + (at(x1, y1, c) - at(x0, y1, c)) * fx;
                let v = top + (bottom - top) * fy;
                out[(oy * size + ox) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

fn folder_image(
    path: &Path,
    image: DynamicImage,
    resolution: usize,
    out: &mut [u8],
) -> Result<(), DataError> {
    check_size(path, (image.width(), image.height()), resolution, "image")?;
    out.copy_from_slice(image.into_rgb8().as_raw());
    Ok(())
}

fn folder_mask(
    path: &Path,
    image: DynamicImage,
    resolution: usize,
    out: &mut [u8],
) -> Result<(), DataError> {
    check_size(path, (image.width(), image.height()), resolution, "mask")?;
    // Ids are raw 8-bit values: take them as stored instead of converting colours.
    let (raw, channels) = match &image {
        DynamicImage::ImageLuma8(m) => (m.as_raw(), 1),
        DynamicImage::ImageLumaA8(m) => (m.as_raw(), 2),
        DynamicImage::ImageRgb8(m) => (m.as_raw(), 3),
        DynamicImage::ImageRgba8(m) => (m.as_raw(), 4),
        other => {
            return Err(DataError(format!(
                "{}: mask has pixel type {:?}; expected 8-bit grayscale (or 8-bit RGB/RGBA with the id \
                 in the first channel)",
                path.display(),
                other.color()
            )))
        }
    };
    for (o, px) in out.iter_mut().zip(raw.chunks_exact(channels)) {
        *o = px[0];
    }
    Ok(())
}

/// Refuse a wrong resolution from the first image's header, before allocating memory for all of
/// them. Unreadable headers are left to the full decode, which names the problem.
fn check_first_size(listing: &Listing, resolution: usize) -> Result<(), DataError> {
    let Some(first) = listing.images.first() else {
        return Ok(());
    };
    let size = image::ImageReader::open(first).ok().and_then(|mut reader| {
        reader.set_format(ImageFormat::Png);
        reader.into_dimensions().ok()
    });
    match size {
        Some(size) => check_size(first, size, resolution, "image"),
        None => Ok(()),
    }
}

fn check_size(
    path: &Path,
    (w, h): (u32, u32),
    resolution: usize,
    what: &str,
) -> Result<(), DataError> {
    let (w, h) = (w as usize, h as usize);
    if (w, h) != (resolution, resolution) {
        return Err(DataError(format!(
            "{}: {what} is {w}x{h}, expected {resolution}x{resolution} (the configured resolution)",
            path.display()
        )));
    }
    Ok(())
}

struct Cached {
    images: Vec<u8>,
    masks: Option<Vec<u8>>,
    max_entities: usize,
}

fn cache_header(
    n: usize,
    resolution: usize,
    has_masks: bool,
    max_entities: usize,
    hash: u64,
) -> [u8; CACHE_HEADER_LEN] {
    let mut header = [0u8; CACHE_HEADER_LEN];
    header[0..8].copy_from_slice(&CACHE_MAGIC);
    header[8..12].copy_from_slice(&CACHE_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(has_masks as u32).to_le_bytes());
    header[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    header[24..32].copy_from_slice(&(resolution as u64).to_le_bytes());
    header[32..40].copy_from_slice(&(max_entities as u64).to_le_bytes());
    header[40..48].copy_from_slice(&hash.to_le_bytes());
    header
}

/// The cached data if `path` holds a complete cache for exactly these files; None otherwise
/// (missing, stale, truncated or foreign files are all just a cache miss).
fn read_cache(
    path: &Path,
    n: usize,
    resolution: usize,
    has_masks: bool,
    hash: u64,
) -> Option<Cached> {
    let mut file = File::open(path).ok()?;
    let mut header = [0u8; CACHE_HEADER_LEN];
    file.read_exact(&mut header).ok()?;
    let word = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or_default());
    let max_entities = word(32) as usize;
    if header != cache_header(n, resolution, has_masks, max_entities, hash)
        || !(1..=256).contains(&max_entities)
    {
        return None;
    }
    let pixels = n * resolution * resolution;
    let expected = CACHE_HEADER_LEN + pixels * 3 + if has_masks { pixels } else { 0 };
    if file.metadata().ok()?.len() != expected as u64 {
        return None;
    }
    let mut images = vec![0u8; pixels * 3];
    file.read_exact(&mut images).ok()?;
    let masks = if has_masks {
        let mut masks = vec![0u8; pixels];
        file.read_exact(&mut masks).ok()?;
        Some(masks)
    } else {
        None
    };
    Some(Cached {
        images,
        masks,
        max_entities,
    })
}

/// Write the cache to a temporary file next to `path`, then rename it into place.
fn write_cache(
    path: &Path,
    resolution: usize,
    images: &[u8],
    masks: Option<&[u8]>,
    max_entities: usize,
    hash: u64,
) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let n = images.len() / (resolution * resolution * 3);
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp_name);
    let result = (|| {
        let mut out = BufWriter::new(File::create(&tmp)?);
        out.write_all(&cache_header(
            n,
            resolution,
            masks.is_some(),
            max_entities,
            hash,
        ))?;
        out.write_all(images)?;
        if let Some(masks) = masks {
            out.write_all(masks)?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};

    use super::*;
    use crate::data::open;

    fn clevr_spec(root: &Path, split: Split) -> DataSpec {
        DataSpec {
            root: Some(root.to_path_buf()),
            ..DataSpec::new(Source::Clevr, split, 128)
        }
    }

    fn folder_spec(root: &Path, resolution: usize) -> DataSpec {
        DataSpec {
            root: Some(root.to_path_buf()),
            ..DataSpec::new(Source::Folder, Split::Train, resolution)
        }
    }

    fn get(ds: &dyn Dataset, i: usize) -> (Vec<f32>, Vec<u8>) {
        let r = ds.resolution();
        let mut image = vec![0.0; r * r * 3];
        let mut mask = vec![0; r * r];
        ds.get(i, &mut image, Some(&mut mask));
        (image, mask)
    }

    fn err_of<T>(r: Result<T, DataError>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.0,
        }
    }

    /// A CLEVR-sized RGBA image: inside the official crop, R = column and G = row within the crop
    /// and B = 0; outside it every channel is 255, so a misplaced crop would leak 255s.
    fn clevr_probe() -> RgbaImage {
        RgbaImage::from_fn(CLEVR_WIDTH, CLEVR_HEIGHT, |x, y| {
            let inside = (64..256).contains(&x) && (29..221).contains(&y);
            if inside {
                Rgba([(x - 64) as u8, (y - 29) as u8, 0, 77])
            } else {
                Rgba([255, 255, 255, 255])
            }
        })
    }

    #[test]
    fn clevr_crop_resize_scale() {
        let dir = tempfile::tempdir().unwrap();
        let train = dir.path().join("images/train");
        fs::create_dir_all(&train).unwrap();
        RgbImage::from_pixel(320, 240, Rgb([200, 10, 99]))
            .save(train.join("CLEVR_train_000001.png"))
            .unwrap();
        clevr_probe()
            .save(train.join("CLEVR_train_000000.png"))
            .unwrap();

        let ds = open(&clevr_spec(dir.path(), Split::Train)).unwrap();
        assert_eq!(
            (ds.len(), ds.resolution(), ds.has_masks(), ds.max_entities()),
            (2, 128, false, 1)
        );

        // Files are sorted by name: the probe comes first.
        let (probe, _) = get(ds.as_ref(), 0);
        let px = |x: usize, y: usize, c: usize| probe[(y * 128 + x) * 3 + c];
        // Nothing from outside the crop leaks in (alpha dropped, B stays 0 everywhere).
        assert!((0..128 * 128).all(|p| probe[p * 3 + 2] == -1.0));
        // By hand: output column 64 samples crop column 64.5 * 1.5 - 0.5 = 96.25, bilinear between
        // columns 96 and 97: 0.75 * 96 + 0.25 * 97 = 96.25 -> 96. Rows work the same way in G.
        for k in 0..128 {
            assert_eq!(px(64, k, 0), 96.0 / 255.0 * 2.0 - 1.0);
            assert_eq!(px(k, 64, 1), 96.0 / 255.0 * 2.0 - 1.0);
        }
        // Column 0: 0.25, between columns 0 and 1: 0.25 -> 0.
        assert_eq!(px(0, 0, 0), -1.0);

        // A constant image keeps its colour exactly.
        let (constant, _) = get(ds.as_ref(), 1);
        let want = [200u8, 10, 99].map(|v| v as f32 / 255.0 * 2.0 - 1.0);
        assert!(constant.chunks_exact(3).all(|p| p == want));
        assert!(constant.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn resize_is_tf_bilinear_without_antialiasing() {
        // Alternating black and white columns, 6 → 4: output column j samples 1.5 j + 0.25.
        let src = RgbImage::from_fn(6, 6, |x, _| Rgb([if x % 2 == 1 { 255 } else { 0 }; 3]));
        let mut out = vec![0u8; 4 * 4 * 3];
        resize_bilinear(&src, 4, &mut out);
        // 0.25·255 = 63.75 → 64 (columns 0|1 and 1|2), 0.75·255 = 191.25 → 191 (3|4 and 4|5).
        // An antialiased (triangle) filter would average the stripes to ~128 everywhere.
        let row: Vec<u8> = out[..12].chunks(3).map(|p| p[0]).collect();
        assert_eq!(row, vec![64, 64, 191, 191]);
        assert!(out.chunks(12).all(|r| r == &out[..12]));
    }

    #[test]
    fn clevr_max_objects_filters_by_scene_descriptions() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("images/train");
        std::fs::create_dir_all(&img).unwrap();
        for name in ["a.png", "b.png", "c.png"] {
            clevr_probe().save(img.join(name)).unwrap();
        }
        let mut spec = clevr_spec(dir.path(), Split::Train);
        spec.max_objects = Some(6);
        let e = err_of(FileDataset::open(&spec));
        assert!(e.contains("CLEVR_train_scenes.json"), "{e}");
        std::fs::create_dir_all(dir.path().join("scenes")).unwrap();
        let objs = |n: usize| vec!["{}"; n].join(",");
        let json = format!(
            r#"{{"info": {{}}, "scenes": [{{"image_filename": "a.png", "objects": [{}]}},
            {{"image_filename": "b.png", "objects": [{}]}}, {{"image_filename": "c.png", "objects": [{}]}}]}}"#,
            objs(3),
            objs(9),
            objs(6)
        );
        std::fs::write(dir.path().join("scenes/CLEVR_train_scenes.json"), json).unwrap();
        let ds = FileDataset::open(&spec).unwrap();
        assert_eq!(
            ds.len(),
            2,
            "a (3 objects) and c (6 objects) are kept, b (9) is not"
        );
        spec.max_objects = Some(2);
        assert!(err_of(FileDataset::open(&spec)).contains("at most 2 objects"));
    }

    #[test]
    fn clevr_layouts_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        // Missing root.
        let missing = dir.path().join("nope");
        assert!(err_of(open(&clevr_spec(&missing, Split::Train))).contains("nope"));
        // Wrong resolution is refused before touching files.
        let spec = DataSpec {
            resolution: 64,
            ..clevr_spec(dir.path(), Split::Train)
        };
        assert!(err_of(open(&spec)).contains("128"));
        // No root.
        assert!(err_of(open(&DataSpec::new(Source::Clevr, Split::Train, 128))).contains("root"));

        // Split folders: train and val are read separately.
        for (sub, value) in [("train", 10u8), ("val", 20)] {
            let d = dir.path().join("images").join(sub);
            fs::create_dir_all(&d).unwrap();
            for k in 0..3 {
                RgbImage::from_pixel(320, 240, Rgb([value + k, 0, 0]))
                    .save(d.join(format!("{k}.png")))
                    .unwrap();
            }
        }
        let test = open(&clevr_spec(dir.path(), Split::Test)).unwrap();
        assert_eq!(test.len(), 3);
        assert_eq!(get(test.as_ref(), 2).0[0], to_unit(22));
        let spec = DataSpec {
            num: Some(2),
            ..clevr_spec(dir.path(), Split::Train)
        };
        let train = open(&spec).unwrap();
        assert_eq!(train.len(), 2);
        assert_eq!(get(train.as_ref(), 1).0[0], to_unit(11));
        // More than available: all of them.
        let spec = DataSpec {
            num: Some(100),
            ..clevr_spec(dir.path(), Split::Train)
        };
        assert_eq!(open(&spec).unwrap().len(), 3);

        // A CLEVR tree without the requested split names the missing folder.
        fs::remove_dir_all(dir.path().join("images/val")).unwrap();
        let e = err_of(open(&clevr_spec(dir.path(), Split::Test)));
        assert!(e.contains("val") && e.contains("not found"), "{e}");
        let plain = dir.path().join("images/val");
        fs::create_dir_all(&plain).unwrap();
        for k in 0..3 {
            RgbImage::from_pixel(320, 240, Rgb([20 + k, 0, 0]))
                .save(plain.join(format!("{k}.png")))
                .unwrap();
        }
        // A plain folder of PNGs.
        assert_eq!(open(&clevr_spec(&plain, Split::Train)).unwrap().len(), 3);

        // Wrong size names the file and its size.
        RgbImage::new(300, 200)
            .save(plain.join("small.png"))
            .unwrap();
        let e = err_of(open(&clevr_spec(dir.path(), Split::Test)));
        assert!(
            e.contains("small.png") && e.contains("300x200") && e.contains("320x240"),
            "{e}"
        );
        fs::remove_file(plain.join("small.png")).unwrap();

        // Corrupt PNG names the file.
        fs::write(plain.join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
        let e = err_of(open(&clevr_spec(dir.path(), Split::Test)));
        assert!(e.contains("broken.png"), "{e}");
        fs::remove_file(plain.join("broken.png")).unwrap();

        // No PNGs names the folder.
        let empty = dir.path().join("empty");
        fs::create_dir_all(&empty).unwrap();
        fs::write(empty.join("notes.txt"), "x").unwrap();
        let e = err_of(open(&clevr_spec(&empty, Split::Train)));
        assert!(e.contains("empty") && e.contains("no .png"), "{e}");
    }

    /// A folder dataset of 12x12 images with masks: image k has colour (k, 2k, 3k) and its mask
    /// holds ids 0..=k+1 in column bands.
    fn write_folder(base: &Path, count: u8) {
        fs::create_dir_all(base.join("images")).unwrap();
        fs::create_dir_all(base.join("masks")).unwrap();
        for k in 0..count {
            let name = format!("img_{k:02}.png");
            RgbImage::from_pixel(12, 12, Rgb([k, 2 * k, 3 * k]))
                .save(base.join("images").join(&name))
                .unwrap();
            GrayImage::from_fn(12, 12, |x, _| Luma([(x as u8) % (k + 2)]))
                .save(base.join("masks").join(&name))
                .unwrap();
        }
    }

    #[test]
    fn folder_masks_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), 3);
        let spec = DataSpec {
            num_workers: 2,
            ..folder_spec(dir.path(), 12)
        };
        let ds = open(&spec).unwrap();
        assert_eq!((ds.len(), ds.has_masks(), ds.max_entities()), (3, true, 4));
        for k in 0..3u8 {
            let (image, mask) = get(ds.as_ref(), k as usize);
            assert!(image
                .chunks_exact(3)
                .all(|p| p == [k, 2 * k, 3 * k].map(to_unit)));
            let want: Vec<u8> = (0..144).map(|p| (p % 12) as u8 % (k + 2)).collect();
            assert_eq!(mask, want);
        }

        // RGBA masks: the id is the first channel.
        RgbaImage::from_pixel(12, 12, Rgba([5, 9, 9, 255]))
            .save(dir.path().join("masks/img_00.png"))
            .unwrap();
        let ds = open(&folder_spec(dir.path(), 12)).unwrap();
        assert!(get(ds.as_ref(), 0).1.iter().all(|&id| id == 5));
        assert_eq!(ds.max_entities(), 6);

        // Without a masks folder there are no masks.
        fs::remove_dir_all(dir.path().join("masks")).unwrap();
        let ds = open(&folder_spec(dir.path(), 12)).unwrap();
        assert!(!ds.has_masks());
        assert_eq!(ds.max_entities(), 1);
    }

    #[test]
    fn folder_splits_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        write_folder(&dir.path().join("train"), 3);
        write_folder(&dir.path().join("test"), 2);
        assert_eq!(open(&folder_spec(dir.path(), 12)).unwrap().len(), 3);
        let test = DataSpec {
            split: Split::Test,
            ..folder_spec(dir.path(), 12)
        };
        assert_eq!(open(&test).unwrap().len(), 2);

        // Wrong image size names the file and both sizes.
        let e = err_of(open(&folder_spec(dir.path(), 16)));
        assert!(
            e.contains("img_00.png") && e.contains("12x12") && e.contains("16x16"),
            "{e}"
        );
        // Wrong mask size.
        GrayImage::new(8, 12)
            .save(dir.path().join("train/masks/img_01.png"))
            .unwrap();
        let e = err_of(open(&folder_spec(dir.path(), 12)));
        assert!(e.contains("img_01.png") && e.contains("8x12"), "{e}");
        // Missing mask.
        fs::remove_file(dir.path().join("train/masks/img_01.png")).unwrap();
        let e = err_of(open(&folder_spec(dir.path(), 12)));
        assert!(e.contains("img_01.png") && e.contains("not found"), "{e}");
        // 16-bit masks are refused rather than silently rescaled.
        image::ImageBuffer::<Luma<u16>, Vec<u16>>::new(12, 12)
            .save(dir.path().join("train/masks/img_01.png"))
            .unwrap();
        let e = err_of(open(&folder_spec(dir.path(), 12)));
        assert!(e.contains("img_01.png") && e.contains("8-bit"), "{e}");
        // Corrupt image.
        fs::write(dir.path().join("train/images/img_02.png"), b"garbage").unwrap();
        let e = err_of(open(&folder_spec(dir.path(), 12)));
        assert!(e.contains("img_02.png") || e.contains("img_01.png"), "{e}");
        // Missing images folder.
        let e = err_of(open(&folder_spec(&dir.path().join("test/images"), 12)));
        assert!(e.contains("images") && e.contains("not found"), "{e}");
        let e = err_of(open(&folder_spec(&dir.path().join("absent"), 12)));
        assert!(e.contains("absent"), "{e}");
    }

    #[test]
    fn cache_is_written_reused_and_invalidated() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cache = dir.path().join("cache");
        write_folder(&data, 4);
        let spec = DataSpec {
            cache_dir: Some(cache.clone()),
            ..folder_spec(&data, 12)
        };

        let first = FileDataset::open(&spec).unwrap();
        assert!(!first.from_cache());
        let files: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(
            files.len(),
            1,
            "one cache file, no temporary left: {files:?}"
        );
        assert_eq!(
            fs::metadata(&files[0]).unwrap().len() as usize,
            CACHE_HEADER_LEN + 4 * 144 * 4
        );

        let second = FileDataset::open(&spec).unwrap();
        assert!(second.from_cache());
        assert!(second.describe().contains("cache"));
        assert_eq!(second.max_entities(), first.max_entities());
        for i in 0..4 {
            assert_eq!(get(&second, i), get(&first, i));
        }

        // A changed file (new content, size and mtime) invalidates the cache.
        let changed = data.join("images/img_02.png");
        RgbImage::from_fn(12, 12, |x, y| Rgb([x as u8 * 20, y as u8 * 20, 7]))
            .save(&changed)
            .unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(&changed)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let third = FileDataset::open(&spec).unwrap();
        assert!(!third.from_cache());
        assert_eq!(third.image_u8(2)[..3], [0, 0, 7]);
        assert!(FileDataset::open(&spec).unwrap().from_cache());

        // A different subset of files is a different cache content too.
        let fewer = DataSpec {
            num: Some(2),
            ..spec.clone()
        };
        assert!(!FileDataset::open(&fewer).unwrap().from_cache());

        // A corrupt cache file is a miss, not an error.
        let files: Vec<_> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        fs::write(&files[0], b"SLFXDATA-truncated").unwrap();
        let again = FileDataset::open(&spec).unwrap();
        assert!(!again.from_cache());
        assert_eq!(get(&again, 0), get(&first, 0));
    }
}
