//! Procedural Multi-dSprites in the style of DeepMind's `colored_on_grayscale` variant: a random
//! grey background and 2..=`max_objects` sprites (square, ellipse, heart) with a uniformly random
//! RGB colour, scale, rotation and position. Later sprites occlude earlier ones; a pixel's mask id is
//! the last sprite covering it, so a fully occluded sprite simply does not appear in the mask.
//! No anti-aliasing: a pixel belongs to a sprite when its centre does.
//!
//! Sizes follow dSprites at 64x64: scale is uniform in [0.5, 1] and a sprite at scale 1 spans about
//! a third of the image (its unit radius is 0.16 of the side), all proportional to the resolution.

use std::f64::consts::TAU;
use std::sync::Arc;

use super::{
    check_buffers, embedded_len, make_pool, to_unit, DataError, DataSpec, Dataset, Draws, Split,
};

/// Unit radius of a sprite at scale 1, as a fraction of the image side.
const RADIUS_AT_SCALE_1: f64 = 0.16;
/// Sprite centres stay in the middle 80% of the image so sprites are mostly visible.
const CENTRE_MARGIN: f64 = 0.1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Square,
    Ellipse,
    Heart,
}

impl Shape {
    const ALL: [Shape; 3] = [Shape::Square, Shape::Ellipse, Shape::Heart];

    /// Whether the point `(u, v)` of the sprite's own frame (unit radius, v pointing down) is inside.
    fn contains(self, u: f64, v: f64) -> bool {
        match self {
            Shape::Square => u.abs() <= 0.8 && v.abs() <= 0.8,
            Shape::Ellipse => u * u + 4.0 * v * v <= 1.0,
            Shape::Heart => {
                // The heart curve (x^2 + y^2 - 1)^3 = x^2 y^3 with y up, shrunk to fit the unit
                // radius and shifted so its bounding box is roughly centred.
                let x = u * 1.25;
                let y = 0.15 - v * 1.25;
                let q = x * x + y * y - 1.0;
                q * q * q <= x * x * y * y * y
            }
        }
    }
}

/// One sprite of a scene.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Sprite {
    pub shape: Shape,
    pub colour: [u8; 3],
    /// Radius in pixels.
    pub radius: f64,
    pub angle: f64,
    /// Centre in pixels (x right, y down).
    pub cx: f64,
    pub cy: f64,
}

/// The parameters of one example.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Scene {
    pub background: u8,
    pub sprites: Vec<Sprite>,
}

/// Procedural Multi-dSprites, rendered on demand from `(seed, split, index)`.
pub struct MultiDsprites {
    seed: u64,
    split: Split,
    len: usize,
    resolution: usize,
    max_objects: usize,
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl MultiDsprites {
    pub fn new(spec: &DataSpec) -> Result<Self, DataError> {
        let len = embedded_len(spec)?;
        let max_objects = spec.max_objects.unwrap_or(5);
        if !(2..=254).contains(&max_objects) {
            return Err(DataError(format!(
                "multi_dsprites: max_objects = {max_objects}; expected 2..=254 (scenes have 2..=max_objects sprites)"
            )));
        }
        if spec.resolution < 8 {
            return Err(DataError(format!(
                "multi_dsprites: resolution {} is too small; expected at least 8",
                spec.resolution
            )));
        }
        Ok(Self {
            seed: spec.seed,
            split: spec.split,
            len,
            resolution: spec.resolution,
            max_objects,
            pool: make_pool(spec.num_workers)?,
        })
    }

    /// The parameters of example `i`, sprites in drawing order (mask id = position + 1).
    pub(crate) fn scene(&self, i: usize) -> Scene {
        let mut draws = Draws::new(self.seed, self.split, i);
        let count = 2 + draws.below(self.max_objects as u64 - 1) as usize;
        let background = draws.below(256) as u8;
        let res = self.resolution as f64;
        let sprites = (0..count)
            .map(|_| {
                let shape = Shape::ALL[draws.below(3) as usize];
                let colour = [
                    draws.below(256) as u8,
                    draws.below(256) as u8,
                    draws.below(256) as u8,
                ];
                let scale = 0.5 + 0.5 * draws.uniform();
                let angle = TAU * draws.uniform();
                let cx = (CENTRE_MARGIN + (1.0 - 2.0 * CENTRE_MARGIN) * draws.uniform()) * res;
                let cy = (CENTRE_MARGIN + (1.0 - 2.0 * CENTRE_MARGIN) * draws.uniform()) * res;
                Sprite {
                    shape,
                    colour,
                    radius: scale * RADIUS_AT_SCALE_1 * res,
                    angle,
                    cx,
                    cy,
                }
            })
            .collect();
        Scene {
            background,
            sprites,
        }
    }
}

impl Dataset for MultiDsprites {
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
        self.max_objects + 1
    }

    fn get(&self, i: usize, image: &mut [f32], mut mask: Option<&mut [u8]>) {
        check_buffers(self, i, image, mask.as_deref());
        let scene = self.scene(i);
        image.fill(to_unit(scene.background));
        if let Some(mask) = mask.as_deref_mut() {
            mask.fill(0);
        }
        let res = self.resolution;
        for (k, sprite) in scene.sprites.iter().enumerate() {
            let colour = sprite.colour.map(to_unit);
            let (sin, cos) = sprite.angle.sin_cos();
            // Every shape lies within 1.2 unit radii of the centre (the square's corner is 1.13).
            let reach = 1.2 * sprite.radius;
            let span = |c: f64| {
                let lo = (c - reach).floor().max(0.0) as usize;
                let hi = ((c + reach).ceil().max(0.0) as usize).min(res);
                lo..hi
            };
            for y in span(sprite.cy) {
                let dy = y as f64 + 0.5 - sprite.cy;
                for x in span(sprite.cx) {
                    let dx = x as f64 + 0.5 - sprite.cx;
                    // Rotate the pixel into the sprite's frame.
                    let u = (dx * cos + dy * sin) / sprite.radius;
                    let v = (dy * cos - dx * sin) / sprite.radius;
                    if sprite.shape.contains(u, v) {
                        let p = y * res + x;
                        image[3 * p..3 * p + 3].copy_from_slice(&colour);
                        if let Some(mask) = mask.as_deref_mut() {
                            mask[p] = k as u8 + 1;
                        }
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
            "multi_dsprites (procedural, seed {}, {} split): {} examples, {}x{}, 2..={} sprites",
            self.seed,
            self.split.name(),
            self.len,
            self.resolution,
            self.resolution,
            self.max_objects
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Source;

    fn dataset(resolution: usize, max_objects: usize) -> MultiDsprites {
        let spec = DataSpec {
            num: Some(100),
            max_objects: Some(max_objects),
            seed: 5,
            ..DataSpec::new(Source::MultiDsprites, Split::Test, resolution)
        };
        MultiDsprites::new(&spec).unwrap()
    }

    #[test]
    fn masks_colours_and_background_agree_with_the_scene() {
        for (res, max) in [(64, 5), (32, 3), (128, 6)] {
            let ds = dataset(res, max);
            let mut image = vec![0.0; res * res * 3];
            let mut mask = vec![0; res * res];
            let mut counts_seen = [false; 256];
            for i in 0..30 {
                ds.get(i, &mut image, Some(&mut mask));
                let scene = ds.scene(i);
                let n = scene.sprites.len();
                assert!((2..=max).contains(&n), "{n} sprites");
                counts_seen[n] = true;
                let grey = to_unit(scene.background);
                for (p, &id) in mask.iter().enumerate() {
                    let rgb = [image[3 * p], image[3 * p + 1], image[3 * p + 2]];
                    assert!((id as usize) <= n && (id as usize) < ds.max_entities());
                    if id == 0 {
                        assert_eq!(rgb, [grey; 3], "background of example {i} at {p}");
                    } else {
                        // The visible colour is that of the last sprite covering the pixel.
                        assert_eq!(rgb, scene.sprites[id as usize - 1].colour.map(to_unit));
                    }
                }
                // The last sprite is never occluded and is big enough to be seen.
                assert!(mask.contains(&(n as u8)), "example {i}: top sprite missing");
            }
            if max == 5 {
                // All counts 2..=5 occur across 30 scenes.
                assert!((2..=5).all(|n| counts_seen[n]));
            }
        }
    }

    #[test]
    fn shapes_have_distinct_footprints() {
        // Same pose, different shapes: the footprints must differ (and none be empty).
        let area = |shape: Shape| {
            let mut n = 0;
            for y in -40..40 {
                for x in -40..40 {
                    n += shape.contains(x as f64 / 20.0, y as f64 / 20.0) as usize;
                }
            }
            n
        };
        let [square, ellipse, heart] = Shape::ALL.map(area);
        assert!(
            square > heart && heart > ellipse && ellipse > 0,
            "{square} {ellipse} {heart}"
        );
        // Hearts point down in their own frame: more area above the centre than below.
        let upper = (-40..0).flat_map(|y| (-40..40).map(move |x| (x, y)));
        let lower = (1..40).flat_map(|y| (-40..40).map(move |x| (x, y)));
        let count = |pts: &mut dyn Iterator<Item = (i32, i32)>| {
            pts.filter(|&(x, y)| Shape::Heart.contains(x as f64 / 20.0, y as f64 / 20.0))
                .count()
        };
        assert!(count(&mut upper.into_iter()) > count(&mut lower.into_iter()));
    }

    #[test]
    fn invalid_settings_are_errors() {
        let spec = |res, max| DataSpec {
            max_objects: Some(max),
            ..DataSpec::new(Source::MultiDsprites, Split::Train, res)
        };
        assert!(MultiDsprites::new(&spec(64, 1)).is_err());
        assert!(MultiDsprites::new(&spec(64, 255)).is_err());
        assert!(MultiDsprites::new(&spec(4, 5)).is_err());
        assert!(MultiDsprites::new(&spec(64, 2)).is_ok());
    }
}
