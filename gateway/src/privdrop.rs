//! Dropping root after the listener is bound (`--user` / `--group`).
//!
//! pingora's own `user`/`group` settings only act when it daemonizes. The gateway
//! resolves the names at start-up (an unknown user is a start-up error), binds its
//! listener, and then switches group list, group and user for the whole process before
//! any event loop starts, so no request is ever read as root. A failed switch is a
//! start-up error: serving as root when told not to is not an option.

use nix::unistd::{Gid, Group, Uid, User};

/// Why a privilege drop could not be prepared or done.
#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    /// The user does not exist.
    #[error("--user {0}: no such user")]
    NoUser(String),
    /// The group does not exist.
    #[error("--group {0}: no such group")]
    NoGroup(String),
    /// Switching needs root.
    #[error("--user/--group need the gateway to start as root (it runs as uid {0})")]
    NotRoot(u32),
    /// A system call failed.
    #[error("dropping privileges: {0}")]
    Sys(String),
}

/// The resolved identity to switch to.
#[derive(Debug, Clone)]
pub struct PrivDrop {
    uid: Uid,
    gid: Gid,
}

impl PrivDrop {
    /// Resolves `user` and `group`; `None` when neither is given.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Self>, PrivError> {
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let u = match user {
            Some(name) => Some(
                User::from_name(name)
                    .map_err(|e| PrivError::Sys(e.to_string()))?
                    .ok_or_else(|| PrivError::NoUser(name.to_string()))?,
            ),
            None => None,
        };
        let gid = match group {
            Some(name) => {
                Group::from_name(name)
                    .map_err(|e| PrivError::Sys(e.to_string()))?
                    .ok_or_else(|| PrivError::NoGroup(name.to_string()))?
                    .gid
            }
            None => u.as_ref().map_or_else(Gid::current, |u| u.gid),
        };
        let uid = u.map_or_else(Uid::current, |u| u.uid);
        if !Uid::effective().is_root() && (uid != Uid::effective() || gid != Gid::effective()) {
            return Err(PrivError::NotRoot(Uid::effective().as_raw()));
        }
        Ok(Some(PrivDrop { uid, gid }))
    }

    /// Switches identity (call once the listener is bound).
    pub fn apply(&self) -> Result<(), PrivError> {
        taskgate_shared::privdrop::switch_to(self.uid, self.gid)
            .map_err(|e| PrivError::Sys(e.to_string()))?;
        tracing::info!(
            uid = self.uid.as_raw(),
            gid = self.gid.as_raw(),
            "dropped privileges after binding"
        );
        Ok(())
    }
}
