//! TensorBoard event files without Python or protobuf codegen.
//!
//! An event file is a sequence of TFRecords: `u64` little-endian payload length, masked CRC32C of those
//! 8 bytes (`u32` LE), the payload, masked CRC32C of the payload (`u32` LE). Each payload is a serialized
//! `tensorflow.Event` protobuf, hand-encoded here with only the fields TensorBoard needs:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; Image image = 4; }
//! Image   { int32 height = 1; int32 width = 2; int32 colorspace = 3; bytes encoded_image_string = 4; }
//! ```
//!
//! The first record is `file_version: "brain.Event:2"`. Records are appended and flushed on request (once per
//! epoch), so a crash can at worst leave a truncated last record, which TensorBoard skips.
use super::{encode_png, RgbImage};
use anyhow::{ensure, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The version string TensorBoard expects in the first record.
pub const FILE_VERSION: &str = "brain.Event:2";

/// `Summary.Image.colorspace` for RGB.
const COLORSPACE_RGB: i32 = 3;

// ---------------------------------------------------------------------------------------------------------
// CRC32C (Castagnoli) and TFRecord framing
// ---------------------------------------------------------------------------------------------------------

/// Reflected Castagnoli polynomial 0x1EDC6F41.
const CRC32C_POLY: u32 = 0x82F6_3B78;

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32C of `data` (initial value and final xor 0xFFFFFFFF, as in iSCSI and TFRecord).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC32C_TABLE[((crc ^ byte as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

/// TensorFlow's masked CRC: rotate right by 15 bits and add a constant, so that a CRC stored inside the data it
/// covers does not make the CRC of the whole trivially predictable.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    mask_crc(crc32c(data))
}

fn mask_crc(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xA282_EAD8)
}

/// One TFRecord around `payload`.
pub fn frame_record(payload: &[u8]) -> Vec<u8> {
    let length = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc32c(&length).to_le_bytes());
    record.extend_from_slice(payload);
    record.extend_from_slice(&masked_crc32c(payload).to_le_bytes());
    record
}

// ---------------------------------------------------------------------------------------------------------
// Protobuf encoding (only the wire types used: varint 0, fixed64 1, length-delimited 2, fixed32 5)
// ---------------------------------------------------------------------------------------------------------

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7F) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_key(out: &mut Vec<u8>, field: u32, wire_type: u8) {
    put_varint(out, ((field as u64) << 3) | wire_type as u64);
}

/// int32 and int64 fields: negative values are sign-extended to 64 bits (10 bytes), as protobuf specifies.
fn put_int(out: &mut Vec<u8>, field: u32, value: i64) {
    put_key(out, field, 0);
    put_varint(out, value as u64);
}

fn put_double(out: &mut Vec<u8>, field: u32, value: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_float(out: &mut Vec<u8>, field: u32, value: f32) {
    put_key(out, field, 5);
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// The `Event` payload for a summary holding one value (already encoded as a `Summary.Value`).
fn summary_event(wall_time: f64, step: i64, value: &[u8]) -> Vec<u8> {
    let mut summary = Vec::with_capacity(value.len() + 8);
    put_bytes(&mut summary, 1, value);
    let mut event = Vec::with_capacity(summary.len() + 24);
    put_double(&mut event, 1, wall_time);
    put_int(&mut event, 2, step);
    put_bytes(&mut event, 5, &summary);
    event
}

/// `Event` payload of a scalar summary (`simple_value`).
pub fn encode_scalar_event(wall_time: f64, step: i64, tag: &str, value: f32) -> Vec<u8> {
    let mut summary_value = Vec::with_capacity(tag.len() + 8);
    put_bytes(&mut summary_value, 1, tag.as_bytes());
    put_float(&mut summary_value, 2, value);
    summary_event(wall_time, step, &summary_value)
}

/// `Event` payload of an image summary (PNG bytes already encoded).
pub fn encode_image_event(
    wall_time: f64,
    step: i64,
    tag: &str,
    height: i32,
    width: i32,
    png: &[u8],
) -> Vec<u8> {
    let mut image = Vec::with_capacity(png.len() + 24);
    put_int(&mut image, 1, height as i64);
    put_int(&mut image, 2, width as i64);
    put_int(&mut image, 3, COLORSPACE_RGB as i64);
    put_bytes(&mut image, 4, png);
    let mut summary_value = Vec::with_capacity(image.len() + tag.len() + 8);
    put_bytes(&mut summary_value, 1, tag.as_bytes());
    put_bytes(&mut summary_value, 4, &image);
    summary_event(wall_time, step, &summary_value)
}

/// `Event` payload of the first record.
pub fn encode_file_version_event(wall_time: f64) -> Vec<u8> {
    let mut event = Vec::with_capacity(32);
    put_double(&mut event, 1, wall_time);
    put_bytes(&mut event, 3, FILE_VERSION.as_bytes());
    event
}

// ---------------------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------------------

/// Appends events to one `events.out.tfevents.<secs>.<hostname>` file. Records go through a buffer;
/// [`EventWriter::flush`] pushes them to disk (call it once per epoch). Dropping the writer flushes too.
pub struct EventWriter {
    path: PathBuf,
    file: BufWriter<File>,
}

impl EventWriter {
    /// Creates `dir` if needed and a new event file in it, and writes the file-version record. If a file of
    /// that name exists (two writers in the same second), a `.1`, `.2`... suffix keeps both; TensorBoard
    /// reads any file whose name contains `tfevents`.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let base = format!("events.out.tfevents.{}.{}", now.as_secs(), hostname());
        let mut suffix = 0;
        let (path, file) = loop {
            let name = if suffix == 0 {
                base.clone()
            } else {
                format!("{base}.{suffix}")
            };
            let path = dir.join(name);
            match OpenOptions::new().append(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && suffix < 1000 => {
                    suffix += 1
                }
                Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
            }
        };
        let mut writer = Self {
            path,
            file: BufWriter::new(file),
        };
        writer.append(&encode_file_version_event(wall_time()))?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Logs a scalar. TensorBoard stores `simple_value` as a 32-bit float.
    pub fn scalar(&mut self, tag: &str, step: i64, value: f64) -> Result<()> {
        self.append(&encode_scalar_event(wall_time(), step, tag, value as f32))
    }

    /// Logs an RGB image, PNG-encoded.
    pub fn image(&mut self, tag: &str, step: i64, image: &RgbImage) -> Result<()> {
        let height = i32::try_from(image.height).context("image height")?;
        let width = i32::try_from(image.width).context("image width")?;
        let png = encode_png(image)?;
        self.append(&encode_image_event(
            wall_time(),
            step,
            tag,
            height,
            width,
            &png,
        ))
    }

    /// Pushes buffered records to the file and asks the OS to persist them.
    pub fn flush(&mut self) -> Result<()> {
        self.file
            .flush()
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.file
            .get_ref()
            .sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))
    }

    fn append(&mut self, payload: &[u8]) -> Result<()> {
        self.file
            .write_all(&frame_record(payload))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The machine's host name, as it goes into event file names (TensorFlow and PyTorch do the same); characters
/// that cannot be in a file name are replaced.
fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length; gethostname writes at most that many bytes.
    let status = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    let name: String = String::from_utf8_lossy(&buffer[..end])
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if status != 0 || name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

// ---------------------------------------------------------------------------------------------------------
// Reader (for tests and tools): strict, every CRC checked
// ---------------------------------------------------------------------------------------------------------

/// One decoded event. Fields the reader does not know are skipped.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub values: Vec<SummaryValue>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SummaryValue {
    pub tag: String,
    pub content: SummaryContent,
}

#[derive(Clone, Debug, PartialEq)]
pub enum SummaryContent {
    Scalar(f32),
    Image {
        height: i32,
        width: i32,
        colorspace: i32,
        encoded: Vec<u8>,
    },
    /// A value of a kind this reader does not decode (histogram, tensor, audio).
    Other,
}

/// Why an event file could not be read. `offset` is the byte offset of the record at fault.
#[derive(Debug, thiserror::Error)]
pub enum EventFileError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("record at byte {offset} is truncated (a writer stopped mid-record)")]
    Truncated { offset: usize },
    #[error("record at byte {offset}: length CRC mismatch")]
    LengthCrc { offset: usize },
    #[error("record at byte {offset}: data CRC mismatch")]
    DataCrc { offset: usize },
    #[error("record at byte {offset}: malformed Event protobuf: {reason}")]
    Malformed { offset: usize, reason: String },
}

/// Reads every record of an event file, checking both CRCs of each, and decodes the events. Any defect,
/// a truncated last record included, is an error; use [`split_records`] to get the sound prefix.
pub fn read_events(path: &Path) -> std::result::Result<Vec<Event>, EventFileError> {
    let bytes = std::fs::read(path).map_err(|source| EventFileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let (records, defect) = split_records(&bytes);
    if let Some(defect) = defect {
        return Err(defect);
    }
    records
        .into_iter()
        .map(|(offset, payload)| {
            decode_event(payload).map_err(|reason| EventFileError::Malformed { offset, reason })
        })
        .collect()
}

/// Splits `bytes` into `(offset, payload)` records whose framing and CRCs check out, stopping at the first
/// defect, which is returned alongside (as TensorBoard does, a reader can keep the records before it).
pub fn split_records(bytes: &[u8]) -> (Vec<(usize, &[u8])>, Option<EventFileError>) {
    let mut records = Vec::new();
    let mut offset = 0;
    while offset < bytes.len() {
        let rest = &bytes[offset..];
        if rest.len() < 12 {
            return (records, Some(EventFileError::Truncated { offset }));
        }
        let length_bytes = &rest[..8];
        let length_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        if masked_crc32c(length_bytes) != length_crc {
            return (records, Some(EventFileError::LengthCrc { offset }));
        }
        let length = u64::from_le_bytes(length_bytes.try_into().unwrap());
        let Some(end) = usize::try_from(length)
            .ok()
            .and_then(|n| n.checked_add(16))
            .filter(|&end| end <= rest.len())
        else {
            return (records, Some(EventFileError::Truncated { offset }));
        };
        let payload = &rest[12..end - 4];
        let data_crc = u32::from_le_bytes(rest[end - 4..end].try_into().unwrap());
        if masked_crc32c(payload) != data_crc {
            return (records, Some(EventFileError::DataCrc { offset }));
        }
        records.push((offset, payload));
        offset += end;
    }
    (records, None)
}

/// A protobuf field as read off the wire.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

struct ProtoReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> ProtoReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, at: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.at).ok_or("varint runs past the end")?;
            self.at += 1;
            value |= ((byte & 0x7F) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| format!("field of {n} bytes runs past the end"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    /// The next `(field number, value)`, or `None` at the end of the message.
    fn next(&mut self) -> std::result::Result<Option<(u64, Field<'a>)>, String> {
        if self.at == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => Field::Fixed64(self.take(8)?.try_into().unwrap()),
            2 => {
                let length = usize::try_from(self.varint()?).map_err(|e| e.to_string())?;
                Field::Bytes(self.take(length)?)
            }
            5 => Field::Fixed32(self.take(4)?.try_into().unwrap()),
            wire => return Err(format!("unsupported wire type {wire}")),
        };
        Ok(Some((key >> 3, field)))
    }
}

fn wrong_type(message: &str, field: u64) -> String {
    format!("{message} field {field} has an unexpected wire type")
}

fn decode_event(bytes: &[u8]) -> std::result::Result<Event, String> {
    let mut event = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        values: Vec::new(),
    };
    let mut reader = ProtoReader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, Field::Fixed64(raw)) => event.wall_time = f64::from_le_bytes(raw),
            (2, Field::Varint(raw)) => event.step = raw as i64,
            (3, Field::Bytes(raw)) => {
                event.file_version =
                    Some(String::from_utf8(raw.to_vec()).map_err(|e| e.to_string())?)
            }
            (5, Field::Bytes(raw)) => event.values.extend(decode_summary(raw)?),
            (1 | 2 | 3 | 5, _) => return Err(wrong_type("Event", number)),
            _ => {}
        }
    }
    Ok(event)
}

fn decode_summary(bytes: &[u8]) -> std::result::Result<Vec<SummaryValue>, String> {
    let mut values = Vec::new();
    let mut reader = ProtoReader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, Field::Bytes(raw)) => values.push(decode_value(raw)?),
            (1, _) => return Err(wrong_type("Summary", number)),
            _ => {}
        }
    }
    Ok(values)
}

fn decode_value(bytes: &[u8]) -> std::result::Result<SummaryValue, String> {
    let mut tag = String::new();
    let mut content = SummaryContent::Other;
    let mut reader = ProtoReader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, Field::Bytes(raw)) => {
                tag = String::from_utf8(raw.to_vec()).map_err(|e| e.to_string())?
            }
            (2, Field::Fixed32(raw)) => content = SummaryContent::Scalar(f32::from_le_bytes(raw)),
            (4, Field::Bytes(raw)) => content = decode_image(raw)?,
            (1 | 2 | 4, _) => return Err(wrong_type("Summary.Value", number)),
            _ => {}
        }
    }
    Ok(SummaryValue { tag, content })
}

fn decode_image(bytes: &[u8]) -> std::result::Result<SummaryContent, String> {
    let (mut height, mut width, mut colorspace, mut encoded) = (0, 0, 0, Vec::new());
    let mut reader = ProtoReader::new(bytes);
    while let Some((number, field)) = reader.next()? {
        match (number, field) {
            (1, Field::Varint(raw)) => height = raw as i32,
            (2, Field::Varint(raw)) => width = raw as i32,
            (3, Field::Varint(raw)) => colorspace = raw as i32,
            (4, Field::Bytes(raw)) => encoded = raw.to_vec(),
            (1..=4, _) => return Err(wrong_type("Summary.Image", number)),
            _ => {}
        }
    }
    Ok(SummaryContent::Image {
        height,
        width,
        colorspace,
        encoded,
    })
}

/// Checks that `events` starts with the file-version record; a convenience for callers that validate files.
pub fn ensure_file_version(events: &[Event]) -> Result<()> {
    let first = events.first().and_then(|e| e.file_version.as_deref());
    ensure!(
        first == Some(FILE_VERSION),
        "first event is {first:?}, expected file_version {FILE_VERSION:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::scratch::ScratchDir;
    use super::super::{decode_png, RgbImage};
    use super::*;

    #[test]
    fn report_crc32c_check_values() {
        // The CRC32C check value of "123456789" (from the catalogue of parametrised CRCs, CRC-32/ISCSI).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        // RFC 3720 (iSCSI) appendix B.4 test vectors: 32 zero bytes, 32 0xFF bytes, bytes 0..=31.
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&ascending), 0x46DD_794E);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn report_masked_crc_follows_the_tensorflow_formula() {
        // TF: ((crc >> 15) | (crc << 17)) + 0xa282ead8, in u32. For 0xE3069283, by hand:
        // crc >> 15 = 0x0001C60D, (crc << 17) mod 2^32 = 0x25060000, OR = 0x2507C60D, + 0xA282EAD8 = 0xC78AB0E5.
        assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
    }

    #[test]
    fn report_scalar_event_bytes_match_a_hand_encoding() {
        // Event{wall_time: 0.0, step: 1, summary{value{tag: "a", simple_value: 1.0}}}, encoded by hand from the
        // protobuf wire format: 0x09 = field 1 fixed64, 0x10 = field 2 varint, 0x2A = field 5 bytes,
        // 0x0A = field 1 bytes, 0x15 = field 2 fixed32; 1.0f32 is 0x3F800000 little-endian.
        let expected: Vec<u8> = [
            &[0x09, 0, 0, 0, 0, 0, 0, 0, 0][..],
            &[0x10, 0x01],
            &[
                0x2A, 0x0A, 0x0A, 0x08, 0x0A, 0x01, b'a', 0x15, 0x00, 0x00, 0x80, 0x3F,
            ],
        ]
        .concat();
        assert_eq!(encode_scalar_event(0.0, 1, "a", 1.0), expected);
        // A negative step is a 10-byte sign-extended varint (protobuf int64).
        let negative = encode_scalar_event(0.0, -1, "a", 1.0);
        assert_eq!(
            &negative[9..20],
            &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]
        );
    }

    #[test]
    fn report_record_framing_matches_the_tfrecord_layout() {
        let record = frame_record(b"abc");
        assert_eq!(record.len(), 8 + 4 + 3 + 4);
        assert_eq!(&record[..8], &3u64.to_le_bytes());
        assert_eq!(
            &record[8..12],
            &masked_crc32c(&3u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&record[12..15], b"abc");
        assert_eq!(&record[15..], &masked_crc32c(b"abc").to_le_bytes());
    }

    #[test]
    fn report_event_file_round_trip() {
        let dir = ScratchDir::new("tb-roundtrip");
        let mut writer = EventWriter::create(dir.path()).unwrap();
        let name = writer
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            name.starts_with("events.out.tfevents.") && name.split('.').count() >= 5,
            "{name}"
        );
        // 0.1 is not representable: the reader must see the f32 rounding, 0.1f32.
        writer.scalar("losses/train_loss", 1, 0.1).unwrap();
        writer.scalar("losses/val_loss", 1, -2.5).unwrap();
        writer.scalar("losses/train_loss", 2, 0.05).unwrap();
        let mut image = RgbImage::filled(4, 3, [0, 0, 0]);
        image.set(0, 0, [255, 0, 0]);
        image.set(3, 2, [0, 255, 0]);
        writer.image("qc/valid", 2, &image).unwrap();
        writer.flush().unwrap();

        let events = read_events(writer.path()).unwrap();
        ensure_file_version(&events).unwrap();
        assert_eq!(events.len(), 5);
        let scalars: Vec<(i64, &str, f32)> = events
            .iter()
            .flat_map(|e| {
                e.values.iter().filter_map(move |v| match v.content {
                    SummaryContent::Scalar(x) => Some((e.step, v.tag.as_str(), x)),
                    _ => None,
                })
            })
            .collect();
        assert_eq!(
            scalars,
            vec![
                (1, "losses/train_loss", 0.1f32),
                (1, "losses/val_loss", -2.5),
                (2, "losses/train_loss", 0.05f32)
            ]
        );
        let last = events.last().unwrap();
        assert_eq!(last.step, 2);
        assert_eq!(last.values[0].tag, "qc/valid");
        let SummaryContent::Image {
            height,
            width,
            colorspace,
            encoded,
        } = &last.values[0].content
        else {
            panic!("expected an image, got {:?}", last.values[0].content)
        };
        assert_eq!((*height, *width, *colorspace), (3, 4, 3));
        assert_eq!(decode_png(encoded).unwrap(), image);
        // Wall times are seconds since the epoch, in order.
        let now = wall_time();
        assert!(events.windows(2).all(|w| w[0].wall_time <= w[1].wall_time));
        assert!(events
            .iter()
            .all(|e| e.wall_time > now - 60.0 && e.wall_time <= now));
    }

    #[test]
    fn report_two_writers_in_one_second_get_distinct_files() {
        let dir = ScratchDir::new("tb-two");
        let first = EventWriter::create(dir.path()).unwrap();
        let second = EventWriter::create(dir.path()).unwrap();
        assert_ne!(first.path(), second.path());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn report_every_flipped_byte_is_detected() {
        let dir = ScratchDir::new("tb-flip");
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer.scalar("a", 7, 3.0).unwrap();
        writer.flush().unwrap();
        let path = writer.path().to_path_buf();
        drop(writer);
        let good = std::fs::read(&path).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 2);
        let first_record_len = 16 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        // Flip one bit in every byte position in turn: each must be reported, never decoded silently.
        for position in 0..good.len() {
            let mut bad = good.clone();
            bad[position] ^= 0x10;
            std::fs::write(&path, &bad).unwrap();
            let error = read_events(&path).expect_err(&format!("flip at {position} undetected"));
            let record = if position < first_record_len {
                0
            } else {
                first_record_len
            };
            let within = position - record;
            match error {
                // CRC32C detects every 1-bit error, so a flip in the length or its CRC (the first 12 bytes of
                // a record) fails the length check, and a flip in the payload or its CRC the data check.
                EventFileError::LengthCrc { offset } => {
                    assert!(within < 12, "{position}");
                    assert_eq!(offset, record);
                }
                EventFileError::DataCrc { offset } => {
                    assert!(within >= 12, "{position}");
                    assert_eq!(offset, record);
                }
                other => panic!("flip at {position}: unexpected {other}"),
            }
        }
    }

    #[test]
    fn report_truncated_last_record_keeps_the_records_before_it() {
        let dir = ScratchDir::new("tb-trunc");
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer.scalar("a", 1, 1.0).unwrap();
        writer.scalar("a", 2, 2.0).unwrap();
        writer.flush().unwrap();
        let bytes = std::fs::read(writer.path()).unwrap();
        // Cut the last record in half, as a crash mid-write would.
        let cut = &bytes[..bytes.len() - 10];
        let (records, defect) = split_records(cut);
        assert_eq!(
            records.len(),
            2,
            "file version and the first scalar survive"
        );
        assert!(matches!(defect, Some(EventFileError::Truncated { .. })));
        std::fs::write(writer.path(), cut).unwrap();
        assert!(matches!(
            read_events(writer.path()),
            Err(EventFileError::Truncated { .. })
        ));
    }
}
