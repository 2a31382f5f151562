//! Data loader throughput: `load_batch` of 64 images from the generated datasets, and the CLEVR
//! file loader (decode + crop + resize, cache read) on synthetic 320×240 PNGs.
//! `cargo bench --bench loader`.

use slotfix::data::{load_batch, open, DataSpec, Dataset, Source, Split};
use std::time::Instant;

fn images_per_s(ds: &dyn Dataset, batches: usize) -> f64 {
    let n = ds.len();
    load_batch(ds, &(0..64).collect::<Vec<_>>(), true); // warm-up (thread pool start)
    let start = Instant::now();
    for b in 0..batches {
        let idx: Vec<usize> = (0..64).map(|k| (b * 64 + k) % n).collect();
        std::hint::black_box(load_batch(ds, &idx, true));
    }
    (batches * 64) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    println!("rayon threads: {}\n", rayon::current_num_threads());
    println!("| data | resolution | what | images / s |\n| --- | --- | --- | ---: |");
    for (source, res, objects, batches) in [
        (Source::Tetrominoes, 35, None, 200),
        (Source::MultiDsprites, 64, None, 100),
        (Source::MultiDsprites, 128, Some(6), 30),
    ] {
        let spec = DataSpec {
            max_objects: objects,
            ..DataSpec::new(source, Split::Train, res)
        };
        let ds = open(&spec).expect("generated data opens");
        println!(
            "| {} | {res} | load_batch(64), generated on demand | {:.0} |",
            source.name(),
            images_per_s(ds.as_ref(), batches)
        );
    }

    // Synthetic CLEVR-like PNGs (RGBA 320×240, smooth background, blobs, noise: ~130 KB each,
    // like CLEVR v1.0).
    let n = 256;
    let dir = tempfile::tempdir().expect("temp dir");
    let images = dir.path().join("images/train");
    std::fs::create_dir_all(&images).expect("create dir");
    let rng = slotfix::rng::Philox::new(1);
    for k in 0..n {
        let img = image::RgbaImage::from_fn(320, 240, |x, y| {
            let w = rng.words(9, k as u32, (y * 320 + x) as u64);
            let noise = (w[0] % 7) as i32 - 3;
            let (dx, dy) = (x as i32 - 100 - (k % 120), y as i32 - 120);
            let blob = if dx * dx + dy * dy < 900 { 80 } else { 0 };
            let base = 110 + (y as i32 / 8) + blob;
            let c = |o: i32| (base + o + noise).clamp(0, 255) as u8;
            image::Rgba([c(0), c(blob / 2), c(-blob / 3), 255])
        });
        img.save(images.join(format!("CLEVR_train_{k:06}.png")))
            .expect("write png");
    }
    let spec = DataSpec {
        root: Some(dir.path().to_path_buf()),
        cache_dir: Some(dir.path().join("cache")),
        ..DataSpec::new(Source::Clevr, Split::Train, 128)
    };
    let start = Instant::now();
    let ds = open(&spec).expect("CLEVR opens");
    println!("| CLEVR (synthetic PNGs) | 128 | first open: read, decode, crop, resize, cache write | {:.0} |", n as f64 / start.elapsed().as_secs_f64());
    let start = Instant::now();
    let cached = open(&spec).expect("CLEVR opens from cache");
    println!(
        "| CLEVR (synthetic PNGs) | 128 | open from the cache file | {:.0} |",
        n as f64 / start.elapsed().as_secs_f64()
    );
    assert!(cached.describe().contains("cache"), "{}", cached.describe());
    println!(
        "| CLEVR (synthetic PNGs) | 128 | load_batch(64) from memory | {:.0} |",
        images_per_s(ds.as_ref(), 50)
    );
}
