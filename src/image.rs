//! Image encoding with the generation metadata (prompt, seed, model, ...): PNG with UTF-8 text
//! chunks (iTXt), JPEG and lossy WebP with the same fields in an XMP packet (JPEG: an APP1
//! segment; WebP: an `XMP ` chunk of the extended format).

use std::io::Write;

use tch::{Kind, Tensor};

crate::named_enum! {
    /// An output file format.
    #[derive(Default)]
    pub enum ImageFormat("output format") {
        /// Lossless, metadata in iTXt chunks.
        #[default]
        Png = "png",
        /// Lossy (`quality`), metadata as XMP in APP1.
        Jpeg = "jpeg" | "jpg",
        /// Lossy (libwebp, `quality`), metadata as an XMP chunk.
        Webp = "webp",
    }
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            other => other.name(),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }
}

/// The default quality of the lossy formats.
pub const DEFAULT_QUALITY: u8 = 90;

/// The pixels of an `[H, W, 3]` uint8 image: (width, height, RGB bytes).
fn rgb_bytes(image: &Tensor) -> anyhow::Result<(u32, u32, Vec<u8>)> {
    let (h, w, c) = image.size3()?;
    if c != 3 || image.kind() != Kind::Uint8 {
        anyhow::bail!(
            "expected an [H, W, 3] uint8 image, got {:?} {:?}",
            image.size(),
            image.kind()
        );
    }
    let data = Vec::<u8>::try_from(image.contiguous().view([-1]))?;
    Ok((w as u32, h as u32, data))
}

/// Encodes an `[H, W, 3]` uint8 image in `format` (`quality` 1–100 for the lossy ones) with
/// `text` as metadata.
pub fn encode_image<K: AsRef<str>>(
    image: &Tensor,
    text: &[(K, String)],
    format: ImageFormat,
    quality: u8,
) -> anyhow::Result<Vec<u8>> {
    match format {
        ImageFormat::Png => encode_png(image, text),
        ImageFormat::Jpeg => {
            let (w, h, data) = rgb_bytes(image)?;
            let (w, h) = (u16::try_from(w)?, u16::try_from(h)?);
            let mut out = Vec::new();
            let mut enc = jpeg_encoder::Encoder::new(&mut out, quality.clamp(1, 100));
            let mut app1 = XMP_JPEG_HEADER.to_vec();
            app1.extend_from_slice(xmp_packet(text).as_bytes());
            if app1.len() > JPEG_SEGMENT_MAX {
                return Err(MetadataTooLarge { bytes: app1.len() }.into());
            }
            enc.add_app_segment(1, &app1)?;
            enc.encode(&data, w, h, jpeg_encoder::ColorType::Rgb)?;
            Ok(out)
        }
        ImageFormat::Webp => {
            let (w, h, data) = rgb_bytes(image)?;
            let lossy =
                webp::Encoder::from_rgb(&data, w, h).encode(f32::from(quality.clamp(1, 100)));
            webp_with_xmp(&lossy, w, h, xmp_packet(text).as_bytes())
        }
    }
}

/// The most bytes one JPEG APP1 segment holds (65535 less its 2-byte length field).
pub const JPEG_SEGMENT_MAX: usize = 65_533;

/// The metadata of an image does not fit its format (JPEG holds XMP in one 64 KiB segment): the
/// job's own content (its prompt, negative prompt, plan), not the model, is the cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "the image metadata takes {bytes} bytes as JPEG XMP, over the {} bytes a JPEG metadata segment holds: use png or webp, or a shorter prompt or plan",
    JPEG_SEGMENT_MAX
)]
pub struct MetadataTooLarge {
    pub bytes: usize,
}

/// The bytes the XMP segment of a JPEG with `text` as metadata takes.
pub fn jpeg_xmp_len<K: AsRef<str>>(text: &[(K, String)]) -> usize {
    XMP_JPEG_HEADER.len() + xmp_packet(text).len()
}

/// The APP1 signature of an XMP packet in a JPEG.
pub const XMP_JPEG_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// The namespace of r2f's XMP properties.
pub const XMP_NAMESPACE: &str = "urn:r2f:metadata:1/";

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// The IPTC digital source type of every image r2f makes: media created by a trained
/// algorithmic model (what the EU AI Act's machine-readable marking is read from).
pub const DIGITAL_SOURCE_TYPE: &str =
    "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

/// The namespace of the IPTC Extension schema (`Iptc4xmpExt:DigitalSourceType`).
pub const IPTC_EXT_NAMESPACE: &str = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/";

/// The generator named in `xmp:CreatorTool`.
pub const CREATOR_TOOL: &str = concat!("r2f ", env!("CARGO_PKG_VERSION"));

/// An XMP packet marking the image as AI-generated (`Iptc4xmpExt:DigitalSourceType`
/// trainedAlgorithmicMedia, `xmp:CreatorTool`), with one `r2f:<key>` element per metadata field.
pub fn xmp_packet<K: AsRef<str>>(text: &[(K, String)]) -> String {
    let mut fields = String::new();
    for (key, value) in text {
        let key = key.as_ref();
        fields.push_str(&format!("<r2f:{key}>{}</r2f:{key}>", xml_escape(value)));
    }
    format!(
        "<?xpacket begin=\"{bom}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>\
         <x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF \
         xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\"><rdf:Description \
         rdf:about=\"\" xmlns:r2f=\"{XMP_NAMESPACE}\" xmlns:Iptc4xmpExt=\"{IPTC_EXT_NAMESPACE}\" \
         xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\">\
         <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>\
         <xmp:CreatorTool>{CREATOR_TOOL}</xmp:CreatorTool>{fields}</rdf:Description></rdf:RDF>\
         </x:xmpmeta><?xpacket end=\"w\"?>",
        bom = '\u{feff}'
    )
}

/// The PNG iTXt keyword of an XMP packet.
pub const XMP_PNG_KEYWORD: &str = "XML:com.adobe.xmp";

/// Reads the `r2f:<key>` fields back from an XMP packet found anywhere in `bytes`.
pub fn read_xmp(bytes: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(bytes);
    let Some(start) = text.find("<rdf:Description") else {
        return vec![];
    };
    let mut rest = &text[start..];
    let mut out = Vec::new();
    while let Some(open) = rest.find("<r2f:") {
        rest = &rest[open + 5..];
        let Some(end) = rest.find('>') else { break };
        let key = rest[..end].to_string();
        rest = &rest[end + 1..];
        let close = format!("</r2f:{key}>");
        let Some(stop) = rest.find(&close) else { break };
        let value = rest[..stop]
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&");
        out.push((key, value));
        rest = &rest[stop + close.len()..];
    }
    out
}

/// Rewrites a simple (lossy, `VP8 `) WebP file as the extended format with an `XMP ` chunk:
/// RIFF, `VP8X` (the XMP flag and the canvas size), the image chunk, then the XMP chunk.
fn webp_with_xmp(simple: &[u8], width: u32, height: u32, xmp: &[u8]) -> anyhow::Result<Vec<u8>> {
    if simple.len() < 12 || &simple[..4] != b"RIFF" || &simple[8..12] != b"WEBP" {
        anyhow::bail!("the WebP encoder gave no RIFF/WEBP file");
    }
    let chunks = &simple[12..];
    let chunk = |fourcc: &[u8], data: &[u8]| {
        let mut c = fourcc.to_vec();
        c.extend_from_slice(&(data.len() as u32).to_le_bytes());
        c.extend_from_slice(data);
        if data.len() % 2 == 1 {
            c.push(0);
        }
        c
    };
    let mut vp8x = vec![0x04u8, 0, 0, 0]; // flags: XMP metadata
    vp8x.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    vp8x.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    let mut body = b"WEBP".to_vec();
    body.extend(chunk(b"VP8X", &vp8x));
    body.extend_from_slice(chunks);
    body.extend(chunk(b"XMP ", xmp));
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    Ok(out)
}

/// Encodes an `[H, W, 3]` uint8 image as PNG with UTF-8 text chunks (iTXt).
pub fn encode_png<K: AsRef<str>>(image: &Tensor, text: &[(K, String)]) -> anyhow::Result<Vec<u8>> {
    let (w, h, data) = rgb_bytes(image)?;
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            enc.add_itxt_chunk(key.as_ref().to_string(), value.clone())?;
        }
        // PNG's registered keyword for the program that made the image.
        enc.add_itxt_chunk(PNG_SOFTWARE_KEYWORD.to_string(), CREATOR_TOOL.to_string())?;
        // The same fields, and the AI-generated marking, as XMP (what XMP readers look for).
        enc.add_itxt_chunk(XMP_PNG_KEYWORD.to_string(), xmp_packet(text))?;
        // The generation parameters as AUTOMATIC1111 writes them (read by "PNG Info", Civitai).
        if let Some(p) = a1111_parameters(text, w, h) {
            enc.add_itxt_chunk(A1111_KEYWORD.to_string(), p)?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&data)?;
        writer.finish()?;
    }
    Ok(out)
}

/// The PNG text keyword of the program that made an image (registered in the PNG standard).
pub const PNG_SOFTWARE_KEYWORD: &str = "Software";

/// The PNG text keyword AUTOMATIC1111 and the tools that follow it read parameters from.
pub const A1111_KEYWORD: &str = "parameters";

/// The `parameters` text of AUTOMATIC1111: the prompt, `Negative prompt: ...`, then `Steps: N,
/// Sampler: S, CFG scale: G, Seed: S, Size: WxH, Model: M, Version: r2f V` (None without a prompt field).
pub fn a1111_parameters<K: AsRef<str>>(
    text: &[(K, String)],
    width: u32,
    height: u32,
) -> Option<String> {
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key.as_ref() == k)
            .map(|(_, v)| v.as_str())
    };
    let prompt = get("prompt")?;
    let mut out = prompt.to_string();
    if let Some(neg) = get("negative_prompt").filter(|n| !n.is_empty()) {
        out.push_str(&format!("\nNegative prompt: {neg}"));
    }
    let mut line = Vec::new();
    for (key, label) in [
        ("steps", "Steps"),
        ("scheduler", "Sampler"),
        ("guidance", "CFG scale"),
        ("seed", "Seed"),
    ] {
        if let Some(v) = get(key) {
            line.push(format!("{label}: {v}"));
        }
    }
    line.push(format!("Size: {width}x{height}"));
    if let Some(m) = get("model") {
        // A1111 separates its fields with ", ": keep the value free of them.
        line.push(format!("Model: {}", m.replace(", ", " ")));
    }
    if let Some(m) = get("mode") {
        line.push(format!("R2F mode: {m}"));
    }
    line.push(format!("Version: {CREATOR_TOOL}"));
    out.push('\n');
    out.push_str(&line.join(", "));
    Some(out)
}

/// The metadata an image r2f wrote carries, from any of its formats: r2f's fields (PNG text
/// chunks, else the XMP `r2f:` elements), and whether its XMP marks it as AI-generated.
pub fn read_metadata(bytes: &[u8]) -> anyhow::Result<(Vec<(String, String)>, bool)> {
    if bytes.starts_with(b"\x89PNG") {
        let (_, _, _, text) = decode_png(bytes)?;
        let marked = text
            .iter()
            .any(|(k, v)| k == XMP_PNG_KEYWORD && v.contains(DIGITAL_SOURCE_TYPE));
        let fields = text
            .into_iter()
            .filter(|(k, _)| {
                k != XMP_PNG_KEYWORD && k != A1111_KEYWORD && k != PNG_SOFTWARE_KEYWORD
            })
            .collect();
        return Ok((fields, marked));
    }
    let is_jpeg = bytes.starts_with(&[0xFF, 0xD8]);
    let is_webp = bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP";
    if !is_jpeg && !is_webp {
        anyhow::bail!("not a PNG, JPEG or WebP file");
    }
    let marked = String::from_utf8_lossy(bytes).contains(DIGITAL_SOURCE_TYPE);
    Ok((read_xmp(bytes), marked))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Tensor {
        Tensor::arange(48 * 32 * 3, (Kind::Int64, tch::Device::Cpu))
            .remainder(251)
            .to_kind(Kind::Uint8)
            .view([32, 48, 3])
    }

    fn text() -> Vec<(&'static str, String)> {
        vec![
            ("prompt", "a <hairy> frog & \"friend\" 🐸".to_string()),
            ("seed", "42".to_string()),
        ]
    }

    #[test]
    fn xmp_round_trips_escaped_text() {
        let back = read_xmp(xmp_packet(&text()).as_bytes());
        let want: Vec<(String, String)> = text()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(back, want);
    }

    #[test]
    fn webp_is_extended_riff_with_the_xmp_chunk() {
        let bytes = encode_image(&image(), &text(), ImageFormat::Webp, 80).unwrap();
        assert_eq!(&bytes[..4], b"RIFF");
        assert_eq!(
            u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize,
            bytes.len() - 8
        );
        assert_eq!(&bytes[8..16], b"WEBPVP8X");
        assert_eq!(bytes[20], 0x04, "XMP flag");
        let decoded = webp::Decoder::new(&bytes)
            .decode()
            .expect("libwebp decodes it");
        assert_eq!((decoded.width(), decoded.height()), (48, 32));
        assert_eq!(read_xmp(&bytes)[1], ("seed".to_string(), "42".to_string()));
    }
}
