//! The one privilege drop both binaries use once their listeners are bound.
//!
//! Order matters: supplementary groups, then the gid, then the uid (after `setuid` the
//! process could no longer change its groups), then `no_new_privs` so no child can
//! regain privileges through a set-uid binary. Finally the switch is checked: every id
//! is the target and root cannot be regained. glibc applies `setresuid`/`setresgid` to
//! every thread of the process.

use nix::unistd::{self, Gid, Uid};

/// A system call of the drop failed, or the drop did not stick.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// A system call failed.
    #[error("dropping privileges failed at {step}: {errno}")]
    Syscall {
        /// Which step.
        step: &'static str,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// Root could be regained, or an id is not the target.
    #[error("privilege drop did not stick: root could be regained; refusing to run")]
    DidNotStick,
}

/// Switches the whole process to `uid`/`gid` for good (needs root unless both are
/// already the process's ids).
pub fn switch_to(uid: Uid, gid: Gid) -> Result<(), SwitchError> {
    let step = |step| move |errno| SwitchError::Syscall { step, errno };
    if unistd::geteuid().is_root() {
        unistd::setgroups(&[gid]).map_err(step("setgroups"))?;
    }
    unistd::setresgid(gid, gid, gid).map_err(step("setresgid"))?;
    unistd::setresuid(uid, uid, uid).map_err(step("setresuid"))?;
    nix::sys::prctl::set_no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
    let ids = unistd::getresuid().map_err(step("getresuid"))?;
    let gids = unistd::getresgid().map_err(step("getresgid"))?;
    if [ids.real, ids.effective, ids.saved] != [uid; 3]
        || [gids.real, gids.effective, gids.saved] != [gid; 3]
        || (!uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok())
    {
        return Err(SwitchError::DidNotStick);
    }
    Ok(())
}
