//! Payload secrecy: a canary payload never shows in `ps`, `worker status` or any log
//! line in `stdin` and `file` modes; the payload file is private and gone afterwards,
//! also after a timeout; `inline` is refused by the prod build.

mod common;

use std::time::Duration;

use common::Env;
use taskgate_test_support::eventually::eventually_blocking;

const CANARY: &str = "CANARY-7f3a9c1e-payload";

fn ps_output() -> String {
    let out = std::process::Command::new("ps")
        .args(["-eww", "-o", "pid,args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn enqueue_canary(env: &Env) -> i64 {
    let payload = format!("{{\"note\":\"{CANARY}\"}}");
    let out = env.run_with_stdin(
        &["enqueue", "--module", "tasks.secret", "--payload-stdin"],
        payload.as_bytes(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains(CANARY));
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn canary_stays_hidden(mode: &str, script: &str) {
    let env = Env::sqlite().await;
    let runner = env.script("exec.sh", script);
    let id = enqueue_canary(&env);
    let mut w = env.worker("w", &runner, &["--payload-mode", mode, "--drain"]);
    // While the executor runs, look at every process's argv.
    env.wait_ledger("running", Duration::from_secs(20));
    let ps = ps_output();
    assert!(
        ps.contains("exec.sh"),
        "the executor should be visible in ps"
    );
    assert!(
        !ps.contains(CANARY),
        "payload visible in ps ({mode}):\n{ps}"
    );
    assert!(w.wait(Duration::from_secs(30)).success(), "{}", w.logs());
    let status = env.ok(&["status", &id.to_string()]);
    assert!(status.contains("\"succeeded\""), "{status}");
    assert!(!status.contains(CANARY));
    assert!(!w.logs().contains(CANARY), "payload in worker logs");
    // The executor really got the payload.
    assert!(
        env.ledger_lines().iter().any(|l| l == "got-canary"),
        "{:?}",
        env.ledger_lines()
    );
}

#[tokio::test]
async fn stdin_mode_keeps_the_payload_out_of_ps_status_and_logs() {
    canary_stays_hidden(
        "stdin",
        "payload=$(cat)\necho running >> LEDGER\nsleep 1\ncase \"$payload\" in *CANARY*) echo got-canary >> LEDGER;; esac",
    )
    .await;
}

#[tokio::test]
async fn file_mode_keeps_the_payload_out_of_ps_status_and_logs() {
    canary_stays_hidden(
        "file",
        "echo \"$TASK_PAYLOAD_FILE $(stat -c %a \"$TASK_PAYLOAD_FILE\")\" >> LEDGER\necho running >> LEDGER\nsleep 1\n\
         grep -q CANARY \"$TASK_PAYLOAD_FILE\" && echo got-canary >> LEDGER",
    )
    .await;
}

#[tokio::test]
async fn payload_file_is_private_and_removed_even_after_a_timeout() {
    let env = Env::sqlite().await;
    let runner = env.script(
        "exec.sh",
        "echo \"file $TASK_PAYLOAD_FILE $(stat -c %a \"$TASK_PAYLOAD_FILE\") $(stat -c %a \"$(dirname \"$TASK_PAYLOAD_FILE\")\")\" >> LEDGER\n\
         if [ \"$TASK_ATTEMPT\" = 1 ]; then exec sleep 30; fi",
    );
    let id = enqueue_canary(&env);
    let mut w = env.worker(
        "w",
        &runner,
        &[
            "--payload-mode",
            "file",
            "--task-timeout",
            "500ms",
            "--kill-grace",
            "200ms",
            "--retry-backoff",
            "10ms",
            "--drain",
        ],
    );
    assert!(w.wait(Duration::from_secs(30)).success(), "{}", w.logs());
    let files: Vec<Vec<String>> = env
        .ledger_lines()
        .iter()
        .filter(|l| l.starts_with("file "))
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect();
    assert_eq!(files.len(), 2, "one timed-out attempt, one good one");
    for f in &files {
        assert_eq!(f[2], "600", "payload file mode");
        assert_eq!(f[3], "700", "payload directory mode");
        assert!(
            !std::path::Path::new(&f[1]).exists(),
            "payload file {} left behind",
            f[1]
        );
    }
    let s = env.status(id);
    assert_eq!(s["state"], "succeeded");
    // The per-worker payload directory itself is gone after exit.
    let dir = std::path::Path::new(&files[0][1])
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(!dir.exists());
}

#[tokio::test]
async fn executor_environment_is_an_allow_list() {
    let env = Env::sqlite().await;
    let runner = env.script("exec.sh", "env | sort > LEDGER");
    env.enqueue_many("tasks.env", 1, &[]);
    // The worker itself has secrets in its environment; none may reach the task.
    let mut child = env
        .cmd(&[
            "run",
            "--allow-root",
            "--drain",
            "--poll-interval",
            "50ms",
            "--module-runner",
            &runner,
            "--env-allow",
            "TZ",
        ])
        .env("TZ", "UTC")
        .env("METRICS_AUTH_TOKEN", "tok-canary")
        .env("AWS_SECRET_ACCESS_KEY", "aws-canary")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = eventually_blocking("worker exit", Duration::from_secs(20), || {
        child.try_wait().unwrap()
    });
    assert!(status.success());
    let lines = env.ledger_lines();
    let names: Vec<&str> = lines
        .iter()
        .map(|l| l.split('=').next().unwrap())
        // `sh` adds these itself.
        .filter(|k| !["PWD", "SHLVL", "_", "OLDPWD"].contains(k))
        .collect();
    assert_eq!(
        names,
        vec![
            "PATH",
            "TASK_ATTEMPT",
            "TASK_ID",
            "TASK_MODULE",
            "TASK_QUEUE",
            "TZ"
        ],
        "{lines:?}"
    );
}

#[cfg(not(feature = "prod"))]
#[tokio::test]
async fn dev_build_allows_inline_and_says_so() {
    let env = Env::sqlite().await;
    let version = env.ok(&["--version"]);
    assert!(version.contains("development build"), "{version}");
    let runner = env.script("exec.sh", "shift\necho \"arg $1\" >> LEDGER");
    enqueue_canary(&env);
    let mut w = env.worker("w", &runner, &["--payload-mode", "inline", "--drain"]);
    assert!(w.wait(Duration::from_secs(20)).success(), "{}", w.logs());
    assert!(env.ledger_lines()[0].contains(CANARY));
}

#[cfg(feature = "prod")]
#[tokio::test]
async fn prod_build_refuses_inline_and_says_so() {
    let env = Env::sqlite().await;
    let version = env.ok(&["--version"]);
    assert!(
        version.contains("prod build") && version.contains("inline"),
        "{version}"
    );
    let out = env.run(&["run", "--allow-root", "--payload-mode", "inline"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--payload-mode") && err.contains("prod"),
        "{err}"
    );
    let out = env
        .cmd(&["run", "--allow-root"])
        .env("PAYLOAD_MODE", "inline")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

#[tokio::test]
async fn tasks_cannot_read_the_workers_environment() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test must run as root (CI does): it starts the worker as nobody");
    }
    // The worker started directly as its service user (as systemd User= or a pod's
    // runAsUser do), with the database URL in its environment.
    let env = Env::sqlite().await;
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    std::fs::set_permissions(
        env.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let runner = env.script(
        "exec.sh",
        "if cat /proc/$PPID/environ > /dev/null 2>&1; then echo environ-readable >> LEDGER; else echo environ-denied >> LEDGER; fi",
    );
    env.enqueue_many("tasks.snoop", 1, &[]);
    std::fs::write(&env.ledger, "").unwrap();
    for e in std::fs::read_dir(env.path()).unwrap() {
        nix::unistd::chown(&e.unwrap().path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_worker"))
        .args([
            "run",
            "--drain",
            "--poll-interval",
            "50ms",
            "--module-runner",
            &runner,
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.db_url)
        .env("ALLOWED_TASK_MODULES", "tasks.*")
        .env("TASKGATE_PAYLOAD_DIR", env.path())
        .output()
        .expect("setpriv (util-linux)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.ledger_lines(), vec!["environ-denied".to_string()]);
}
