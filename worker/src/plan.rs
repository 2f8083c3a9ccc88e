//! What command, environment and limits a module's executor gets.

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use crate::{
    egress::proxy::{Credential, EgressProxy},
    executor::{Isolation, PayloadMode, Spec},
    store::ClaimedTask,
};

/// Port the egress jail listens on inside an executor's own network namespace.
pub const JAIL_PROXY_PORT: u16 = 3128;

/// How executors reach the egress proxy.
#[derive(Clone)]
pub struct EgressPlan {
    /// The proxy (issues per-attempt credentials).
    pub proxy: Arc<EgressProxy>,
    /// The proxy's loopback TCP port (advisory and report modes).
    pub tcp_port: u16,
    /// The proxy's Unix socket (what the jail relays to).
    pub socket: PathBuf,
    /// `Some` when each executor gets its own network namespace (enforce mode).
    pub jail: Option<Isolation>,
    /// This binary, to run `worker egress-jail`.
    pub exe: PathBuf,
}

impl std::fmt::Debug for EgressPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressPlan")
            .field("tcp_port", &self.tcp_port)
            .field("socket", &self.socket)
            .field("jail", &self.jail)
            .finish()
    }
}

/// Placeholder replaced by the module name in command templates.
pub const MODULE_PLACEHOLDER: &str = "{module}";

/// A module's own command and limits, from `[modules."name"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleOverride {
    /// Replaces the module runner.
    pub command: Option<Vec<String>>,
    /// Replaces the task timeout.
    pub timeout: Option<Duration>,
}

/// How executors are started.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Default command template (`python3 -m {module}`), split into argv.
    pub runner: Vec<String>,
    /// Per-module overrides.
    pub modules: HashMap<String, ModuleOverride>,
    /// Default attempt timeout.
    pub timeout: Duration,
    /// Payload delivery.
    pub payload_mode: PayloadMode,
    /// SIGTERM → SIGKILL grace.
    pub kill_grace: Duration,
    /// Output bytes kept per stream.
    pub output_cap: usize,
    /// Private directory for payload files.
    pub payload_dir: PathBuf,
    /// Environment every executor starts with (already filtered by the allow-list).
    pub base_env: Vec<(String, String)>,
    /// Egress proxy wiring, when an egress policy is on.
    pub egress: Option<EgressPlan>,
}

impl Plan {
    /// The spec for one attempt of `task`, and the egress credential that must live as
    /// long as the attempt.
    pub fn spec(&self, task: &ClaimedTask) -> (Spec, Option<Credential>) {
        let over = self.modules.get(&task.module);
        let template = over
            .and_then(|o| o.command.as_ref())
            .unwrap_or(&self.runner);
        let mut argv: Vec<String> = template
            .iter()
            .map(|a| a.replace(MODULE_PLACEHOLDER, &task.module))
            .collect();
        let mut env = self.base_env.clone();
        env.extend([
            ("TASK_ID".to_string(), task.id.to_string()),
            ("TASK_ATTEMPT".to_string(), task.attempt.to_string()),
            ("TASK_MODULE".to_string(), task.module.clone()),
            ("TASK_QUEUE".to_string(), task.queue.clone()),
        ]);
        let mut isolation = Isolation::None;
        let credential = self.egress.as_ref().map(|e| {
            let cred = e
                .proxy
                .register(task.id, &task.module, &task.queue, task.attempt);
            let port = match e.jail {
                Some(jail) => {
                    isolation = jail;
                    let mut wrapped = vec![
                        e.exe.display().to_string(),
                        "egress-jail".to_string(),
                        "--socket".to_string(),
                        e.socket.display().to_string(),
                        "--port".to_string(),
                        JAIL_PROXY_PORT.to_string(),
                        "--".to_string(),
                    ];
                    wrapped.append(&mut argv);
                    argv = wrapped;
                    JAIL_PROXY_PORT
                }
                None => e.tcp_port,
            };
            let url = format!("http://{}@127.0.0.1:{port}", cred.userinfo);
            for name in [
                "HTTPS_PROXY",
                "HTTP_PROXY",
                "https_proxy",
                "http_proxy",
                "ALL_PROXY",
                "all_proxy",
            ] {
                env.push((name.to_string(), url.clone()));
            }
            cred
        });
        let spec = Spec {
            argv,
            env,
            payload_mode: self.payload_mode,
            timeout: over.and_then(|o| o.timeout).unwrap_or(self.timeout),
            kill_grace: self.kill_grace,
            output_cap: self.output_cap,
            payload_dir: self.payload_dir.clone(),
            isolation,
        };
        (spec, credential)
    }
}
