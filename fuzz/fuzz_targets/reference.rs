//! Image references as users type them: parsing never panics, and a parsed
//! reference prints as a reference that parses back to itself.
#![no_main]

use berth_engine::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(reference) = Reference::parse(text) else { return };
    let shown = reference.to_string();
    let again = Reference::parse(&shown).unwrap_or_else(|e| panic!("{text:?} parsed, but its display {shown:?} does not: {e}"));
    assert_eq!(again.to_string(), shown, "display of {text:?} is not stable");
    let _ = (reference.name(), reference.manifest_ref(), reference.endpoint("registry-1.docker.io"));
});
