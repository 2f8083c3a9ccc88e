//! `deploy/systemd`: each service's exposure as rated by
//! `systemd-analyze security --offline=true` is 2.0 or lower, and every unit passes
//! `systemd-analyze verify` without a single message.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use taskgate_deploy_tests::{repo, require, run};

/// The highest exposure a unit may have (systemd's scale: 0 safe … 10 exposed).
const MAX_EXPOSURE: f64 = 2.0;

fn units(ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(repo("deploy/systemd"))
        .expect("read deploy/systemd")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension() == Some(ext.as_ref()))
        .collect();
    found.sort();
    found
}

fn systemd_analyze() -> PathBuf {
    require(
        "systemd-analyze",
        "rates and verifies the units (Debian package systemd)",
    )
}

/// The "Overall exposure level for X: N.N" figure.
fn exposure(unit: &Path) -> f64 {
    let out = run(Command::new(systemd_analyze())
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    let text = format!("{}{}", out.stdout, out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level for"))
        .unwrap_or_else(|| {
            panic!(
                "systemd-analyze security printed no exposure for {} ({:?}):\n{text}",
                unit.display(),
                out.code
            )
        });
    let figure = line
        .rsplit(':')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in {line:?}"));
    eprintln!("{}: exposure {figure:.1}", unit.display());
    figure
}

#[test]
fn every_service_rates_at_most_2_0() {
    let services = units("service");
    assert!(
        services.len() >= 2,
        "worker and gateway services expected: {services:?}"
    );
    let mut too_high = Vec::new();
    for unit in &services {
        let figure = exposure(unit);
        if figure > MAX_EXPOSURE {
            too_high.push(format!("{}: {figure:.1}", unit.display()));
        }
    }
    assert!(
        too_high.is_empty(),
        "exposure above {MAX_EXPOSURE:.1}: {too_high:?}"
    );
}

/// A throw-away root with the host's unit library (for targets such as sysinit.target),
/// our units, and stand-ins for the binaries the units run, so `verify` checks our units
/// rather than what happens to be installed on this machine.
fn verify_root() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("temp root");
    let lib = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("sysinit.target").exists())
        .expect("the host's systemd unit library (Debian package systemd); run deploy/local/install-deps.sh");
    let dest = root.path().join("usr/lib/systemd");
    fs::create_dir_all(&dest).expect("mkdir");
    let cp = run(Command::new("cp").arg("-r").arg(lib).arg(&dest));
    assert!(cp.ok, "copy the unit library: {}", cp.stderr);
    let etc = root.path().join("etc/systemd/system");
    fs::create_dir_all(&etc).expect("mkdir");
    for unit in units("service").into_iter().chain(units("socket")) {
        fs::copy(&unit, etc.join(unit.file_name().expect("name"))).expect("copy unit");
    }
    for bin in ["usr/local/bin/worker", "usr/local/bin/gateway", "bin/kill"] {
        let p = root.path().join(bin);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, "#!/bin/sh\nexit 0\n").expect("stand-in");
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    root
}

#[test]
fn every_unit_passes_systemd_analyze_verify_silently() {
    let root = verify_root();
    let names: Vec<String> = units("service")
        .into_iter()
        .chain(units("socket"))
        .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    let out = run(Command::new(systemd_analyze())
        .arg("verify")
        .arg(format!("--root={}", root.path().display()))
        .arg("--man=no")
        .args(&names));
    // verify exits 0 on unknown keys and bad values (it only warns): any message fails.
    let findings = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.ok && findings.trim().is_empty(),
        "systemd-analyze verify {names:?} ({:?}):\n{findings}",
        out.code
    );
}

/// `Key=value` lines of a unit (the last one wins, as systemd reads single-value keys).
fn key(unit: &str, k: &str) -> Option<String> {
    let text = fs::read_to_string(repo("deploy/systemd").join(unit)).expect("read unit");
    text.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(&format!("{k}=")))
        .map(str::to_string)
}

#[test]
fn services_run_as_their_own_unprivileged_users_and_the_worker_uses_notify_and_the_watchdog() {
    assert_eq!(
        key("taskgate-worker.service", "Type").as_deref(),
        Some("notify")
    );
    assert!(key("taskgate-worker.service", "WatchdogSec").is_some());
    let mut users = Vec::new();
    for unit in ["taskgate-worker.service", "taskgate-gateway.service"] {
        let user = key(unit, "User").or_else(|| key(unit, "DynamicUser"));
        let user = user.unwrap_or_else(|| panic!("{unit}: no User= or DynamicUser="));
        assert!(
            !["root", "0", "no"].contains(&user.as_str()),
            "{unit}: {user}"
        );
        users.push(user);
        assert_eq!(
            key(unit, "NoNewPrivileges").as_deref(),
            Some("yes"),
            "{unit}"
        );
        assert_eq!(
            key(unit, "CapabilityBoundingSet").as_deref(),
            Some(""),
            "{unit}"
        );
        assert_eq!(key(unit, "IPAddressDeny").as_deref(), Some("any"), "{unit}");
        let allowed = fs::read_to_string(repo("deploy/systemd").join(unit)).expect("read");
        for metadata in ["169.254.", "fd00:ec2"] {
            assert!(
                !allowed
                    .lines()
                    .any(|l| l.starts_with("IPAddressAllow=") && l.contains(metadata)),
                "{unit} allows the metadata service"
            );
        }
    }
    assert_ne!(users[0], users[1], "worker and gateway share a user");
    // The socket is the gateway's group's, and nobody else's.
    assert_eq!(
        key("taskgate-worker.socket", "SocketMode").as_deref(),
        Some("0660")
    );
    assert_eq!(
        key("taskgate-worker.socket", "SocketGroup"),
        key("taskgate-gateway.service", "Group")
    );
}
