//! The embedded test image set: images generated on the fly (no downloads), each a PNG of a
//! simple pattern (stripes, rings, checkers, gradients) chosen by its index.

use image::{ImageFormat, Rgb, RgbImage};
use std::io::Cursor;

/// How many distinct samples there are (`GET /samples/{i}` takes `0..COUNT`).
pub const COUNT: usize = 16;

/// The default side of a sample, in pixels (a small request: 0.4–12 KiB of PNG, depending on
/// the sample).
pub const DEFAULT_SIDE: u32 = 64;

/// The largest side a sample may be asked for.
pub const MAX_SIDE: u32 = 2048;

/// Sample `i` (taken modulo [`COUNT`]) as an RGB image of `side × side` pixels.
pub fn image(i: usize, side: u32) -> RgbImage {
    let i = i % COUNT;
    let side = side.clamp(1, MAX_SIDE);
    let f = side as f32;
    // A colour per sample; the pattern by the sample's index.
    let tint = [
        (i * 53 % 256) as f32,
        (i * 97 % 256) as f32,
        (i * 151 % 256) as f32,
    ];
    RgbImage::from_fn(side, side, |x, y| {
        let (u, v) = (x as f32 / f, y as f32 / f);
        let level = match i % 4 {
            0 => ((u * (i + 2) as f32 * std::f32::consts::PI).sin() + 1.0) / 2.0,
            1 => {
                let r = ((u - 0.5).powi(2) + (v - 0.5).powi(2)).sqrt();
                ((r * (i + 4) as f32 * 6.0).cos() + 1.0) / 2.0
            }
            2 => {
                let n = (i + 2) as f32;
                (((u * n) as u32 + (v * n) as u32) % 2) as f32
            }
            _ => (u + v) / 2.0,
        };
        Rgb(tint.map(|t| (t * 0.5 + level * 127.0).min(255.0) as u8))
    })
}

/// Sample `i` of `side × side` pixels, encoded as PNG.
pub fn png(i: usize, side: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image(i, side)
        .write_to(&mut out, ImageFormat::Png)
        .expect("encoding a PNG into memory cannot fail");
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_decode_back_and_differ() {
        let a = png(0, 64);
        let b = png(1, 64);
        assert_ne!(a, b);
        let img = image::load_from_memory(&a).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
        assert_eq!(png(3, 8), png(3 + COUNT, 8));
    }
}
