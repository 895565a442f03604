//! Layers (untrusted tar streams, as pulled: plain, gzip or zstd) unpacked into a
//! layer dir, unpacked again above it, hard links completed from the lower one, both
//! flattened as `berth export` does: never a panic, and nothing written outside the
//! dirs given. The sandbox sits three empty levels deep so that `..` escapes land in
//! dirs this target checks.
#![no_main]

use berth_engine::unpack::{self, Options};
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

struct Sandbox {
    /// top/a/b/sandbox: top, a and b must hold only the next level.
    levels: Vec<(PathBuf, &'static str)>,
    dir: PathBuf,
}

fn sandbox() -> &'static Sandbox {
    static SANDBOX: OnceLock<Sandbox> = OnceLock::new();
    SANDBOX.get_or_init(|| {
        // fuzz/run points TMPDIR at a scratch dir (on /dev/shm when it can) it removes after.
        let top = std::env::temp_dir().join(format!("berth-fuzz-unpack-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&top);
        let dir = top.join("a/b/sandbox");
        std::fs::create_dir_all(&dir).expect("create the sandbox");
        Sandbox { levels: vec![(top.clone(), "a"), (top.join("a"), "b"), (top.join("a/b"), "sandbox")], dir }
    })
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// The stream as pull would read it: the first byte picks the form (the body as a
/// tar, compressed here and decoded as pull does, or the body as the compressed blob).
fn stream(pick: u8, body: &[u8]) -> Box<dyn Read + '_> {
    match pick % 5 {
        0 => Box::new(body),
        1 => {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(body).expect("gzip in memory");
            Box::new(flate2::read::MultiGzDecoder::new(std::io::Cursor::new(gz.finish().expect("gzip"))))
        }
        2 => {
            let compressed = zstd::encode_all(body, 1).expect("zstd in memory");
            Box::new(zstd::stream::read::Decoder::new(std::io::Cursor::new(compressed)).expect("zstd decoder"))
        }
        3 => Box::new(flate2::read::MultiGzDecoder::new(body)),
        _ => match zstd::stream::read::Decoder::new(body) {
            Ok(d) => Box::new(d),
            Err(_) => Box::new(&b""[..]),
        },
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let s = sandbox();
    let _ = std::fs::remove_dir_all(&s.dir);
    let (lower, upper, out, canary) = (s.dir.join("lower"), s.dir.join("upper"), s.dir.join("out"), s.dir.join("canary"));
    for d in [&lower, &upper, &out, &canary] {
        std::fs::create_dir_all(d).expect("create a sandbox dir");
    }
    std::fs::write(canary.join("file"), b"canary").expect("write the canary");
    let opts = Options::for_caller();
    if unpack::unpack(stream(pick, body), &lower, &opts).is_ok() {
        if let Ok(ext) = unpack::unpack(stream(pick, body), &upper, &opts) {
            let _ = unpack::link_from_lowers(&upper, std::slice::from_ref(&lower), &ext.external_links, &opts);
        }
        let _ = unpack::flatten(&[lower.clone(), upper.clone()], &out, &opts);
    }
    for (level, only) in &s.levels {
        assert_eq!(names(level), [*only], "an entry was written in {}", level.display());
    }
    assert_eq!(names(&s.dir), ["canary", "lower", "out", "upper"], "an entry was written beside the layer dirs");
    assert_eq!(names(&canary), ["file"], "an entry was written into the canary dir");
    assert_eq!(std::fs::read(canary.join("file")).expect("read the canary"), b"canary", "the canary was overwritten");
});
