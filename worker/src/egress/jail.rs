//! `worker egress-jail`: the first process inside an executor's private network
//! namespace.
//!
//! The worker starts it with a fresh network namespace (see `spawn::Command::isolation`), so its
//! only interface is a loopback that starts down. It brings loopback up, listens on
//! `127.0.0.1:PORT` and relays every connection to the worker's egress proxy over a Unix
//! socket — path-named Unix sockets are reached through the file system, not the network
//! namespace. Then it runs the task and exits with its status. A task that ignores
//! `HTTPS_PROXY` finds no route anywhere.

use std::{
    io,
    net::{Shutdown, TcpListener, TcpStream},
    os::unix::{net::UnixStream, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::Command,
};

use crate::sys;

/// Exit status when the jail itself cannot be set up.
pub const JAIL_FAILED: i32 = 125;

/// Runs the jail; returns the exit code for the process.
pub fn run(socket: &Path, port: u16, argv: &[String]) -> i32 {
    let Some((program, args)) = argv.split_first() else {
        eprintln!("egress-jail: no command given");
        return JAIL_FAILED;
    };
    if let Err(e) = sys::loopback_up() {
        eprintln!("egress-jail: cannot bring up loopback in the task's network namespace: {e}");
        return JAIL_FAILED;
    }
    let listener = match TcpListener::bind(("127.0.0.1", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("egress-jail: cannot listen on 127.0.0.1:{port}: {e}");
            return JAIL_FAILED;
        }
    };
    let socket = socket.to_path_buf();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let _ = relay(conn, &socket);
            });
        }
    });
    let mut cmd = Command::new(program);
    cmd.args(args);
    sys::jailed_task_hooks(&mut cmd);
    match cmd.status() {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(e) => {
            eprintln!("egress-jail: cannot start {program:?}: {e}");
            127
        }
    }
}

fn relay(tcp: TcpStream, socket: &PathBuf) -> io::Result<()> {
    let unix = UnixStream::connect(socket)?;
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}
