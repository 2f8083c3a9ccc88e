//! The worker's configuration: one typed struct built in one place from flags, env and
//! the TOML file (flags and env win), with every bad key reported at once.

use std::{collections::BTreeMap, collections::HashMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use taskgate_shared::{
    config::{load_toml, parse_duration, ConfigErrors},
    listen::Addr,
    redact::is_secret_key,
};

use crate::{
    cli::{Cli, RunArgs},
    executor::PayloadMode,
    modules::AllowList,
    plan::{ModuleOverride, MODULE_PLACEHOLDER},
    retry::Backoff,
};

/// Default database: a SQLite file in the working directory.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://taskgate.db?mode=rwc";
/// Default executor command.
pub const DEFAULT_MODULE_RUNNER: &str = "python3 -m {module}";

/// `worker.toml` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `[worker]`.
    #[serde(default)]
    pub worker: WorkerSection,
    /// `[modules."name"]`.
    #[serde(default)]
    pub modules: BTreeMap<String, ModuleSection>,
    /// `[listen]`.
    #[serde(default)]
    pub listen: ListenSection,
    /// `[egress]`.
    #[serde(default)]
    pub egress: EgressSection,
}

/// `[worker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct WorkerSection {
    pub database_url: Option<String>,
    pub database_url_file: Option<PathBuf>,
    pub queues: Option<Vec<String>>,
    pub concurrency: Option<usize>,
    pub lease_ttl: Option<String>,
    pub payload_mode: Option<String>,
    pub allowed_modules: Option<Vec<String>>,
    pub module_runner: Option<String>,
    pub task_timeout: Option<String>,
    pub env_allow: Option<Vec<String>>,
    pub poll_interval: Option<String>,
    pub shutdown_grace: Option<String>,
    pub kill_grace: Option<String>,
    pub retry_backoff: Option<String>,
    pub retry_backoff_max: Option<String>,
    pub payload_dir: Option<PathBuf>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub allow_root: Option<bool>,
    pub log_format: Option<String>,
    pub log_level: Option<String>,
    pub log_dir: Option<PathBuf>,
}

/// `[modules."name"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ModuleSection {
    pub command: Option<Vec<String>>,
    pub timeout: Option<String>,
}

/// `[listen]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct ListenSection {
    pub metrics: Option<String>,
    pub socket_mode: Option<String>,
    pub socket_group: Option<String>,
}

/// `[egress]`: the worker-level egress allow-list (see [`crate::egress`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct EgressSection {
    pub mode: Option<String>,
    #[serde(default)]
    pub modules: BTreeMap<String, EgressModule>,
    pub default: Option<EgressModule>,
}

/// `[egress.modules."name"]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct EgressModule {
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    #[serde(default)]
    pub allow_cidrs: Vec<String>,
    #[serde(default)]
    pub allow_ports: Vec<u16>,
}

/// Settings every subcommand needs.
#[derive(Debug, Clone)]
pub struct Common {
    /// Database URL (may hold a password: never log it; see `store::redact_url`).
    pub database_url: String,
    /// The module allow-list.
    pub allow: AllowList,
    /// Log format name.
    pub log_format: Option<String>,
    /// Log filter.
    pub log_level: Option<String>,
    /// Rolling log directory.
    pub log_dir: Option<PathBuf>,
    /// `[listen] metrics` from the file (for `worker healthcheck`).
    pub file_metrics_listen: Option<String>,
}

/// Settings of `worker run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Queues.
    pub queues: Vec<String>,
    /// Executors at once.
    pub concurrency: usize,
    /// Lease TTL.
    pub lease_ttl: Duration,
    /// Exit when idle.
    pub drain: bool,
    /// Listener for /metrics, /healthz, /events.
    pub metrics_listen: Option<Addr>,
    /// Socket file mode.
    pub socket_mode: u32,
    /// Socket group.
    pub socket_group: Option<String>,
    /// Privilege drop user.
    pub user: Option<String>,
    /// Privilege drop group.
    pub group: Option<String>,
    /// Run tasks as root anyway.
    pub allow_root: bool,
    /// Payload delivery.
    pub payload_mode: PayloadMode,
    /// Runner template, split.
    pub module_runner: Vec<String>,
    /// Default attempt timeout.
    pub task_timeout: Duration,
    /// Per-module overrides.
    pub modules: HashMap<String, ModuleOverride>,
    /// Extra env names for executors.
    pub env_allow: Vec<String>,
    /// Idle poll interval.
    pub poll_interval: Duration,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// SIGTERM→SIGKILL grace.
    pub kill_grace: Duration,
    /// Retry back-off.
    pub backoff: Backoff,
    /// Payload directory base.
    pub payload_dir: Option<PathBuf>,
    /// Egress policy.
    pub egress: crate::egress::Policy,
    /// Accept advisory egress where enforcement is impossible.
    pub egress_advisory_ok: bool,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// For every subcommand.
    pub common: Common,
    /// For `run`.
    pub run: Option<RunConfig>,
}

/// Env names that must never reach an executor, whatever `env_allow` says.
const NEVER_PASSED: &[&str] = &["DATABASE_URL", "TASKGATE_CONFIG", "METRICS_AUTH_TOKEN"];

impl Config {
    /// Builds the configuration from the parsed command line (flags and env) and the
    /// config file it names.
    pub fn load(cli: &Cli, run: Option<&RunArgs>) -> Result<Self, ConfigErrors> {
        let file = match &cli.config {
            Some(path) => load_toml::<FileConfig>(path)?,
            None => FileConfig::default(),
        };
        Self::build(cli, run, file)
    }

    /// Builds from already-read sources (tests pass a `FileConfig` directly).
    pub fn build(cli: &Cli, run: Option<&RunArgs>, file: FileConfig) -> Result<Self, ConfigErrors> {
        let mut errs = ConfigErrors::default();
        let w = &file.worker;

        let database_url = match (&cli.database_url, &w.database_url, &w.database_url_file) {
            (Some(u), _, _) => u.clone(),
            (None, Some(_), Some(_)) => {
                errs.push(
                    "worker.database_url",
                    "set database_url or database_url_file, not both",
                );
                String::new()
            }
            (None, Some(u), None) => u.clone(),
            (None, None, Some(p)) => errs
                .check(taskgate_shared::config::read_secret_file(
                    "worker.database_url_file",
                    p,
                ))
                .unwrap_or_default(),
            (None, None, None) => DEFAULT_DATABASE_URL.to_string(),
        };

        let allowed: Vec<String> = cli
            .allowed_modules
            .clone()
            .or_else(|| w.allowed_modules.clone())
            .unwrap_or_default();
        let allow = errs
            .check(AllowList::parse("ALLOWED_TASK_MODULES", &allowed))
            .unwrap_or_default();

        let common = Common {
            database_url,
            allow,
            log_format: cli.log_format.clone().or_else(|| w.log_format.clone()),
            log_level: cli.log_level.clone().or_else(|| w.log_level.clone()),
            log_dir: cli.log_dir.clone().or_else(|| w.log_dir.clone()),
            file_metrics_listen: file.listen.metrics.clone(),
        };

        let run = run.map(|r| build_run(r, &file, &common, &mut errs));
        errs.into_result()?;
        Ok(Config { common, run })
    }
}

fn build_run(
    r: &RunArgs,
    file: &FileConfig,
    common: &Common,
    errs: &mut ConfigErrors,
) -> RunConfig {
    let w = &file.worker;
    let dur = |errs: &mut ConfigErrors,
               key: &str,
               flag: &Option<String>,
               file: &Option<String>,
               default: Duration| {
        match flag.as_ref().or(file.as_ref()) {
            Some(v) => errs.check(parse_duration(key, v)).unwrap_or(default),
            None => default,
        }
    };
    let queues = if !r.queues.is_empty() {
        r.queues.clone()
    } else {
        w.queues
            .clone()
            .unwrap_or_else(|| vec!["default".to_string()])
    };
    let queues: Vec<String> = queues
        .into_iter()
        .map(|q| q.trim().to_string())
        .filter(|q| !q.is_empty())
        .collect();
    if queues.is_empty() {
        errs.push("--queue", "at least one queue is needed");
    }
    let concurrency = r.concurrency.or(w.concurrency).unwrap_or(8);
    if concurrency == 0 || concurrency > 4096 {
        errs.push(
            "--concurrency",
            format!("{concurrency} is out of range; use 1 to 4096"),
        );
    }
    let lease_ttl = dur(
        errs,
        "--lease-ttl",
        &r.lease_ttl,
        &w.lease_ttl,
        Duration::from_secs(30),
    );
    if lease_ttl < Duration::from_millis(300) {
        errs.push(
            "--lease-ttl",
            "must be at least 300ms (heartbeats run every third of it)",
        );
    }
    let listen = file.listen.metrics.as_ref();
    let metrics_listen = r
        .metrics_listen
        .as_ref()
        .or(listen)
        .and_then(|a| errs.check(Addr::parse_local_for("--metrics-listen", a)));
    let socket_mode = r.socket_mode.as_ref().or(file.listen.socket_mode.as_ref());
    let socket_mode = match socket_mode {
        None => 0o660,
        Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
            Ok(v) if v <= 0o777 && v & 0o007 == 0 => v,
            Ok(_) => {
                errs.push(
                    "--socket-mode",
                    format!("{m} gives access to other users; use e.g. 0660 or 0600"),
                );
                0o660
            }
            Err(_) => {
                errs.push(
                    "--socket-mode",
                    format!("{m:?} is not an octal mode such as 0660"),
                );
                0o660
            }
        },
    };
    let payload_mode = r.payload_mode.as_ref().or(w.payload_mode.as_ref());
    let payload_mode = match payload_mode.map(|m| m.parse::<PayloadMode>()) {
        None => PayloadMode::Stdin,
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            errs.push("--payload-mode", e);
            PayloadMode::Stdin
        }
    };
    if cfg!(feature = "prod") && payload_mode == PayloadMode::Inline {
        errs.push(
            "--payload-mode",
            "inline is refused by this prod build: it puts the payload in the executor's argv, visible to every user in `ps`; use stdin or file",
        );
    }
    let runner_text = r
        .module_runner
        .clone()
        .or_else(|| w.module_runner.clone())
        .unwrap_or_else(|| DEFAULT_MODULE_RUNNER.to_string());
    let module_runner = match shell_words::split(&runner_text) {
        Ok(v) if v.is_empty() => {
            errs.push("--module-runner", "is empty");
            Vec::new()
        }
        Ok(v) => {
            if !v.iter().any(|a| a.contains(MODULE_PLACEHOLDER)) {
                errs.push(
                    "--module-runner",
                    format!("{runner_text:?} does not contain {MODULE_PLACEHOLDER}"),
                );
            }
            v
        }
        Err(e) => {
            errs.push(
                "--module-runner",
                format!("cannot split {runner_text:?} into words: {e}"),
            );
            Vec::new()
        }
    };
    let task_timeout = dur(
        errs,
        "--task-timeout",
        &r.task_timeout,
        &w.task_timeout,
        Duration::from_secs(15 * 60),
    );
    let mut modules = HashMap::new();
    for (name, m) in &file.modules {
        let key = format!("modules.\"{name}\"");
        if let Err(e) = crate::modules::validate_name(name) {
            errs.push(&key, e.to_string());
        } else if common.allow.check(name).is_err() {
            errs.push(
                &key,
                "is configured but not allowed by ALLOWED_TASK_MODULES",
            );
        }
        if m.command.as_ref().is_some_and(|c| c.is_empty()) {
            errs.push(format!("{key}.command"), "is empty");
        }
        let timeout = m
            .timeout
            .as_ref()
            .and_then(|t| errs.check(parse_duration(&format!("{key}.timeout"), t)));
        modules.insert(
            name.clone(),
            ModuleOverride {
                command: m.command.clone(),
                timeout,
            },
        );
    }
    let env_allow: Vec<String> = if !r.env_allow.is_empty() {
        r.env_allow.clone()
    } else {
        w.env_allow.clone().unwrap_or_default()
    };
    for name in &env_allow {
        if NEVER_PASSED.contains(&name.as_str()) || is_secret_key(name) {
            errs.push(
                "--env-allow",
                format!("{name} looks like a secret of the worker's and is never passed to tasks"),
            );
        } else if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            errs.push(
                "--env-allow",
                format!("{name:?} is not an environment variable name"),
            );
        }
    }
    let backoff = Backoff {
        base: dur(
            errs,
            "--retry-backoff",
            &r.retry_backoff,
            &w.retry_backoff,
            Duration::from_secs(1),
        ),
        max: dur(
            errs,
            "--retry-backoff-max",
            &r.retry_backoff_max,
            &w.retry_backoff_max,
            Duration::from_secs(3600),
        ),
    };
    RunConfig {
        queues,
        concurrency,
        lease_ttl,
        drain: r.drain,
        metrics_listen,
        socket_mode,
        socket_group: r
            .socket_group
            .clone()
            .or_else(|| file.listen.socket_group.clone()),
        user: r.user.clone().or_else(|| w.user.clone()),
        group: r.group.clone().or_else(|| w.group.clone()),
        allow_root: r.allow_root || w.allow_root.unwrap_or(false),
        payload_mode,
        module_runner,
        task_timeout,
        modules,
        env_allow,
        poll_interval: dur(
            errs,
            "--poll-interval",
            &r.poll_interval,
            &w.poll_interval,
            Duration::from_secs(1),
        ),
        shutdown_grace: dur(
            errs,
            "--shutdown-grace",
            &r.shutdown_grace,
            &w.shutdown_grace,
            Duration::from_secs(30),
        ),
        kill_grace: dur(
            errs,
            "--kill-grace",
            &r.kill_grace,
            &w.kill_grace,
            Duration::from_secs(10),
        ),
        backoff,
        payload_dir: r.payload_dir.clone().or_else(|| w.payload_dir.clone()),
        egress: {
            let mut policy = crate::egress::Policy::from_config(&file.egress, errs);
            if let Some(m) = &r.egress_mode {
                policy.mode = match m.as_str() {
                    "enforce" => crate::egress::Mode::Enforce,
                    "report" => crate::egress::Mode::Report,
                    "off" => crate::egress::Mode::Off,
                    other => {
                        errs.push(
                            "--egress-mode",
                            format!("{other:?} is not a mode; use enforce, report or off"),
                        );
                        policy.mode
                    }
                };
            }
            policy
        },
        egress_advisory_ok: r.egress_advisory_ok,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use taskgate_shared::config::parse_toml;

    use super::*;
    use crate::cli::Command;

    fn build(args: &[&str], toml: &str) -> Result<Config, ConfigErrors> {
        let cli = Cli::try_parse_from(args).unwrap();
        let file: FileConfig = parse_toml("test.toml", toml).map_err(ConfigErrors::from)?;
        let run = match &cli.command {
            Command::Run(r) => Some(r.as_ref()),
            _ => None,
        };
        Config::build(&cli, run, file)
    }

    #[test]
    fn flags_override_file() {
        let c = build(
            &[
                "worker",
                "run",
                "--concurrency",
                "3",
                "--allowed-modules",
                "a.*",
            ],
            "[worker]\nconcurrency = 9\nlease_ttl = \"45s\"\nallowed_modules = [\"b\"]\n",
        )
        .unwrap();
        let r = c.run.unwrap();
        assert_eq!(r.concurrency, 3);
        assert_eq!(r.lease_ttl, Duration::from_secs(45));
        assert!(c.common.allow.check("a.x").is_ok());
        assert!(c.common.allow.check("b").is_err());
        assert_eq!(c.common.database_url, DEFAULT_DATABASE_URL);
    }

    #[test]
    fn all_bad_keys_reported() {
        let e = build(
            &[
                "worker",
                "run",
                "--lease-ttl",
                "soon",
                "--metrics-listen",
                "0.0.0.0:9100",
                "--env-allow",
                "DATABASE_URL",
            ],
            "[worker]\npayload_mode = \"carrier-pigeon\"\n",
        )
        .unwrap_err();
        let keys: Vec<&str> = e.0.iter().map(|e| e.key.as_str()).collect();
        for k in [
            "--lease-ttl",
            "--metrics-listen",
            "--env-allow",
            "--payload-mode",
        ] {
            assert!(keys.contains(&k), "{k} missing from {e}");
        }
    }

    #[test]
    fn unknown_file_key_is_named() {
        let e = build(&["worker", "migrate"], "[worker]\nconcurency = 3\n").unwrap_err();
        assert!(e.to_string().contains("concurency"), "{e}");
    }

    #[test]
    fn design_example_parses() {
        let toml = r#"
[worker]
database_url = "sqlite://taskgate.db?mode=rwc"
queues = ["default"]
concurrency = 8
lease_ttl = "30s"
payload_mode = "stdin"
allowed_modules = ["tasks.*"]
module_runner = "python3 -m {module}"
task_timeout = "15m"
env_allow = ["TZ"]

[modules."tasks.resize"]
command = ["/usr/local/bin/resize"]
timeout = "2m"

[listen]
metrics = "unix:/run/worker.sock"
socket_mode = "0660"
socket_group = "taskgate-gw"
"#;
        let c = build(&["worker", "run"], toml).unwrap();
        let r = c.run.unwrap();
        assert_eq!(
            r.modules["tasks.resize"].timeout,
            Some(Duration::from_secs(120))
        );
        assert_eq!(r.socket_mode, 0o660);
        let with_egress = format!(
            "{toml}\n[egress]\nmode = \"enforce\"\n[egress.modules.\"tasks.fetch\"]\nallow_hosts = [\"api.example.com\", \"*.example.org\"]\nallow_cidrs = [\"203.0.113.0/24\"]\nallow_ports = [443]\n"
        );
        let r = build(&["worker", "run"], &with_egress)
            .unwrap()
            .run
            .unwrap();
        assert_eq!(r.egress.mode, crate::egress::Mode::Enforce);
        assert!(r.egress.rule_for("tasks.fetch").is_some());
        let e = build(&["worker", "run"], "[egress]\nmod = \"enforce\"\n").unwrap_err();
        assert!(e.to_string().contains("mod"), "{e}");
    }

    #[test]
    fn inline_mode_depends_on_build() {
        let r = build(&["worker", "run", "--payload-mode", "inline"], "");
        assert_eq!(r.is_err(), cfg!(feature = "prod"));
    }
}
