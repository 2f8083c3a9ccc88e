//! Helpers for the tests that check `deploy/` with the real tools an operator would run:
//! `kubectl kustomize` and `kubernetes-validate` for the manifests, `systemd-analyze` for
//! the units, `nft -c` for the egress ruleset, and `deploy/local/run.sh --check`.
//!
//! A missing tool is a test failure that names `deploy/local/install-deps.sh`, never a
//! silent pass.
//!
//! # Layout
//!
//! - [`repo`]: paths in the repository.
//! - [`require`]: find a tool on `PATH` or fail saying how to install it.
//! - [`run`]: run a command and keep what it printed.
//! - [`yaml_documents`]: YAML (one or many documents) to JSON values, through PyYAML.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The script that installs every tool these tests need.
pub const INSTALL_DEPS: &str = "deploy/local/install-deps.sh";

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
        .canonicalize()
        .unwrap_or_else(|e| panic!("{rel} is missing from the repository: {e}"))
}

/// Finds `tool` on `PATH`, or fails the test naming the install script.
pub fn require(tool: &str, why: &str) -> PathBuf {
    find(tool).unwrap_or_else(|| {
        panic!("`{tool}` is not installed ({why}); run {INSTALL_DEPS} and try again")
    })
}

/// `tool`'s full path if it is on `PATH`.
pub fn find(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Fails the test unless Python has `module` (installed by the install script).
pub fn require_python_module(module: &str, package: &str) {
    require("python3", "the YAML and schema checks run in Python");
    let out = run(Command::new("python3").args(["-c", &format!("import {module}")]));
    assert!(
        out.ok,
        "Python module `{module}` is missing (PyPI package {package}); run {INSTALL_DEPS} and try again\n{}",
        out.stderr
    );
}

/// What a finished command printed, and whether it exited 0.
#[derive(Debug)]
pub struct Output {
    /// Exit status 0.
    pub ok: bool,
    /// The exit code, if it exited (not killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `cmd` to completion with no stdin, capturing both outputs.
pub fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    Output {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `program args…` and fails the test unless it exits 0; returns its stdout.
pub fn run_ok<I, S>(program: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let shown = format!("{cmd:?}");
    let out = run(&mut cmd);
    assert!(
        out.ok,
        "{shown} failed ({:?}):\n{}\n{}",
        out.code, out.stdout, out.stderr
    );
    out.stdout
}

/// Parses every YAML document in `text` (PyYAML's `safe_load_all`) into JSON values;
/// empty documents are skipped.
pub fn yaml_documents(text: &str) -> Vec<serde_json::Value> {
    require_python_module("yaml", "PyYAML");
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("in.yaml");
    std::fs::write(&file, text).expect("write YAML");
    let script = "import json, sys, yaml\n\
                  docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]\n\
                  json.dump(docs, sys.stdout)\n";
    let out = run_ok(
        "python3",
        [OsStr::new("-c"), OsStr::new(script), file.as_os_str()],
    );
    match serde_json::from_str(&out) {
        Ok(serde_json::Value::Array(docs)) => docs,
        other => panic!("PyYAML gave something other than a list: {other:?}"),
    }
}
