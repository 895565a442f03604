//! Image configs (untrusted, from the image author): both readers berth has, the
//! store's (oci-spec, at pull) and `--image-config FILE`'s, never panic.
#![no_main]

use berth_engine::image::ImageConfig;
use libfuzzer_sys::fuzz_target;
use oci_spec::image::ImageConfiguration;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = ImageConfiguration::from_reader(data) {
        let _ = config.rootfs().diff_ids().len();
        let _ = config.config().as_ref().map(|c| (c.env().clone(), c.entrypoint().clone(), c.cmd().clone(), c.working_dir().clone(), c.user().clone()));
    }
    let path = std::env::temp_dir().join(format!("berth-fuzz-config-{}.json", std::process::id()));
    std::fs::write(&path, data).expect("write the temp config");
    let _ = ImageConfig::from_oci_json(&path);
});
