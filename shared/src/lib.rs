//! berth's engine, shared by the Slurm plugin, the Torque/PBS hooks and the `berth`
//! command. Modules follow an image's way to a running job:
//! `reference` -> `registry` -> `store` -> `unpack` -> `rootfs` -> `container`
//! -> `wiring` -> `teardown`. `config` is the admin's settings, read by all of them;
//! `runtime` the runtime dir's layout, locks and pins, which `container`, `wiring`,
//! `teardown` and the adapters go through for every path in it; `privileged` what
//! root code may take from whoever started it.

pub mod config;
pub mod container;
pub mod fsmode;
pub mod identity;
pub mod image;
pub mod lock;
pub mod privileged;
pub mod rootfs;
pub mod runtime;
pub mod teardown;
pub mod wiring;
pub mod reference;
pub mod registry;
pub mod store;
pub mod sys;
pub mod unpack;
