//! Dropping root after the listener is bound (`--user` / `--group`).
//!
//! pingora's own `user`/`group` settings only act when it daemonizes, and then before its
//! listeners are bound, which defeats binding a privileged port. So the gateway resolves
//! the names at start-up (an unknown user is a start-up error), lets pingora bind, waits
//! until the listening socket shows up in `/proc/net/tcp{,6}` (or the Unix socket path
//! exists), and then switches group list, group and user for the whole process. A failed
//! switch exits the process: serving as root when told not to is not an option.

use std::{path::Path, time::Duration};

use nix::unistd::{Gid, Group, Uid, User};
use taskgate_shared::listen::Addr;

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
    listen: Addr,
}

impl PrivDrop {
    /// Resolves `user` and `group`; `None` when neither is given.
    pub fn resolve(
        user: Option<&str>,
        group: Option<&str>,
        listen: &Addr,
    ) -> Result<Option<Self>, PrivError> {
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
        Ok(Some(PrivDrop {
            uid,
            gid,
            listen: listen.clone(),
        }))
    }

    /// Waits (up to 30 s) for the listener, then switches identity.
    pub async fn apply_after_bind(&self) -> Result<(), PrivError> {
        wait_listening(&self.listen).await?;
        self.apply()
    }

    fn apply(&self) -> Result<(), PrivError> {
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

/// Waits (up to 30 s) until the listener on `addr` is bound.
pub async fn wait_listening(addr: &Addr) -> Result<(), PrivError> {
    let mut waited = Duration::ZERO;
    while !is_listening(addr) {
        if waited > Duration::from_secs(30) {
            return Err(PrivError::Sys(format!("{addr} was not bound within 30s")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    Ok(())
}

/// True when something listens on `addr` (our bind succeeded, or pingora would have
/// failed start-up).
fn is_listening(addr: &Addr) -> bool {
    match addr {
        Addr::Unix(path) => Path::new(path).exists(),
        Addr::Tcp(sa) => {
            let port = format!(":{:04X} ", sa.port());
            ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
                std::fs::read_to_string(f).is_ok_and(|text| {
                    text.lines().skip(1).any(|line| {
                        let mut cols = line.split_whitespace();
                        let local = cols.nth(1).unwrap_or("");
                        let state = cols.nth(1).unwrap_or("");
                        state == "0A" && format!("{local} ").ends_with(&port)
                    })
                })
            })
        }
    }
}
