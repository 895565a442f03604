//! What berth's tests build their input with, one of each for the engine's unit tests
//! and the end-to-end tests alike: tar layers written as given, hostile ones included
//! ([`layer`]); OCI images and layouts of them ([`image`]); and a fake registry serving
//! them, healthy or broken ([`registry`]). Test-only, never shipped; it never depends
//! on the engine, which takes it as a dev-dependency.

pub mod image;
pub mod layer;
pub mod registry;

pub use image::{digest, Blob, Image, MANIFEST};
pub use layer::{header, noise, tar_of, write_tar, Compression, Entry, Layer};
pub use registry::{Auth, Fault, Registry};
pub use tar::{EntryType, Header};
