//! What `berth-pbs` (the hooks, run as root by pbs_mom or OpenPBS's hooks) and
//! `berth-pbs-enter` (the setuid launcher of OpenPBS jobs) share: the launch, and the
//! record through which a failed begin hook reaches the launch.

pub mod launch;
