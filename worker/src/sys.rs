//! The few operating-system calls that need `unsafe`, kept in one small module:
//! the executor's pre-exec steps (namespaces, parent-death signal) and bringing up
//! loopback in a fresh network namespace.
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

/// Installs the child's pre-exec steps: optionally a new (user and) network namespace,
/// then `PR_SET_PDEATHSIG` so the child dies with SIGKILL when the worker dies, even by
/// SIGKILL.
///
/// The namespace comes first because entering a user namespace changes credentials,
/// which clears the parent-death signal. `PR_SET_PDEATHSIG` fires when the *thread* that
/// forked the child exits; Tokio spawns children from its runtime worker threads, which
/// live as long as the runtime. The `getppid` check closes the race where the worker
/// died between `fork` and `prctl`.
pub fn child_hooks(cmd: &mut tokio::process::Command, isolation: Isolation) {
    let parent = std::process::id() as libc::pid_t;
    let flags = match isolation {
        Isolation::None => 0,
        Isolation::NetNs => libc::CLONE_NEWNET,
        Isolation::UserNetNs => libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
    };
    // In a new user namespace the child maps itself to root there (and only there), so
    // the egress jail keeps the capability to bring its loopback up after exec. The map
    // lines are built here, before fork: the child may not allocate.
    let uid_map = format!("0 {} 1", nix::unistd::geteuid().as_raw());
    let gid_map = format!("0 {} 1", nix::unistd::getegid().as_raw());
    let map_ids = isolation == Isolation::UserNetNs;
    // SAFETY: the closure only makes async-signal-safe syscalls (unshare, open, write,
    // close, prctl, getppid) on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            if flags != 0 && libc::unshare(flags) != 0 {
                return Err(io::Error::last_os_error());
            }
            if map_ids {
                // After a privilege drop the process is not dumpable, which makes its
                // /proc files root's; the child (about to exec anyway) takes them back.
                // The worker itself stays non-dumpable, so tasks cannot ptrace it.
                if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                write_proc(c"/proc/self/setgroups", b"deny")?;
                write_proc(c"/proc/self/uid_map", uid_map.as_bytes())?;
                write_proc(c"/proc/self/gid_map", gid_map.as_bytes())?;
            }
            set_pdeathsig(parent)
        });
    }
}

/// open + write + close, for /proc files in a pre-exec hook.
///
/// # Safety
/// Async-signal-safe; `path` is NUL-terminated by construction.
unsafe fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = libc::write(fd, data.as_ptr().cast(), data.len());
    let err = io::Error::last_os_error();
    libc::close(fd);
    if n != data.len() as isize {
        return Err(err);
    }
    Ok(())
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
