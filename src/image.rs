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
            for app1 in jpeg_xmp_segments(text) {
                enc.add_app_segment(1, &app1)?;
            }
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

/// The APP1 signature of an XMP packet in a JPEG.
pub const XMP_JPEG_HEADER: &[u8] = b"http://ns.adobe.com/xap/1.0/\0";

/// The APP1 signature of an ExtendedXMP chunk (XMP Specification Part 3, "Extended XMP in
/// JPEG"): the signature, the 32-digit GUID, the full length and the chunk's offset (both u32
/// big-endian), then the chunk.
pub const XMP_EXTENSION_HEADER: &[u8] = b"http://ns.adobe.com/xmp/extension/\0";

/// The most ExtendedXMP bytes one APP1 segment carries.
const XMP_EXTENSION_CHUNK: usize = JPEG_SEGMENT_MAX - XMP_EXTENSION_HEADER.len() - 32 - 8;

/// The APP1 segments of a JPEG's XMP: one StandardXMP packet when the metadata fits one segment;
/// otherwise a StandardXMP packet with the AI-generated marking and `xmpNote:HasExtendedXMP`,
/// and the whole packet as ExtendedXMP in as many chunks as it takes (the GUID: the MD5 of the
/// ExtendedXMP, upper-case hex, as the specification asks). So any metadata fits a JPEG.
pub fn jpeg_xmp_segments<K: AsRef<str>>(text: &[(K, String)]) -> Vec<Vec<u8>> {
    use md5::{Digest, Md5};
    let whole = xmp_packet(text);
    let mut standard = XMP_JPEG_HEADER.to_vec();
    if XMP_JPEG_HEADER.len() + whole.len() <= JPEG_SEGMENT_MAX {
        standard.extend_from_slice(whole.as_bytes());
        return vec![standard];
    }
    let extended = xmp_meta(text, None);
    let guid = hex::encode_upper(Md5::digest(extended.as_bytes()));
    standard.extend_from_slice(xmp_wrap(&xmp_meta::<&str>(&[], Some(&guid))).as_bytes());
    let mut out = vec![standard];
    let total = (extended.len() as u32).to_be_bytes();
    for (i, chunk) in extended.as_bytes().chunks(XMP_EXTENSION_CHUNK).enumerate() {
        let mut segment = XMP_EXTENSION_HEADER.to_vec();
        segment.extend_from_slice(guid.as_bytes());
        segment.extend_from_slice(&total);
        segment.extend_from_slice(&((i * XMP_EXTENSION_CHUNK) as u32).to_be_bytes());
        segment.extend_from_slice(chunk);
        out.push(segment);
    }
    out
}

/// The XMP of a JPEG: the StandardXMP packet, or the ExtendedXMP it points to, reassembled from
/// its chunks (None without XMP).
pub fn jpeg_xmp(bytes: &[u8]) -> Option<String> {
    let mut standard = None;
    let mut chunks: Vec<(&[u8], u32, u32, &[u8])> = Vec::new();
    let mut at = 2;
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        if marker == 0xDA || marker == 0xD9 {
            break; // the scan: no metadata after it
        }
        let len = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let Some(data) = bytes.get(at + 4..at + 2 + len) else {
            break;
        };
        if marker == 0xE1 {
            if let Some(packet) = data.strip_prefix(XMP_JPEG_HEADER) {
                standard.get_or_insert(packet);
            } else if let Some(rest) = data.strip_prefix(XMP_EXTENSION_HEADER) {
                if rest.len() >= 40 {
                    let word = |i: usize| u32::from_be_bytes(rest[i..i + 4].try_into().unwrap());
                    chunks.push((&rest[..32], word(32), word(36), &rest[40..]));
                }
            }
        }
        at += 2 + len;
    }
    let standard = String::from_utf8_lossy(standard?).into_owned();
    let guid = standard
        .split_once("<xmpNote:HasExtendedXMP>")
        .and_then(|(_, rest)| rest.split_once('<'))
        .map(|(guid, _)| guid.to_string());
    let Some(guid) = guid else {
        return Some(standard);
    };
    let mine: Vec<_> = chunks.iter().filter(|c| c.0 == guid.as_bytes()).collect();
    let total = mine.first().map_or(0, |c| c.1 as usize);
    let mut whole = vec![0u8; total];
    let mut filled = 0;
    for (_, _, offset, data) in mine {
        let start = *offset as usize;
        if let Some(dst) = whole.get_mut(start..start + data.len()) {
            dst.copy_from_slice(data);
            filled += data.len();
        }
    }
    if filled != total || total == 0 {
        return Some(standard); // chunks missing: what the StandardXMP says
    }
    Some(String::from_utf8_lossy(&whole).into_owned())
}

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
    xmp_wrap(&xmp_meta(text, None))
}

/// An `x:xmpmeta` element in its packet wrapper.
fn xmp_wrap(meta: &str) -> String {
    format!(
        "<?xpacket begin=\"{bom}\" id=\"W5M0MpCehiHzreSzNTczkc9d\"?>{meta}<?xpacket end=\"w\"?>",
        bom = '\u{feff}'
    )
}

/// The `x:xmpmeta` element of [`xmp_packet`] (what ExtendedXMP carries, unwrapped), with
/// `xmpNote:HasExtendedXMP` when `extended` names the GUID of an ExtendedXMP.
fn xmp_meta<K: AsRef<str>>(text: &[(K, String)], extended: Option<&str>) -> String {
    let mut fields = String::new();
    for (key, value) in text {
        let key = key.as_ref();
        fields.push_str(&format!("<r2f:{key}>{}</r2f:{key}>", xml_escape(value)));
    }
    if let Some(guid) = extended {
        fields.push_str(&format!(
            "<xmpNote:HasExtendedXMP>{guid}</xmpNote:HasExtendedXMP>"
        ));
    }
    format!(
        "<x:xmpmeta xmlns:x=\"adobe:ns:meta/\"><rdf:RDF \
         xmlns:rdf=\"http://www.w3.org/1999/02/22-rdf-syntax-ns#\"><rdf:Description \
         rdf:about=\"\" xmlns:r2f=\"{XMP_NAMESPACE}\" xmlns:Iptc4xmpExt=\"{IPTC_EXT_NAMESPACE}\" \
         xmlns:xmp=\"http://ns.adobe.com/xap/1.0/\" xmlns:xmpNote=\"http://ns.adobe.com/xmp/note/\">\
         <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>\
         <xmp:CreatorTool>{CREATOR_TOOL}</xmp:CreatorTool>{fields}</rdf:Description></rdf:RDF>\
         </x:xmpmeta>"
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
    if is_jpeg {
        let xmp = jpeg_xmp(bytes).unwrap_or_default();
        return Ok((read_xmp(xmp.as_bytes()), marked));
    }
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
    fn jpeg_metadata_of_any_size_goes_to_extended_xmp_and_reads_back() {
        // 300 KB of escaped text: StandardXMP plus ExtendedXMP chunks.
        let big: String = "'<&\u{1f438}".repeat(40_000);
        let text = vec![("prompt", big.clone()), ("seed", "7".to_string())];
        let segments = jpeg_xmp_segments(&text);
        assert!(segments.len() > 4, "{}", segments.len());
        assert!(segments.iter().all(|s| s.len() <= JPEG_SEGMENT_MAX));
        let standard = String::from_utf8_lossy(&segments[0]).into_owned();
        assert!(standard.contains(DIGITAL_SOURCE_TYPE) && standard.contains("HasExtendedXMP"));
        assert!(!standard.contains("<r2f:prompt>"));
        let bytes = encode_image(&image(), &text, ImageFormat::Jpeg, 80).unwrap();
        let (fields, marked) = read_metadata(&bytes).unwrap();
        assert!(marked);
        assert_eq!(fields[0], ("prompt".to_string(), big));
        assert_eq!(fields[1], ("seed".to_string(), "7".to_string()));
        // A small record stays in one StandardXMP segment.
        assert_eq!(jpeg_xmp_segments(&self::text()).len(), 1);
        let bytes = encode_image(&image(), &self::text(), ImageFormat::Jpeg, 80).unwrap();
        assert_eq!(read_metadata(&bytes).unwrap().0[1].1, "42");
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
