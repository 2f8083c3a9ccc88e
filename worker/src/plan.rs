//! What command, environment and limits a module's executor gets.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use crate::{
    executor::{PayloadMode, Spec},
    store::ClaimedTask,
};

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
}

impl Plan {
    /// The spec for one attempt of `task`.
    pub fn spec(&self, task: &ClaimedTask) -> Spec {
        let over = self.modules.get(&task.module);
        let template = over
            .and_then(|o| o.command.as_ref())
            .unwrap_or(&self.runner);
        let argv = template
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
        Spec {
            argv,
            env,
            payload_mode: self.payload_mode,
            timeout: over.and_then(|o| o.timeout).unwrap_or(self.timeout),
            kill_grace: self.kill_grace,
            output_cap: self.output_cap,
            payload_dir: self.payload_dir.clone(),
        }
    }
}
