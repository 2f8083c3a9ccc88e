//! Starting an executor without copying the worker.
//!
//! std (and so `tokio::process`) starts a child with `posix_spawn` only when it has no
//! `pre_exec` hook; the executor needs one (`PR_SET_PDEATHSIG`), so std would `fork` the
//! whole worker for every task: a page-table copy of all its memory, copy-on-write faults
//! afterwards, and a teardown at `exec`. That was a quarter of the worker's CPU at a few
//! hundred tasks/s (see `docs/benchmarks.md`).
//!
//! This module does what glibc's `posix_spawn` does — `clone(CLONE_VM | CLONE_VFORK)` on a
//! small stack of its own, so the child borrows the worker's memory until it calls
//! `execve` — plus the steps `posix_spawn` has no attribute for: the parent-death signal
//! and, for the egress jail, a new (user and) network namespace. A child that needs a new
//! user namespace must change process-wide state (`PR_SET_DUMPABLE` is a property of the
//! address space), so that one is cloned without `CLONE_VM`: a plain fork.
//!
//! The child routine runs in memory shared with the worker: it makes raw syscalls on data
//! prepared before the clone and nothing else — no allocation, no locks, no panics. All
//! signals are blocked around the clone so that none of the worker's handlers can run in
//! the child; the child resets handled signals (and `SIGPIPE`, which Rust ignores) to their
//! defaults and unblocks everything just before `execve`, as std does. A failure before
//! `execve` reaches the parent through a close-on-exec pipe (empty means it exec'd).
//!
//! The exit status comes through a pidfd, which Tokio polls like any other fd; `waitpid`
//! on the exact pid reaps it. Nothing else in the worker waits on arbitrary pids.
#![allow(unsafe_code)]

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt, process::ExitStatusExt},
    },
    path::{Path, PathBuf},
    process::ExitStatus,
};

use tokio::{
    io::unix::AsyncFd,
    net::unix::pipe::{Receiver, Sender},
};

use crate::sys::Isolation;

/// Stack of the cloned child until it calls `execve` (it only makes syscalls).
const CHILD_STACK: usize = 64 * 1024;

/// Where the child failed, sent with the errno through the error pipe.
const STAGES: [&str; 6] = [
    "uid/gid map of the new user namespace",
    "new process group",
    "parent-death signal",
    "standard input/output",
    "exec",
    "parent exited before the child started",
];

/// What to start.
#[derive(Debug)]
pub struct Command {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    stdin_piped: bool,
    isolation: Isolation,
}

impl Command {
    /// `argv[0]` is resolved against the child's own `PATH` (from `env`) when it has no
    /// slash, as `execvp` would; the child gets exactly `env`, stdout and stderr piped, its
    /// own process group and SIGKILL when the worker dies.
    pub fn new<A: AsRef<OsStr>>(argv: &[A], env: &[(String, String)]) -> io::Result<Self> {
        let first = argv
            .first()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty command"))?;
        let path_var = env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map(|(_, v)| v.as_str());
        let program = resolve(Path::new(first.as_ref()), path_var)?;
        Ok(Self {
            program: cstring(program.as_os_str().as_bytes())?,
            argv: argv
                .iter()
                .map(|a| cstring(a.as_ref().as_bytes()))
                .collect::<io::Result<_>>()?,
            envp: env
                .iter()
                .map(|(k, v)| {
                    if k.is_empty() || k.contains('=') {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{k:?} is not an environment variable name"),
                        ));
                    }
                    cstring(format!("{k}={v}").as_bytes())
                })
                .collect::<io::Result<_>>()?,
            stdin_piped: false,
            isolation: Isolation::None,
        })
    }

    /// Gives the child a pipe on stdin (otherwise `/dev/null`).
    pub fn stdin_piped(mut self) -> Self {
        self.stdin_piped = true;
        self
    }

    /// Starts the child in new namespaces.
    pub fn isolation(mut self, isolation: Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// Starts the child. Must be called on a thread that outlives it (a Tokio runtime
    /// worker): `PR_SET_PDEATHSIG` fires when the *thread* that cloned the child exits.
    pub fn spawn(&self) -> io::Result<Child> {
        let (stdin_child, stdin_parent) = if self.stdin_piped {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            let null = std::fs::File::open("/dev/null")?;
            (OwnedFd::from(null), None)
        };
        let (stdout_parent, stdout_child) = pipe()?;
        let (stderr_parent, stderr_child) = pipe()?;
        let (err_read, err_write) = pipe()?;
        // The child moves these onto 0, 1 and 2; none may already be one of those (a worker
        // started with a closed stdin would hand out fd 0 for the first pipe).
        let stdin_child = above_stdio(stdin_child)?;
        let stdout_child = above_stdio(stdout_child)?;
        let stderr_child = above_stdio(stderr_child)?;

        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let uid_map = format!("0 {} 1", nix::unistd::geteuid().as_raw());
        let gid_map = format!("0 {} 1", nix::unistd::getegid().as_raw());
        let data = ChildData {
            program: self.program.as_ptr(),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            stdio: [
                stdin_child.as_raw_fd(),
                stdout_child.as_raw_fd(),
                stderr_child.as_raw_fd(),
            ],
            err_fd: err_write.as_raw_fd(),
            parent: std::process::id() as libc::pid_t,
            user_ns: self.isolation == Isolation::UserNetNs,
            uid_map: uid_map.as_bytes(),
            gid_map: gid_map.as_bytes(),
        };
        let flags = match self.isolation {
            Isolation::None => libc::CLONE_VM | libc::CLONE_VFORK,
            Isolation::NetNs => libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_NEWNET,
            // Not CLONE_VM: see the module documentation.
            Isolation::UserNetNs => libc::CLONE_NEWUSER | libc::CLONE_NEWNET,
        } | libc::SIGCHLD;
        let mut stack = vec![0u8; CHILD_STACK];
        // SAFETY: the stack is ours and outlives the child's use of it (CLONE_VFORK
        // suspends this thread until the child execs or exits; without CLONE_VM the child
        // has its own copy). `data` and everything it points to stay alive and unmoved
        // until clone returns; the child routine only makes syscalls on them. The top of
        // the stack is aligned down to 16 bytes as the ABI requires.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK);
            let top = top.sub(top as usize % 16);
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            let pid = libc::clone(
                child_main,
                top.cast(),
                flags,
                (&data as *const ChildData<'_>).cast_mut().cast(),
            );
            let clone_err = io::Error::last_os_error();
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if pid < 0 {
                return Err(clone_err);
            }
            pid
        };
        drop((stdin_child, stdout_child, stderr_child, err_write));
        drop(stack);

        if let Some(e) = child_error(&err_read) {
            reap_blocking(pid);
            return Err(e);
        }
        // SAFETY: plain syscall; the pid is our unreaped child, so it cannot be reused.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if pidfd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: plain syscall on our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap_blocking(pid);
            return Err(e);
        }
        // SAFETY: pidfd_open returned a new fd that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let mut child = Child {
            pid,
            pidfd: None,
            status: None,
            stdin: None,
            stdout: None,
            stderr: None,
        };
        // From here on, dropping `child` kills and reaps the process.
        // SAFETY: an OwnedFd keeps its one fd open, unchanged, for as long as it lives.
        let pidfd =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        child.pidfd = Some(pidfd);
        child.stdin = stdin_parent.map(Sender::from_owned_fd).transpose()?;
        child.stdout = Some(Receiver::from_owned_fd(stdout_parent)?);
        child.stderr = Some(Receiver::from_owned_fd(stderr_parent)?);
        Ok(child)
    }
}

/// A started executor. Dropping it before [`Child::wait`] returned kills it (SIGKILL to the
/// process itself) and reaps it in the background.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    pidfd: Option<AsyncFd<OwnedFd>>,
    status: Option<ExitStatus>,
    /// The write end of its stdin, when piped.
    pub stdin: Option<Sender>,
    /// The read end of its stdout.
    pub stdout: Option<Receiver>,
    /// The read end of its stderr.
    pub stderr: Option<Receiver>,
}

impl Child {
    /// Its pid, which is also its process group id.
    pub fn id(&self) -> u32 {
        self.pid as u32
    }

    /// Waits for it to exit and reaps it. Cancel-safe; returns the same status again when
    /// called after it exited.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let pidfd = self
            .pidfd
            .as_ref()
            .ok_or_else(|| io::Error::other("executor pidfd missing"))?;
        loop {
            let mut ready = pidfd.readable().await?;
            match try_reap(self.pid)? {
                Some(status) => {
                    self.status = Some(status);
                    return Ok(status);
                }
                None => ready.clear_ready(),
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: plain syscall on our own unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if matches!(try_reap(self.pid), Ok(Some(_))) {
            return;
        }
        let pid = self.pid;
        match (self.pidfd.take(), tokio::runtime::Handle::try_current()) {
            (Some(pidfd), Ok(rt)) => {
                rt.spawn(async move {
                    let _ = pidfd.readable().await;
                    reap_blocking(pid);
                });
            }
            _ => {
                std::thread::spawn(move || reap_blocking(pid));
            }
        }
    }
}

/// What the child routine needs, all prepared before the clone.
struct ChildData<'a> {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [RawFd; 3],
    err_fd: RawFd,
    parent: libc::pid_t,
    user_ns: bool,
    uid_map: &'a [u8],
    gid_map: &'a [u8],
}

/// The cloned child, between `clone` and `execve`. Only raw syscalls on `ChildData`.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `ChildData` the parent keeps alive until we exec or exit (vfork)
    // or our own copy of it (fork); every call below is an async-signal-safe syscall on it.
    unsafe {
        let d = &*(arg as *const ChildData<'_>);
        let fail = |stage: u8| -> libc::c_int {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 5];
            msg[..4].copy_from_slice(&errno.to_ne_bytes());
            msg[4] = stage;
            libc::write(d.err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        // None of the worker's signal handlers may run here: reset every handled signal
        // (ignored ones stay ignored across exec, except SIGPIPE, which Rust ignores).
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue; // glibc's internal signals
            }
            if old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if d.user_ns {
            // After a privilege drop the worker is not dumpable, which makes its /proc
            // files root's; this child (its own address space, about to exec) takes them
            // back so it can map itself to root in its namespace, and only there.
            if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0
                || !write_proc(c"/proc/self/setgroups", b"deny")
                || !write_proc(c"/proc/self/uid_map", d.uid_map)
                || !write_proc(c"/proc/self/gid_map", d.gid_map)
            {
                return fail(0);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(1);
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return fail(2);
        }
        if libc::getppid() != d.parent {
            *libc::__errno_location() = libc::ESRCH;
            return fail(5);
        }
        // The sources are all above 2 (see `above_stdio`), so no dup2 overwrites another.
        for (target, &fd) in d.stdio.iter().enumerate() {
            if libc::dup2(fd, target as RawFd) < 0 {
                return fail(3);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(d.program, d.argv, d.envp);
        fail(4)
    }
}

/// open + write + close of a /proc file, in the child.
///
/// # Safety
/// Async-signal-safe syscalls only.
unsafe fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> bool {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd < 0 {
        return false;
    }
    let n = libc::write(fd, data.as_ptr().cast(), data.len());
    let saved = *libc::__errno_location();
    libc::close(fd);
    *libc::__errno_location() = saved;
    n == data.len() as isize
}

/// Reads the child's report: nothing (EOF at exec) or errno and stage.
fn child_error(err_read: &OwnedFd) -> Option<io::Error> {
    let mut msg = [0u8; 5];
    let n = loop {
        // SAFETY: reading into our own buffer from our own fd.
        let n = unsafe { libc::read(err_read.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        break n;
    };
    if n == 0 {
        return None;
    }
    if n != msg.len() as isize {
        return Some(io::Error::other("the executor failed before exec"));
    }
    let errno = i32::from_ne_bytes([msg[0], msg[1], msg[2], msg[3]]);
    let stage = STAGES.get(msg[4] as usize).copied().unwrap_or("start-up");
    let os = io::Error::from_raw_os_error(errno);
    Some(io::Error::new(os.kind(), format!("{stage}: {os}")))
}

/// `waitpid(pid, WNOHANG)`: the status if it has exited.
fn try_reap(pid: libc::pid_t) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: plain syscall writing to our local.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        match r {
            0 => return Ok(None),
            r if r == pid => return Ok(Some(ExitStatus::from_raw(status))),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

/// Blocking `waitpid` for a child that is exiting anyway.
fn reap_blocking(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: plain syscall writing to our local.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
}

/// `fd` itself, or a close-on-exec copy numbered 3 or above when it is 0, 1 or 2.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    let copy = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// A close-on-exec pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment value contains a NUL byte",
        )
    })
}

/// Finds `program` as `execvp` would: as given when it has a slash, else in `PATH`.
fn resolve(program: &Path, path_var: Option<&str>) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_path_buf());
    }
    let dirs = path_var.unwrap_or("/usr/local/bin:/usr/bin:/bin");
    for dir in dirs.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(program);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{} is not in the executor's PATH ({dirs})",
            program.display()
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_all(pipe: Option<Receiver>) -> String {
        let mut text = String::new();
        pipe.unwrap().read_to_string(&mut text).await.unwrap();
        text
    }

    fn env() -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("X".into(), "1".into()),
        ]
    }

    #[tokio::test]
    async fn runs_a_child_with_exactly_its_environment_and_stdio() {
        let cmd = Command::new(&["sh", "-c", "cat; env; echo oops >&2; exit 3"], &env())
            .unwrap()
            .stdin_piped();
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello\n").await.unwrap();
        drop(stdin);
        let out = read_all(child.stdout.take()).await;
        let err = read_all(child.stderr.take()).await;
        let status = child.wait().await.unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(out.starts_with("hello\n"), "{out}");
        assert!(out.contains("X=1"), "{out}");
        assert!(
            !out.contains("HOME="),
            "the worker's environment leaked: {out}"
        );
        assert_eq!(err, "oops\n");
        assert_eq!(
            child.wait().await.unwrap().code(),
            Some(3),
            "status is kept"
        );
    }

    #[tokio::test]
    async fn child_leads_its_own_process_group_and_has_default_sigpipe() {
        let cmd = Command::new(
            &[
                "sh",
                "-c",
                "ps -o pgid= -p $$; grep -E '^Sig(Ign|Blk)' /proc/self/status",
            ],
            &env(),
        )
        .unwrap();
        let mut child = cmd.spawn().unwrap();
        let out = read_all(child.stdout.take()).await;
        assert!(child.wait().await.unwrap().success(), "{out}");
        let pgid: u32 = out.lines().next().unwrap().trim().parse().unwrap();
        assert_eq!(pgid, child.id());
        // grep's own status: nothing blocked, SIGPIPE (bit 13) not ignored.
        let ign = out.lines().find(|l| l.starts_with("SigIgn")).unwrap();
        let mask = u64::from_str_radix(ign.split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(mask & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
        assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error_before_clone() {
        let e = Command::new(&["no-such-executor-xyz"], &env()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("no-such-executor-xyz"), "{e}");
    }

    #[tokio::test]
    async fn an_exec_failure_is_reported_with_its_stage() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("not-executable");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Command::new(&[script.as_os_str()], &env())
            .unwrap()
            .spawn()
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().starts_with("exec: "), "{e}");
    }

    #[tokio::test]
    async fn dropping_a_running_child_kills_and_reaps_it() {
        let child = Command::new(&["sleep", "30"], &env())
            .unwrap()
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        drop(child);
        for _ in 0..200 {
            // ESRCH once it is killed and reaped (a zombie would still answer).
            if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("pid {pid} still exists");
    }
}
