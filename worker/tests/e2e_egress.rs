//! The worker-level egress allow-list, end to end. The worker, its executors and a test
//! HTTP server all run inside a network namespace made for the test with nothing but
//! loopback in it, so even a bug cannot send a packet to a non-loopback address.

mod common;

use std::{process::Stdio, time::Duration};

use common::Env;
use taskgate_test_support::eventually::eventually_blocking;

const PORT: u16 = 18_181;

/// Each line: `name=<http code>` (curl prints 000 when it could not connect). The test
/// server listens on 127.0.0.2, the only address the policy allows; `localhost` is
/// allowed by name but resolves to 127.0.0.1, which no policy names.
const PROBES: &str = r#"
p() { name=$1; shift; printf '%s=%s\n' "$name" "$(curl -s -m 3 -o /dev/null -w '%{http_code}' "$@")" >> LEDGER; }
p allowed http://127.0.0.2:PORT/
p allowed_connect -p http://127.0.0.2:PORT/
p other_loopback_port http://127.0.0.1:5432/
p metadata http://169.254.169.254:PORT/latest/meta-data/
p metadata_mapped "http://[::ffff:169.254.169.254]:PORT/"
p private http://10.0.0.1:PORT/
p name_to_denied_address http://localhost:PORT/
p no_credential -x http://127.0.0.1:1/ http://127.0.0.2:PORT/
p direct --noproxy '*' http://127.0.0.2:PORT/
grep CapEff /proc/self/status | tr -d '\t ' >> LEDGER
"#;

fn config(mode: &str) -> String {
    format!(
        "[egress]\nmode = \"{mode}\"\n\
         [egress.modules.\"tasks.fetch\"]\nallow_hosts = [\"localhost\"]\nallow_cidrs = [\"127.0.0.2/32\"]\nallow_ports = [{PORT}]\n"
    )
}

/// Runs `worker run --drain` and a test server in a fresh loopback-only namespace.
fn run_in_namespace(env: &Env, mode: &str, extra: &[&str]) -> (String, String) {
    let cfg = env.path().join("worker.toml");
    std::fs::write(&cfg, config(mode)).unwrap();
    let probes = PROBES.replace("PORT", &PORT.to_string());
    let runner = env.script("exec.sh", &probes);
    // The `no_credential` probe points curl at a proxy that does not exist; replace it
    // with the real proxy minus the credential, found from the environment.
    std::fs::write(
        env.path().join("exec.sh"),
        std::fs::read_to_string(env.path().join("exec.sh"))
            .unwrap()
            .replace(
                "-x http://127.0.0.1:1/",
                "-x \"$(echo \"$HTTP_PROXY\" | sed 's|//[^@]*@|//|')\"",
            ),
    )
    .unwrap();
    let worker = env!("CARGO_BIN_EXE_worker");
    let log = env.path().join("worker.log");
    let mut args = vec![
        "--net".to_string(),
        "--".to_string(),
        "sh".to_string(),
        "-c".to_string(),
        format!(
            "ip link set lo up && (python3 -m http.server {PORT} --bind 127.0.0.2 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do curl -s -o /dev/null http://127.0.0.2:{PORT}/ && break; sleep 0.1; done && exec \"$@\""
        ),
        "sh".to_string(),
        worker.to_string(),
        "--config".to_string(),
        cfg.display().to_string(),
        "run".to_string(),
        "--drain".to_string(),
        "--poll-interval".to_string(),
        "50ms".to_string(),
        "--module-runner".to_string(),
        runner,
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--user") {
        args.push("--allow-root".to_string());
    }
    env.enqueue_many("tasks.fetch", 1, &[]);
    let mut child = std::process::Command::new("unshare")
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &env.db_url)
        .env("ALLOWED_TASK_MODULES", "tasks.*")
        .env("TASKGATE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::create(env.path().join("worker.err")).unwrap())
        .spawn()
        .expect("unshare (util-linux) must be installed");
    let status = eventually_blocking("worker exit", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    let logs = std::fs::read_to_string(&log).unwrap()
        + &std::fs::read_to_string(env.path().join("worker.err")).unwrap();
    // The test server dies with the namespace's last process; make sure.
    assert!(status.success(), "worker failed: {logs}");
    (env.ledger_lines().join("\n"), logs)
}

fn code(ledger: &str, name: &str) -> String {
    ledger
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {ledger}"))
        .to_string()
}

#[tokio::test]
async fn enforce_allows_only_the_policy_and_cuts_direct_connections() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test must run as root (CI does): it creates a network namespace");
    }
    let env = Env::sqlite().await;
    let (ledger, logs) = run_in_namespace(&env, "enforce", &[]);
    assert_eq!(code(&ledger, "allowed"), "200", "{ledger}");
    assert_eq!(code(&ledger, "allowed_connect"), "200", "{ledger}");
    for denied in [
        "other_loopback_port",
        "metadata",
        "metadata_mapped",
        "private",
        "name_to_denied_address",
    ] {
        assert_eq!(code(&ledger, denied), "403", "{denied}: {ledger}");
    }
    assert_eq!(code(&ledger, "no_credential"), "407", "{ledger}");
    // Ignoring the proxy gets no connection at all.
    assert_eq!(code(&ledger, "direct"), "000", "{ledger}");
    // And the task holds no capability with which to change that.
    assert!(ledger.contains("CapEff:0000000000000000"), "{ledger}");
    // Audit lines name the task, module, destination, decision and reason.
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "taskgate::egress")
        .collect();
    assert!(audit.iter().any(|v| v["decision"] == "denied"
        && v["reason"] == "port"
        && v["destination"] == "127.0.0.1:5432"
        && v["task_id"] == 1));
    assert!(audit.iter().any(
        |v| v["decision"] == "denied" && v["destination"] == format!("169.254.169.254:{PORT}")
    ));
    assert!(audit
        .iter()
        .any(|v| v["reason"] == "resolves_to_denied_address" && v["resolved"] == "127.0.0.1"));
    assert!(audit
        .iter()
        .any(|v| v["decision"] == "allowed" && v["module"] == "tasks.fetch"));
    assert!(logs.contains("each executor gets its own network namespace"));
}

#[tokio::test]
async fn report_mode_allows_and_logs_what_it_would_deny() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test must run as root (CI does): it creates a network namespace");
    }
    let env = Env::sqlite().await;
    let (ledger, logs) = run_in_namespace(&env, "report", &[]);
    assert_eq!(code(&ledger, "allowed"), "200");
    // Not denied: passed on (nothing listens there, hence 502 / no answer, not 403).
    assert_ne!(code(&ledger, "other_loopback_port"), "403", "{ledger}");
    assert_eq!(
        code(&ledger, "direct"),
        "200",
        "report mode does not isolate: {ledger}"
    );
    assert!(logs.contains("\"decision\":\"would_deny\""), "{logs}");
}

#[tokio::test]
async fn enforce_after_dropping_root_uses_a_user_namespace() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test must run as root (CI does): it creates a network namespace");
    }
    let env = Env::sqlite().await;
    // The worker runs as nobody: let it use the test's files.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    std::fs::set_permissions(
        env.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    for e in std::fs::read_dir(env.path()).unwrap() {
        nix::unistd::chown(&e.unwrap().path(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    }
    std::fs::write(&env.ledger, "").unwrap();
    nix::unistd::chown(&env.ledger, Some(nobody.uid), Some(nobody.gid)).unwrap();
    let (ledger, logs) = run_in_namespace(&env, "enforce", &["--user", "nobody"]);
    assert!(logs.contains("\"isolation\":\"UserNetNs\""), "{logs}");
    assert!(ledger.contains("allowed="), "{logs}");
    assert_eq!(code(&ledger, "allowed"), "200", "{ledger}");
    assert_eq!(code(&ledger, "metadata"), "403", "{ledger}");
    assert_eq!(code(&ledger, "direct"), "000", "{ledger}");
    assert!(ledger.contains("CapEff:0000000000000000"), "{ledger}");
}
