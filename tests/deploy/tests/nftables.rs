//! `deploy/nftables/taskgate-egress.nft`: `nft -c -f` accepts it, and its rules keep the
//! promises: only the worker's user, metadata refused before anything is accepted,
//! deny by default, drops logged with a rate limit.

use std::{fs, process::Command};

use taskgate_deploy_tests::{repo, require, run};

const RULESET: &str = "deploy/nftables/taskgate-egress.nft";
const USER_LINE: &str = "define WORKER_USER = \"taskgate-worker\"";

fn ruleset() -> String {
    fs::read_to_string(repo(RULESET)).expect("read the ruleset")
}

fn user_exists(name: &str) -> bool {
    run(Command::new("getent").args(["passwd", name])).ok
}

#[test]
fn nft_check_accepts_the_ruleset() {
    let nft = require("nft", "checks the egress ruleset (Debian package nftables)");
    let text = ruleset();
    assert_eq!(
        text.lines()
            .filter(|l| l.starts_with("define WORKER_USER"))
            .count(),
        1,
        "one WORKER_USER definition"
    );
    // nft resolves the user name at load time. Where the deployment's user does not
    // exist (a CI machine), check the same file with only that line pointing at a user
    // that does; everything else is checked as written.
    let (checked, note) = if user_exists("taskgate-worker") {
        (text.clone(), "as written")
    } else {
        assert!(text.contains(USER_LINE), "expected `{USER_LINE}`");
        (
            text.replace(USER_LINE, "define WORKER_USER = \"nobody\""),
            "with WORKER_USER = nobody (taskgate-worker does not exist here)",
        )
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("taskgate-egress.nft");
    fs::write(&file, checked).expect("write ruleset");
    let out = run(Command::new(nft).arg("-c").arg("-f").arg(&file));
    let findings = format!("{}{}", out.stdout, out.stderr);
    assert!(
        out.ok && findings.trim().is_empty(),
        "nft -c -f {RULESET} {note} ({:?}):\n{findings}",
        out.code
    );
    eprintln!("nft -c -f {RULESET}: ok, {note}");
}

/// The rules of the `output` chain, in order, without comments.
fn output_rules(text: &str) -> Vec<String> {
    let start = text.find("chain output {").expect("an output chain");
    let body = &text[start..];
    let end = body.find("\n\t}").expect("end of the output chain");
    body[..end]
        .lines()
        .skip(1)
        .map(|l| l.split('#').next().unwrap_or_default().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn rules_confine_the_worker_user_refuse_metadata_first_and_deny_by_default() {
    let text = ruleset();
    let rules = output_rules(&text);
    assert!(
        rules[0].starts_with("type filter hook output"),
        "{:?}",
        rules[0]
    );
    assert_eq!(
        rules[1], "meta skuid != $WORKER_USER accept",
        "only the worker's user"
    );
    // The metadata sets hold both addresses…
    for (set, addr) in [
        ("metadata_v4", "169.254.169.254"),
        ("metadata_v6", "fd00:ec2::254"),
    ] {
        let at = text.find(&format!("set {set} {{")).expect(set);
        let block = &text[at..at + text[at..].find('}').expect("set end")];
        assert!(block.contains(addr), "{set} lacks {addr}");
    }
    // …and are refused before the first accept of any destination.
    let first_accept = rules
        .iter()
        .skip(2)
        .position(|r| r.ends_with("accept"))
        .expect("some accept")
        + 2;
    for set in ["@metadata_v4", "@metadata_v6"] {
        let at = rules
            .iter()
            .position(|r| r.contains(set) && r.ends_with("jump refuse"))
            .unwrap_or_else(|| panic!("no refuse rule for {set}"));
        assert!(at < first_accept, "{set} is refused after an accept");
    }
    assert_eq!(
        rules.last().map(String::as_str),
        Some("counter jump refuse"),
        "the chain must end in a refusal (deny by default)"
    );
    for needed in [
        "@dns_v4",
        "@database_v4",
        "@destinations_v4",
        "@dns_v6",
        "@database_v6",
        "@destinations_v6",
    ] {
        assert!(
            rules.iter().any(|r| r.contains(needed)),
            "no rule for {needed}"
        );
    }
    // Drops are logged, rate-limited, before being refused.
    let refuse = &text[text.find("chain refuse {").expect("refuse chain")..];
    let log = refuse
        .lines()
        .find(|l| l.contains(" log "))
        .expect("a log rule");
    assert!(log.contains("limit rate"), "unlimited log: {log}");
    assert!(refuse.contains("reject"), "refuse chain must reject");
}
