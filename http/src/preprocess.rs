//! The preprocessing stage: decodes the uploaded image (read in place in shared memory),
//! resizes it to the model's input size, and turns it into the model's input features.

use image::imageops::FilterType;
use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
use std::path::PathBuf;
use std::time::Duration;

/// Errors the preprocessing worker returns for an input that is not a usable image start
/// with this; the HTTP front answers them 400 (the client's fault), anything else 500.
pub const BAD_IMAGE: &str = "bad image";

/// The largest width or height of an image the service decodes.
pub const MAX_SIDE: u32 = 8192;

/// The most memory decoding one image may take.
pub const MAX_DECODED_BYTES: u64 = 256 << 20;

/// The features of an encoded image (PNG or JPEG): resized to `side × side`, RGB, each
/// channel scaled to `[-1, 1]`, in row-major order (`3 · side²` values).
pub fn features(bytes: &[u8], side: u32) -> Result<Vec<f32>, String> {
    let bad = |e: image::ImageError| format!("{BAD_IMAGE}: {e}");
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("{BAD_IMAGE}: {e}"))?;
    // A small file can claim a huge image: bound what decoding it may cost.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(bad)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(format!("{BAD_IMAGE}: it has no pixels"));
    }
    let rgb = img.resize_exact(side, side, FilterType::Triangle).to_rgb8();
    Ok(rgb
        .as_raw()
        .iter()
        .map(|&b| b as f32 / 127.5 - 1.0)
        .collect())
}

/// The preprocessing worker. Its task is a fault directive (empty in normal use; honoured only
/// when the service was started with fault injection, for tests); the image comes as the
/// task's payload.
#[derive(Debug)]
pub struct Preprocess {
    side: u32,
    faults: Option<PathBuf>,
}

impl Preprocess {
    /// Applies a test fault directive (see `Config::fault_injection`).
    fn fault(&self, directive: &str) -> Result<(), BoxError> {
        let Some(dir) = &self.faults else {
            return Ok(());
        };
        for part in directive
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match part.split_once('=') {
                Some(("sleep", ms)) => {
                    let ms: u64 = ms.parse().map_err(|_| "sleep=MS takes a number")?;
                    std::thread::sleep(Duration::from_millis(ms.min(60_000)));
                }
                Some(("mark", name)) => std::fs::write(dir.join(file_name(name)?), b"ran")?,
                Some(("hold", name)) => {
                    // Until the test creates the file (bounded).
                    let file = dir.join(file_name(name)?);
                    let until = std::time::Instant::now() + Duration::from_secs(60);
                    while !file.exists() && std::time::Instant::now() < until {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
                None if part == "panic" => panic!("injected panic"),
                None if part == "exit" => std::process::exit(3),
                None if part == "fail" => return Err("injected failure".into()),
                _ => return Err(format!("unknown fault {part:?}").into()),
            }
        }
        Ok(())
    }
}

/// A fault's file name: letters and digits only (no paths).
fn file_name(name: &str) -> Result<&str, BoxError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err("a fault's file name takes letters and digits".into());
    }
    Ok(name)
}

impl Worker for Preprocess {
    /// The input side, and the fault-injection folder (empty: faults off).
    type SpawnArgs = (u32, String);
    type SpawnOutput = ();
    /// A fault directive (tests only; empty otherwise).
    type Task = String;
    /// The model's input features.
    type Output = Vec<f32>;

    fn spawn((side, faults): (u32, String), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        let faults = (!faults.is_empty()).then(|| PathBuf::from(faults));
        Ok((Preprocess { side, faults }, ()))
    }

    fn execute(
        &mut self,
        directive: &rkyv::Archived<String>,
        ctx: &TaskContext<'_>,
    ) -> Result<Vec<f32>, BoxError> {
        if !directive.is_empty() {
            self.fault(directive.as_str())?;
        }
        Ok(features(ctx.payload(), self.side)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_have_the_model_shape_and_range() {
        let f = features(&crate::samples::png(2, 100), 8).unwrap();
        assert_eq!(f.len(), 3 * 8 * 8);
        assert!(f.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn not_an_image_is_a_bad_image() {
        let e = features(b"definitely not a png", 8).unwrap_err();
        assert!(e.starts_with(BAD_IMAGE), "{e}");
        // A valid PNG header that claims 100,000 × 100,000 pixels.
        let mut huge = crate::samples::png(0, 8);
        huge[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        huge[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let e = features(&huge, 8).unwrap_err();
        assert!(e.starts_with(BAD_IMAGE), "{e}");
        // A real PNG wider than the limit.
        let mut wide = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(MAX_SIDE + 1, 1)
            .write_to(&mut wide, image::ImageFormat::Png)
            .unwrap();
        let e = features(wide.get_ref(), 8).unwrap_err();
        assert!(e.starts_with(BAD_IMAGE) && e.contains("limit"), "{e}");
        let mut truncated = crate::samples::png(0, 64);
        truncated.truncate(truncated.len() / 2);
        assert!(features(&truncated, 8).unwrap_err().starts_with(BAD_IMAGE));
    }
}
