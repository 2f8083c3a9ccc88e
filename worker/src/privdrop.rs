//! Dropping root: after the listener is bound and log files are open, switch to an
//! unprivileged user for good, so the worker and every executor it starts run without
//! root.
//!
//! Order matters: supplementary groups, then the gid, then the uid (after `setuid` the
//! process could no longer change its groups), then `no_new_privs` so no executor can
//! regain privileges through a set-uid binary. Finally we check that root cannot be
//! regained. glibc applies `setuid`/`setgid` to every thread of the process.

use std::path::Path;

use nix::unistd::{self, Gid, Group, Uid, User};

/// Why privileges could not be dropped.
#[derive(Debug, thiserror::Error)]
pub enum PrivDropError {
    /// No such user.
    #[error("--user {0:?} does not exist")]
    NoSuchUser(String),
    /// No such group.
    #[error("--group {0:?} does not exist")]
    NoSuchGroup(String),
    /// Switching users needs root.
    #[error("--user {user:?}: switching users needs root (the worker runs as uid {uid}); start it as root or drop --user")]
    NotRoot {
        /// Target user.
        user: String,
        /// Our uid.
        uid: u32,
    },
    /// A system call failed.
    #[error("dropping privileges failed at {step}: {errno}")]
    Syscall {
        /// Which step.
        step: &'static str,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// Root could be regained after the drop.
    #[error("privilege drop did not stick: root could be regained; refusing to run")]
    DidNotStick,
}

/// The identity the worker now runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// User id.
    pub uid: Uid,
    /// Group id.
    pub gid: Gid,
}

/// Switches to `user` (and `group`, default the user's primary group). `hand_over` paths
/// (e.g. the log directory) are chowned to the new identity first so it can keep
/// writing to them.
pub fn drop_to(
    user: &str,
    group: Option<&str>,
    hand_over: &[&Path],
) -> Result<Identity, PrivDropError> {
    let u = User::from_name(user)
        .ok()
        .flatten()
        .ok_or_else(|| PrivDropError::NoSuchUser(user.to_string()))?;
    let gid = match group {
        Some(g) => {
            Group::from_name(g)
                .ok()
                .flatten()
                .ok_or_else(|| PrivDropError::NoSuchGroup(g.to_string()))?
                .gid
        }
        None => u.gid,
    };
    let me = unistd::geteuid();
    if !me.is_root() {
        if me == u.uid && unistd::getegid() == gid {
            return Ok(Identity { uid: u.uid, gid });
        }
        return Err(PrivDropError::NotRoot {
            user: user.to_string(),
            uid: me.as_raw(),
        });
    }
    let step = |step| move |errno| PrivDropError::Syscall { step, errno };
    for p in hand_over {
        unistd::chown(*p, Some(u.uid), Some(gid)).map_err(step("chown of the log directory"))?;
    }
    unistd::setgroups(&[gid]).map_err(step("setgroups"))?;
    unistd::setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    unistd::setresuid(u.uid, u.uid, u.uid).map_err(step("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    // Verify: every id is the target, and root is out of reach.
    let ids = unistd::getresuid().map_err(step("getresuid"))?;
    let gids = unistd::getresgid().map_err(step("getresgid"))?;
    if [ids.real, ids.effective, ids.saved] != [u.uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
        || (!u.uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok())
    {
        return Err(PrivDropError::DidNotStick);
    }
    Ok(Identity { uid: u.uid, gid })
}
