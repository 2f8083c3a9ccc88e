//! Dropping root: after the listener is bound and log files are open, switch to an
//! unprivileged user for good, so the worker and every executor it starts run without
//! root.
//!
//! The switch itself (groups, gid, uid, `no_new_privs`, the check that root cannot be
//! regained) is `taskgate_shared::privdrop::switch_to`, shared with the gateway.

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
    /// Handing a path over to the new identity failed.
    #[error("cannot chown {path} to the service user: {errno}")]
    Chown {
        /// The path.
        path: String,
        /// The error.
        errno: nix::errno::Errno,
    },
    /// The switch itself failed.
    #[error(transparent)]
    Switch(#[from] taskgate_shared::privdrop::SwitchError),
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
    for p in hand_over {
        unistd::chown(*p, Some(u.uid), Some(gid)).map_err(|errno| PrivDropError::Chown {
            path: p.display().to_string(),
            errno,
        })?;
    }
    taskgate_shared::privdrop::switch_to(u.uid, gid)?;
    Ok(Identity { uid: u.uid, gid })
}
