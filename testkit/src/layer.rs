//! Layers: tar streams written header by header, never through `tar::Builder`, so that
//! what a hostile image carries reaches the code under test unchanged (absolute and
//! `..` names, links pointing out, device nodes, whiteouts, records declaring any size,
//! headers that lie), then compressed as a registry serves them. Never checks or
//! normalizes a name: refusing one is the unpacker's job.

use crate::image::Blob;
use sha2::{Digest as _, Sha256};
use std::io::{self, Write};
use tar::{EntryType, Header};

/// Every entry's mtime: the same entries make the same bytes.
const MTIME: u64 = 1_600_000_000;

/// Bytes of a header's name and link name fields; longer ones go in a GNU record first.
const NAME_FIELD: usize = 100;

/// One entry of a layer, owned by root. Names and link targets of up to 100 bytes are
/// written into the header as given; longer ones in a GNU long-name (or long-link)
/// record before it, as GNU tar writes them.
pub enum Entry<'a> {
    /// A regular file: its content and mode.
    File(&'a str, &'a [u8], u32),
    /// A directory and its mode.
    Dir(&'a str, u32),
    /// A symbolic link and its target.
    Symlink(&'a str, &'a str),
    /// A hard link and the name it links to.
    HardLink(&'a str, &'a str),
    /// A FIFO and its mode.
    Fifo(&'a str, u32),
    /// A character device (major, minor), mode 0666.
    Char(&'a str, u32, u32),
    /// A block device (major, minor), mode 0666.
    Block(&'a str, u32, u32),
    /// A PAX extended header for the entry after it: (key, value) records, e.g.
    /// `SCHILY.xattr.security.capability`.
    Pax(&'a [(&'a str, &'a [u8])]),
    /// An extension record (GNU long name or link, PAX) whose header declares this size:
    /// these bytes, then zeros up to it. Written in pieces, so any size costs no memory.
    Record(EntryType, u64, &'a [u8]),
    /// A header as given (its checksum set), then these bytes: for a header that lies.
    Raw(&'a Header, &'a [u8]),
}

/// A GNU header of this kind, mode and size, owned by root, with the fixed mtime.
pub fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(MTIME);
    h
}

/// The tar stream of these entries, end-of-archive blocks included.
pub fn tar_of(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    write_tar(&mut out, entries).expect("writing to memory");
    out
}

/// Writes the tar stream of these entries, end-of-archive blocks included.
pub fn write_tar(out: &mut impl Write, entries: &[Entry]) -> io::Result<()> {
    for e in entries {
        match e {
            Entry::File(name, data, mode) => put(out, header(EntryType::Regular, *mode, data.len() as u64), name, None, data)?,
            Entry::Dir(name, mode) => put(out, header(EntryType::Directory, *mode, 0), name, None, b"")?,
            Entry::Symlink(name, target) => put(out, header(EntryType::Symlink, 0o777, 0), name, Some(target), b"")?,
            Entry::HardLink(name, target) => put(out, header(EntryType::Link, 0o644, 0), name, Some(target), b"")?,
            Entry::Fifo(name, mode) => put(out, header(EntryType::Fifo, *mode, 0), name, None, b"")?,
            Entry::Char(name, major, minor) | Entry::Block(name, major, minor) => {
                let kind = if matches!(e, Entry::Char(..)) { EntryType::Char } else { EntryType::Block };
                let mut h = header(kind, 0o666, 0);
                h.set_device_major(*major)?;
                h.set_device_minor(*minor)?;
                put(out, h, name, None, b"")?
            }
            Entry::Pax(records) => {
                let body: Vec<u8> = records.iter().flat_map(|(key, value)| pax_record(key, value)).collect();
                put(out, header(EntryType::XHeader, 0o644, body.len() as u64), "././@PaxHeader", None, &body)?
            }
            Entry::Record(kind, size, start) => {
                assert!(start.len() as u64 <= *size, "a record's start is longer than its size");
                let mut h = header(*kind, 0o644, *size);
                put_name(&mut h.as_old_mut().name, "././@LongLink");
                h.set_cksum();
                out.write_all(h.as_bytes())?;
                out.write_all(start)?;
                let zeros = vec![0u8; 1 << 20];
                let mut left = size - start.len() as u64;
                while left > 0 {
                    let n = left.min(zeros.len() as u64);
                    out.write_all(&zeros[..n as usize])?;
                    left -= n;
                }
                pad(out, *size)?
            }
            Entry::Raw(h, data) => {
                let mut h = (*h).clone();
                h.set_cksum();
                out.write_all(h.as_bytes())?;
                out.write_all(data)?;
                pad(out, data.len() as u64)?
            }
        }
    }
    out.write_all(&[0u8; 1024])
}

/// Writes `h` named `name` (and linking to `link`), long ones by GNU records first, then `data`.
fn put(out: &mut impl Write, mut h: Header, name: &str, link: Option<&str>, data: &[u8]) -> io::Result<()> {
    if name.len() > NAME_FIELD {
        long_record(out, EntryType::GNULongName, name)?;
    }
    put_name(&mut h.as_old_mut().name, name);
    if let Some(target) = link {
        if target.len() > NAME_FIELD {
            long_record(out, EntryType::GNULongLink, target)?;
        }
        put_name(&mut h.as_old_mut().linkname, target);
    }
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    out.write_all(data)?;
    pad(out, data.len() as u64)
}

/// As much of `name` as the field holds, byte for byte.
fn put_name(field: &mut [u8; NAME_FIELD], name: &str) {
    let n = name.len().min(NAME_FIELD);
    field[..n].copy_from_slice(&name.as_bytes()[..n]);
}

/// A GNU record carrying a long name or link target, NUL-terminated.
fn long_record(out: &mut impl Write, kind: EntryType, name: &str) -> io::Result<()> {
    let mut data = name.as_bytes().to_vec();
    data.push(0);
    let mut h = header(kind, 0o644, data.len() as u64);
    put_name(&mut h.as_old_mut().name, "././@LongLink");
    h.set_cksum();
    out.write_all(h.as_bytes())?;
    out.write_all(&data)?;
    pad(out, data.len() as u64)
}

/// Zeros up to the next 512-byte block after `len` bytes of data.
fn pad(out: &mut impl Write, len: u64) -> io::Result<()> {
    let rest = (512 - len % 512) % 512;
    out.write_all(&[0u8; 512][..rest as usize])
}

/// A PAX record, "LEN key=value\n", LEN counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut out = format!("{len} {key}=").into_bytes();
    out.extend_from_slice(value);
    out.push(b'\n');
    out
}

/// Bytes no compressor shrinks, different for every seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// How a layer's blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The OCI media type of a layer compressed so.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// A layer as a registry serves it: its blob, its media type, and the diff_id an image
/// config names for it (its tar stream's digest, unless it claims another).
#[derive(Clone, Debug)]
pub struct Layer {
    pub blob: Blob,
    pub media_type: String,
    pub diff_id: String,
}

impl Layer {
    /// The layer of this tar stream.
    pub fn new(tar: &[u8], compression: Compression) -> Layer {
        let mut w = LayerWriter::new(compression);
        w.write_all(tar).expect("compressing in memory");
        w.finish()
    }

    /// The layer of these entries, written straight into the compressor: a record of any
    /// size costs no memory.
    pub fn streamed(entries: &[Entry], compression: Compression) -> Layer {
        let mut w = LayerWriter::new(compression);
        write_tar(&mut w, entries).expect("compressing in memory");
        w.finish()
    }

    /// The same blob with another diff_id in the config: a config may claim any.
    pub fn claiming(self, diff_id: &str) -> Layer {
        Layer { diff_id: diff_id.to_string(), ..self }
    }
}

/// Hashes a tar stream (its diff_id) and compresses it as it comes.
struct LayerWriter {
    compression: Compression,
    diff: Sha256,
    out: Encoder,
}

enum Encoder {
    None(Vec<u8>),
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::Encoder<'static, Vec<u8>>),
}

impl LayerWriter {
    fn new(compression: Compression) -> LayerWriter {
        let out = match compression {
            Compression::None => Encoder::None(Vec::new()),
            Compression::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())),
            Compression::Zstd => Encoder::Zstd(zstd::Encoder::new(Vec::new(), 1).expect("a zstd encoder")),
        };
        LayerWriter { compression, diff: Sha256::new(), out }
    }

    fn finish(self) -> Layer {
        let bytes = match self.out {
            Encoder::None(v) => v,
            Encoder::Gzip(e) => e.finish().expect("gzip in memory"),
            Encoder::Zstd(e) => e.finish().expect("zstd in memory"),
        };
        Layer { blob: Blob::of(bytes), media_type: self.compression.media_type().to_string(), diff_id: format!("sha256:{:x}", self.diff.finalize()) }
    }
}

impl Write for LayerWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.out {
            Encoder::None(v) => v.write(buf)?,
            Encoder::Gzip(e) => e.write(buf)?,
            Encoder::Zstd(e) => e.write(buf)?,
        };
        self.diff.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn names_and_link_targets_arrive_as_written_long_ones_by_gnu_records() {
        let long = format!("{}/leaf", "d".repeat(150));
        let far = format!("/{}", "t".repeat(120));
        let t = tar_of(&[
            Entry::File("../up", b"x", 0o644),
            Entry::File("/abs", b"", 0o600),
            Entry::File(&long, b"deep", 0o644),
            Entry::Symlink("s", &far),
            Entry::HardLink("h", "../../etc/passwd"),
            Entry::Pax(&[("SCHILY.xattr.user.k", b"v")]),
            Entry::Char("c", 1, 3),
        ]);
        let mut archive = tar::Archive::new(&t[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let link = entry.link_name_bytes().map(|l| String::from_utf8(l.into_owned()).unwrap());
            let xattrs: Vec<String> = match entry.pax_extensions().unwrap() {
                Some(records) => records.map(|r| r.unwrap().key().unwrap().to_string()).collect(),
                None => Vec::new(),
            };
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            seen.push((name, link, data, xattrs, entry.header().entry_type()));
        }
        let names: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["../up", "/abs", long.as_str(), "s", "h", "c"]);
        assert_eq!(seen[2].2, b"deep");
        assert_eq!(seen[3].1.as_deref(), Some(far.as_str()));
        assert_eq!(seen[4].1.as_deref(), Some("../../etc/passwd"));
        assert_eq!(seen[5].3, ["SCHILY.xattr.user.k"]);
        assert_eq!(seen[5].4, EntryType::Char);
    }

    #[test]
    fn a_layer_names_its_tar_streams_digest_whatever_its_compression() {
        let t = tar_of(&[Entry::File("a", &noise(5000, 1), 0o644)]);
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let layer = Layer::new(&t, c);
            assert_eq!(layer.diff_id, crate::digest(&t), "{c:?}");
            assert_eq!(Layer::streamed(&[Entry::File("a", &noise(5000, 1), 0o644)], c).diff_id, layer.diff_id, "{c:?}");
            let mut back = Vec::new();
            match c {
                Compression::None => back = layer.blob.bytes.clone(),
                Compression::Gzip => _ = flate2::read::GzDecoder::new(&layer.blob.bytes[..]).read_to_end(&mut back).unwrap(),
                Compression::Zstd => _ = zstd::stream::read::Decoder::new(&layer.blob.bytes[..]).unwrap().read_to_end(&mut back).unwrap(),
            }
            assert_eq!(back, t, "{c:?}");
        }
    }
}
