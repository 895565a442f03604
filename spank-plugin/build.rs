//! Generates the SPANK bindings from the installed `slurm/spank.h`, so the same source
//! builds against whichever Slurm the node runs (22.05, 24.11, ...). The header's
//! directory is `$SLURM_INCLUDE_DIR` (default `/usr/include`); `SLURM_VERSION_NUMBER`
//! from the same headers becomes the plugin's `plugin_version`.

use std::env;
use std::path::PathBuf;

fn main() {
    let include = env::var("SLURM_INCLUDE_DIR").unwrap_or_else(|_| "/usr/include".to_string());
    let header = PathBuf::from(&include).join("slurm/spank.h");
    println!("cargo:rerun-if-env-changed=SLURM_INCLUDE_DIR");
    println!("cargo:rerun-if-changed={}", header.display());
    println!("cargo:rerun-if-changed={}", PathBuf::from(&include).join("slurm/slurm_version.h").display());

    let bindings = bindgen::Builder::default()
        .header_contents("berth-spank.h", "#include <slurm/spank.h>\n#include <slurm/slurm.h>\n")
        .clang_arg(format!("-I{include}"))
        .allowlist_function("spank_.*")
        .allowlist_function("slurm_spank_log")
        .allowlist_function("slurm_error")
        .allowlist_function("slurm_info")
        .allowlist_function("slurm_debug")
        .allowlist_type("spank_option")
        .allowlist_type("spank_item")
        .allowlist_type("spank_context")
        // slurmstepd's parsed slurm.conf (`slurm_conf`, libslurm's global of this type):
        // where the PMIx plugin keeps a step's files.
        .allowlist_type("slurm_conf_t")
        .allowlist_var("SLURM_VERSION_NUMBER")
        .allowlist_var("SLURM_(BATCH_SCRIPT|EXTERN_CONT|INTERACTIVE_STEP)")
        .allowlist_var("ESPANK_.*")
        .allowlist_var("S_.*")
        .prepend_enum_name(false)
        .layout_tests(false)
        .generate()
        .unwrap_or_else(|err| panic!("bindgen could not read {}: {err}", header.display()));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("spank.rs");
    bindings.write_to_file(&out).unwrap_or_else(|err| panic!("cannot write {}: {err}", out.display()));
}
