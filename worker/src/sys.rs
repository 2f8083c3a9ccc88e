//! The few operating-system calls that need `unsafe`, kept in one small module.
//!
//! `pre_exec` runs between `fork` and `exec` in the child, where only async-signal-safe
//! calls are allowed; everything here is a single raw syscall.
#![allow(unsafe_code)]

use std::io;

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// Makes the child die with SIGKILL when the worker dies, even by SIGKILL.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits. Tokio spawns
/// children from its runtime worker threads, which live as long as the runtime, so in
/// practice that is the worker's death. The `getppid` check closes the race where the
/// worker died between `fork` and `prctl`.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure only makes async-signal-safe syscalls (prctl, getppid) and
    // touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(io::Error::other(
                    "worker exited before the executor started",
                ));
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process group `pgid`; a group already gone is not an error.
pub fn signal_group(pgid: u32, signal: Signal) {
    let Ok(pgid) = i32::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return; // never signal init's group or "every process"
    }
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => {
            tracing::warn!(pgid, signal = %signal, error = %e, "could not signal executor process group")
        }
    }
}
