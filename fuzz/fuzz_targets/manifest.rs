//! Manifests and indexes as a registry (untrusted) sends them: the first byte picks
//! the Content-Type header, the rest is the body. Parsing, picking a platform and
//! reading layer media types never panic.
#![no_main]

use berth_engine::registry::manifest::{self, Fetched, Platform};
use libfuzzer_sys::fuzz_target;

const CONTENT_TYPES: [&str; 6] = [
    manifest::OCI_INDEX,
    manifest::OCI_MANIFEST,
    manifest::DOCKER_LIST,
    manifest::DOCKER_MANIFEST,
    "application/json",
    "text/plain; charset=utf-8",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else { return };
    let content_type = CONTENT_TYPES[pick as usize % CONTENT_TYPES.len()];
    match manifest::parse(content_type, body) {
        Ok(Fetched::Index(index)) => {
            let _ = manifest::select_platform(&index, &Platform::host());
            if let Some(arm) = Platform::parse("linux/arm64/v8") {
                let _ = manifest::select_platform(&index, &arm);
            }
        }
        Ok(Fetched::Image(image)) => {
            for layer in image.layers() {
                let _ = manifest::layer_compression(&layer.media_type().to_string());
            }
        }
        Err(e) => drop(e.to_string()),
    }
});
