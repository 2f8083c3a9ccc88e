//! The few operating-system calls that need `unsafe` outside [`crate::spawn`]: the egress
//! jail's pre-exec steps for its task, bringing up loopback in a fresh network namespace,
//! and signalling an executor's process group.
//!
//! `pre_exec` runs between `fork` and `exec` in the child, where only async-signal-safe
//! calls are allowed; everything here is a single raw syscall.
#![allow(unsafe_code)]

use std::io;

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

/// Which namespaces an executor gets (egress enforcement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// The worker's own network.
    None,
    /// A new network namespace (the worker is root).
    NetNs,
    /// A new user and network namespace (unprivileged; needs user namespaces).
    UserNetNs,
}

/// Pre-exec for the task inside the egress jail: dies with the jail, and gains no
/// capabilities from running as (namespace) root: `SECBIT_NOROOT` makes exec grant uid 0
/// nothing, locked so the task cannot undo it.
pub fn jailed_task_hooks(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    // SAFETY: plain syscalls without pointers.
    unsafe {
        cmd.pre_exec(move || {
            let bits = SECBIT_NOROOT
                | SECBIT_NOROOT_LOCKED
                | SECBIT_NO_SETUID_FIXUP
                | SECBIT_NO_SETUID_FIXUP_LOCKED;
            if libc::prctl(libc::PR_SET_SECUREBITS, bits, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            set_pdeathsig(parent)
        });
    }
}

fn set_pdeathsig(parent: libc::pid_t) -> io::Result<()> {
    // SAFETY: plain syscalls without pointers.
    unsafe {
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
                "the parent exited before the child started",
            ));
        }
    }
    Ok(())
}

/// Brings the loopback interface of the current network namespace up (a fresh namespace
/// starts with it down).
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: `ifreq` is plain data, zero-initialised, with a NUL-terminated name; the
    // socket is closed on every path.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        let result = if libc::ioctl(fd, libc::SIOCGIFFLAGS as _, &mut req) != 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS as _, &req) != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        libc::close(fd);
        result
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
