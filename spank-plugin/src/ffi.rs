//! The Slurm side of the boundary: bindings generated from the installed `slurm/spank.h`
//! and the few safe wrappers the rest of the plugin uses. Owns every call into Slurm;
//! never decides anything about containers.

use std::ffi::{c_char, c_int, CStr, CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::fmt;

#[allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, clippy::all)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/spank.rs"));
}

pub use bindings::{spank_t, SLURM_BATCH_SCRIPT, SLURM_EXTERN_CONT, SLURM_INTERACTIVE_STEP, SLURM_VERSION_NUMBER};

/// What a SPANK callback returns on success / failure.
pub const SUCCESS: c_int = 0;
pub const FAILURE: c_int = -1;

/// The Slurm program the plugin is loaded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// srun on the submit host.
    Local,
    /// slurmstepd on a compute node.
    Remote,
    /// sbatch / salloc.
    Allocator,
    /// slurmd itself.
    Slurmd,
    /// The job prolog / epilog run by slurmd.
    JobScript,
    Unknown,
}

pub fn context() -> Context {
    // SAFETY: spank_context takes no arguments and only reads Slurm's global state.
    match unsafe { bindings::spank_context() } {
        bindings::S_CTX_LOCAL => Context::Local,
        bindings::S_CTX_REMOTE => Context::Remote,
        bindings::S_CTX_ALLOCATOR => Context::Allocator,
        bindings::S_CTX_SLURMD => Context::Slurmd,
        bindings::S_CTX_JOB_SCRIPT => Context::JobScript,
        _ => Context::Unknown,
    }
}

/// A failed SPANK call: which one and Slurm's own words for the code.
#[derive(Debug)]
pub struct SpankError {
    call: &'static str,
    code: u32,
}

impl fmt::Display for SpankError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: spank_strerror returns a pointer to a static string (or NULL).
        let text = unsafe { bindings::spank_strerror(self.code) };
        let text = if text.is_null() {
            "unknown error".into()
        } else {
            // SAFETY: non-NULL, NUL-terminated, static storage in Slurm.
            unsafe { CStr::from_ptr(text) }.to_string_lossy()
        };
        write!(f, "{} failed: {} ({})", self.call, text, self.code)
    }
}

impl std::error::Error for SpankError {}

fn check(call: &'static str, code: u32) -> Result<(), SpankError> {
    if code == bindings::ESPANK_SUCCESS {
        Ok(())
    } else {
        Err(SpankError { call, code })
    }
}

/// A string for C; interior NULs (which no valid value has) become an empty string.
fn cstring(text: &str) -> CString {
    CString::new(text).unwrap_or_default()
}

fn os_cstring(text: &OsStr) -> CString {
    CString::new(text.as_bytes()).unwrap_or_default()
}

/// The handle Slurm passes to a callback. Slurm checks the handle's magic itself and
/// answers `ESPANK_BAD_ARG` for a bad one, so every method is safe to call.
pub struct Spank(spank_t);

impl Spank {
    pub fn new(raw: spank_t) -> Spank {
        Spank(raw)
    }

    fn get_u32(&self, item: bindings::spank_item, call: &'static str) -> Result<u32, SpankError> {
        let mut value: u32 = 0;
        // SAFETY: for these items spank_get_item takes exactly one `uint32_t *` (or the
        // same-sized uid_t/gid_t *) after the item, which `&mut value` is.
        let code = unsafe { bindings::spank_get_item(self.0, item, &mut value as *mut u32) };
        check(call, code).map(|()| value)
    }

    pub fn uid(&self) -> Result<u32, SpankError> {
        self.get_u32(bindings::S_JOB_UID, "spank_get_item(S_JOB_UID)")
    }

    pub fn gid(&self) -> Result<u32, SpankError> {
        self.get_u32(bindings::S_JOB_GID, "spank_get_item(S_JOB_GID)")
    }

    pub fn job_id(&self) -> Result<u32, SpankError> {
        self.get_u32(bindings::S_JOB_ID, "spank_get_item(S_JOB_ID)")
    }

    pub fn step_id(&self) -> Result<u32, SpankError> {
        self.get_u32(bindings::S_JOB_STEPID, "spank_get_item(S_JOB_STEPID)")
    }

    /// The global rank of the task being set up (task callbacks only).
    pub fn task_global_id(&self) -> Result<u32, SpankError> {
        self.get_u32(bindings::S_TASK_GLOBAL_ID, "spank_get_item(S_TASK_GLOBAL_ID)")
    }

    pub fn supplementary_gids(&self) -> Result<Vec<u32>, SpankError> {
        let mut gids: *mut u32 = std::ptr::null_mut();
        let mut count: c_int = 0;
        // SAFETY: S_JOB_SUPPLEMENTARY_GIDS takes (gid_t **, int *); Slurm keeps ownership
        // of the array, which we copy before returning.
        let code = unsafe {
            bindings::spank_get_item(self.0, bindings::S_JOB_SUPPLEMENTARY_GIDS, &mut gids as *mut *mut u32, &mut count as *mut c_int)
        };
        check("spank_get_item(S_JOB_SUPPLEMENTARY_GIDS)", code)?;
        if gids.is_null() || count <= 0 {
            return Ok(Vec::new());
        }
        // SAFETY: Slurm returned `count` valid gid_t entries at `gids`.
        Ok(unsafe { std::slice::from_raw_parts(gids, count as usize) }.to_vec())
    }

    /// The step's command line (for the batch step: the script's path).
    pub fn argv(&self) -> Result<Vec<String>, SpankError> {
        let mut argc: c_int = 0;
        let mut argv: *mut *mut c_char = std::ptr::null_mut();
        // SAFETY: S_JOB_ARGV takes (int *, char ***); Slurm keeps ownership, we copy.
        let code = unsafe { bindings::spank_get_item(self.0, bindings::S_JOB_ARGV, &mut argc as *mut c_int, &mut argv as *mut *mut *mut c_char) };
        check("spank_get_item(S_JOB_ARGV)", code)?;
        if argv.is_null() || argc <= 0 {
            return Ok(Vec::new());
        }
        // SAFETY: argv has argc entries, each NULL or a NUL-terminated string.
        let entries = unsafe { std::slice::from_raw_parts(argv, argc as usize) };
        Ok(entries
            .iter()
            .filter(|p| !p.is_null())
            // SAFETY: checked non-NULL above; NUL-terminated per Slurm's contract.
            .map(|&p| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
            .collect())
    }

    /// A variable of the job's (or, in task callbacks, the task's) environment.
    pub fn getenv(&self, name: &str) -> Result<Option<String>, SpankError> {
        let name = cstring(name);
        let mut len = 4096usize;
        loop {
            let mut buf = vec![0u8; len];
            // SAFETY: buf is writable for `len` bytes; name is NUL-terminated.
            let code = unsafe { bindings::spank_getenv(self.0, name.as_ptr(), buf.as_mut_ptr() as *mut c_char, len as c_int) };
            match code {
                bindings::ESPANK_ENV_NOEXIST => return Ok(None),
                bindings::ESPANK_NOSPACE if len < (1 << 20) => len *= 4,
                _ => {
                    check("spank_getenv", code)?;
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
                }
            }
        }
    }

    pub fn setenv(&self, name: &OsStr, value: &OsStr) -> Result<(), SpankError> {
        let (name, value) = (os_cstring(name), os_cstring(value));
        // SAFETY: both strings are NUL-terminated and outlive the call (Slurm copies them).
        let code = unsafe { bindings::spank_setenv(self.0, name.as_ptr(), value.as_ptr(), 1) };
        check("spank_setenv", code)
    }

    /// Registers one option; the table entry is leaked on purpose, since Slurm may keep
    /// a pointer to it for the life of the process.
    pub fn register_option(
        &self,
        name: &str,
        arginfo: Option<&str>,
        usage: &str,
        val: c_int,
        cb: unsafe extern "C" fn(c_int, *const c_char, c_int) -> c_int,
    ) -> Result<(), SpankError> {
        let option = Box::leak(Box::new(bindings::spank_option {
            name: cstring(name).into_raw(),
            arginfo: arginfo.map_or(std::ptr::null_mut(), |a| cstring(a).into_raw()),
            usage: cstring(usage).into_raw(),
            has_arg: c_int::from(arginfo.is_some()),
            val,
            cb: Some(cb),
        }));
        // SAFETY: `option` points to a fully initialised, never freed spank_option.
        let code = unsafe { bindings::spank_option_register(self.0, option) };
        check("spank_option_register", code)
    }
}

/// The argument Slurm passes to an option callback.
pub fn optarg(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: Slurm passes NULL or a NUL-terminated string valid for the callback.
    Some(unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned())
}

/// The plugin's arguments from `plugstack.conf`.
pub fn plugin_args(argc: c_int, argv: *mut *mut c_char) -> Vec<String> {
    if argv.is_null() || argc <= 0 {
        return Vec::new();
    }
    // SAFETY: Slurm passes argc valid entries in argv for the duration of the callback.
    let entries = unsafe { std::slice::from_raw_parts(argv, argc as usize) };
    entries.iter().filter_map(|&p| optarg(p)).collect()
}

const FORMAT: &CStr = c"%s";

/// An error line: in slurmstepd it reaches the user's srun or job output, and the log.
pub fn log_error(message: &str) {
    let message = cstring(message);
    // SAFETY: "%s" consumes exactly the one NUL-terminated string passed.
    unsafe { bindings::slurm_error(FORMAT.as_ptr(), message.as_ptr()) }
}

pub fn log_debug(message: &str) {
    let message = cstring(message);
    // SAFETY: as in log_error.
    unsafe { bindings::slurm_debug(FORMAT.as_ptr(), message.as_ptr()) }
}

pub fn log_info(message: &str) {
    let message = cstring(message);
    // SAFETY: as in log_error.
    unsafe { bindings::slurm_info(FORMAT.as_ptr(), message.as_ptr()) }
}

/// The node settings of slurm.conf the plugin needs, as the loading Slurm program parsed
/// them (and resolved its defaults).
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// `SlurmdSpoolDir`.
    pub spool_dir: std::path::PathBuf,
    /// `TmpFS`.
    pub tmp_fs: Option<std::path::PathBuf>,
    /// The slurm.conf file read (its directory holds mpi.conf).
    pub conf_file: Option<std::path::PathBuf>,
}

/// Reads slurmstepd's own parsed config: libslurm's global `slurm_conf`, of the type
/// `slurm_conf_t` that slurm.h declares. There is no SPANK item for these, and asking
/// slurmctld (`scontrol show config`) would be network work inside slurmstepd.
/// `None` outside a Slurm program or before it loaded its config.
pub fn node_settings() -> Option<NodeSettings> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only searches the
    // loaded objects' symbol tables.
    let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"slurm_conf".as_ptr()) };
    if symbol.is_null() {
        return None;
    }
    // SAFETY: `slurm_conf` is libslurm's `slurm_conf_t`, laid out as in the slurm.h this
    // plugin was built against, which Slurm's loader guarantees is the running
    // release's (plugin_version). slurmstepd filled it before loading plugins; it is
    // only read here, in a hook of the thread that runs the plugin stack.
    let conf = unsafe { &*(symbol as *const bindings::slurm_conf_t) };
    let path = |ptr: *mut c_char| -> Option<std::path::PathBuf> {
        if ptr.is_null() {
            return None;
        }
        // SAFETY: non-NULL strings of slurm_conf are NUL-terminated and live as long as
        // the config; the bytes are copied out at once.
        let bytes = unsafe { CStr::from_ptr(ptr) }.to_bytes();
        (!bytes.is_empty()).then(|| std::path::PathBuf::from(OsStr::from_bytes(bytes)))
    };
    Some(NodeSettings { spool_dir: path(conf.slurmd_spooldir)?, tmp_fs: path(conf.tmp_fs), conf_file: path(conf.slurm_conf) })
}
