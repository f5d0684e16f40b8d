//! PNG encoding with the generation metadata (prompt, seed, model, ...) in text chunks.

use std::io::Write;

use tch::{Kind, Tensor};

/// Encodes an `[H, W, 3]` uint8 image as PNG with UTF-8 text chunks (iTXt).
pub fn encode_png(image: &Tensor, text: &[(&str, String)]) -> anyhow::Result<Vec<u8>> {
    let (h, w, c) = image.size3()?;
    if c != 3 || image.kind() != Kind::Uint8 {
        anyhow::bail!(
            "expected an [H, W, 3] uint8 image, got {:?} {:?}",
            image.size(),
            image.kind()
        );
    }
    let data = Vec::<u8>::try_from(image.contiguous().view([-1]))?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            enc.add_itxt_chunk(key.to_string(), value.clone())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&data)?;
        writer.finish()?;
    }
    Ok(out)
}

/// Writes bytes to `path` atomically (temporary file in the same folder, then rename).
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Unique per write: containers sharing a volume can have the same pid.
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads an RGB PNG back: (width, height, pixels, text chunks).
pub type DecodedPng = (u32, u32, Vec<u8>, Vec<(String, String)>);

pub fn decode_png(bytes: &[u8]) -> anyhow::Result<DecodedPng> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf)?;
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut text: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        text.push((t.keyword.clone(), t.get_text().unwrap_or_default()));
    }
    Ok((info.width, info.height, buf, text))
}
