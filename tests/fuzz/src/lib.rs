//! The bodies of taskgate's fuzz targets.
//!
//! Each target is a plain `fn(&[u8])` that panics when the code under test misbehaves: a
//! panic inside the parser, or a property that does not hold (a canary secret surviving
//! redaction, an accepted module name that breaks the grammar, a token-file error that
//! quotes the file). `fuzz/fuzz_targets/<name>.rs` hands each one libFuzzer's input; the
//! normal test command runs every stored corpus file through them once
//! (`tests/corpus.rs`), so a crash found once stays fixed.
//!
//! The bodies never touch the network and never read a file the input names: config
//! keys that name a file to read (`metrics.auth_token_file`, `worker.database_url_file`)
//! are dropped before the config is built.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use taskgate_shared::{
    cidr::{canonical, CidrList},
    redact::{is_secret_key, redact as redact_text, REDACTED},
    tokens::{parse_bearer, TokenSet},
};

/// A fuzz target: its name (the directory under `fuzz/corpus/`) and its body.
pub struct Target {
    /// Name, as `cargo fuzz run <name>` spells it.
    pub name: &'static str,
    /// The body.
    pub body: fn(&[u8]),
}

/// Every target this crate was built with.
pub const TARGETS: &[Target] = &[
    Target {
        name: "cidr",
        body: cidr,
    },
    Target {
        name: "tokens",
        body: tokens,
    },
    Target {
        name: "bearer",
        body: bearer,
    },
    Target {
        name: "redact",
        body: redact,
    },
    #[cfg(feature = "worker")]
    Target {
        name: "modules",
        body: modules,
    },
    #[cfg(feature = "gateway")]
    Target {
        name: "gateway_config",
        body: gateway_config,
    },
    #[cfg(feature = "worker")]
    Target {
        name: "worker_config",
        body: worker_config,
    },
];

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// `shared::cidr`: one entry a line. Whatever parses must contain its own network
/// address, and an IPv4-mapped spelling must match like the IPv4 address.
pub fn cidr(data: &[u8]) {
    let text = text(data);
    let items: Vec<&str> = text.lines().collect();
    let Ok(list) = CidrList::parse("--allow-cidr", &items) else {
        return;
    };
    for net in list.nets() {
        let addr = net.network();
        assert!(list.allows(addr), "{net} does not allow its own network");
        if let IpAddr::V4(v4) = addr {
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            assert!(list.allows(mapped), "{net} does not allow {mapped}");
        }
    }
    if list.is_empty() {
        assert!(list.allows(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9))));
    }
    // Arbitrary addresses from the input's first bytes: no panic, and canonical() is
    // idempotent.
    let mut b = [0u8; 16];
    for (i, x) in data.iter().take(16).enumerate() {
        b[i] = *x;
    }
    for ip in [
        IpAddr::V6(Ipv6Addr::from(b)),
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])),
    ] {
        let _ = list.allows(ip);
        assert_eq!(canonical(canonical(ip)), canonical(ip));
    }
}

/// `shared::tokens` file parsing: every listed token verifies, nothing else does, and an
/// error names a line number, never the token.
pub fn tokens(data: &[u8]) {
    let text = text(data);
    match TokenSet::parse_file_text("--auth-token-file", &text) {
        Ok(set) => {
            let listed: Vec<&str> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .collect();
            assert_eq!(set.len(), listed.len());
            for t in &listed {
                assert!(set.verify(t.as_bytes()), "a listed token does not verify");
                let mut longer = t.as_bytes().to_vec();
                longer.push(b'x');
                if !listed.iter().any(|o| o.as_bytes() == longer.as_slice()) {
                    assert!(!set.verify(&longer), "a token plus one byte verifies");
                }
            }
            assert!(!set.verify(b""));
        }
        Err(e) => {
            let r = e.reason.as_str();
            let fixed = r == "the token file holds no token (one token a line; # starts a comment)";
            let per_line = r.strip_prefix("line ").and_then(|rest| {
                let (n, why) = rest.split_once(": token ")?;
                (n.parse::<usize>().is_ok()
                    && (why == "is empty"
                        || why == "holds a space or a non-printable or non-ASCII character"))
                    .then_some(())
            });
            assert!(
                fixed || per_line.is_some(),
                "the error is not one of the fixed messages (it may quote the file): {r:?}"
            );
        }
    }
}

/// `shared::tokens::parse_bearer`: a credential it returns is visible ASCII cut from
/// the header's end, and every valid token round-trips through `Bearer <token>`.
pub fn bearer(data: &[u8]) {
    if let Some(tok) = parse_bearer(data) {
        assert!(!tok.is_empty());
        assert!(tok.iter().all(u8::is_ascii_graphic));
        assert!(data[..6].eq_ignore_ascii_case(b"bearer"));
        let pos = data
            .windows(tok.len())
            .rposition(|w| w == tok)
            .expect("the token is part of the header");
        assert!(data[pos + tok.len()..].iter().all(|&b| b == b' '));
        assert!(data[6..pos].iter().all(|&b| b == b' ') && pos > 6);
    }
    if !data.is_empty() && data.iter().all(u8::is_ascii_graphic) {
        for scheme in [&b"Bearer "[..], b"bearer  ", b"BEARER "] {
            let mut h = scheme.to_vec();
            h.extend_from_slice(data);
            h.extend_from_slice(b"  ");
            assert_eq!(parse_bearer(&h), Some(data), "round trip");
        }
    }
}

/// The canary secret the redact target plants. `Q` appears nowhere else in the text the
/// target builds (it is stripped from the fuzzed parts and from the key), so any `Q` left
/// in the output is part of the secret that survived.
pub const CANARY: &str = "QQQQQQQQQQQQ";

/// `shared::redact`: arbitrary text never panics, and a canary secret placed as the
/// value of a secret-like key (in the forms logs really have) or after `Bearer` never
/// survives, whatever text surrounds it.
///
/// Input layout: byte 0 picks the form, byte 1 the key word, byte 2 the separator before
/// it, byte 3 the letter case; the rest is split at the first 0xFF into the text before
/// and after.
pub fn redact(data: &[u8]) {
    // Any text: no panic, and redaction never grows a secret-free text.
    let whole = text(data);
    let out = redact_text(&whole);
    if !out.contains(REDACTED) {
        assert_eq!(out, whole);
    }

    if data.len() < 4 {
        return;
    }
    const WORDS: &[&str] = &[
        "password",
        "passwd",
        "secret",
        "token",
        "api_key",
        "api-key",
        "apikey",
        "authorization",
        "cookie",
        "private_key",
        "private-key",
        "privatekey",
        "credential",
        "db_password",
        "X-Api-Key",
        "METRICS_AUTH_TOKEN",
        "client_secret",
        "auth_token",
    ];
    const SEPARATORS: &[&str] = &[" ", "\n", ", ", "&", "{", "\t", "; ", "(", "[", "\r\n", "?"];
    let word = WORDS[data[1] as usize % WORDS.len()];
    let key: String = match data[3] % 3 {
        0 => word.to_string(),
        1 => word.to_ascii_uppercase(),
        _ => word
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect(),
    };
    assert!(is_secret_key(&key));
    let s = CANARY;
    let form = match data[0] % 16 {
        0 => format!("{key}={s}"),
        1 => format!("{key}: {s}"),
        2 => format!("\"{key}\": \"{s}\""),
        3 => format!("\"{key}\":\"{s}\""),
        4 => format!("{{\\\"{key}\\\": \\\"{s}\\\"}}"),
        5 => format!("{key}: \"{s}\""),
        6 => format!("Authorization: Bearer {s}"),
        7 => format!("Bearer {s}"),
        8 => format!("{key} = '{s}'"),
        9 => format!("-H '{key}: {s}'"),
        10 => format!("\"{key}\": {{\"x\": \"{s}\"}}"),
        11 => format!("?a=1&{key}={s}&b=2"),
        12 => format!("{key}=\"{s}\""),
        13 => format!("\"{key}\": [\"{s}\"]"),
        14 => format!("authorization: bearer    {s}"),
        _ => format!("{key}:{s}"),
    };
    let sep = SEPARATORS[data[2] as usize % SEPARATORS.len()];
    let rest = &data[4..];
    let (before, after) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let strip = |b: &[u8]| text(b).replace(['Q', 'q'], "");
    let planted = format!("{}{sep}{form}{}", strip(before), strip(after));
    let out = redact_text(&planted);
    assert!(
        !out.contains('Q'),
        "the canary survived redaction:\n in: {planted:?}\nout: {out:?}"
    );
}

/// Module names and the allow-list (`worker/src/modules.rs`). The first line is the
/// allow-list, each further line a name. An accepted name must follow the grammar,
/// checked here independently.
#[cfg(feature = "worker")]
pub fn modules(data: &[u8]) {
    use taskgate_worker::modules::{validate_name, AllowList, ModuleError, MAX_MODULE_LEN};

    fn grammar(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= MAX_MODULE_LEN
            && name.split('.').all(|seg| {
                let b = seg.as_bytes();
                !b.is_empty()
                    && (b[0].is_ascii_alphabetic() || b[0] == b'_')
                    && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
            })
    }

    let text = text(data);
    let mut lines = text.split('\n');
    let list_line = lines.next().unwrap_or_default();
    let list = AllowList::parse("ALLOWED_TASK_MODULES", &[list_line]);
    for name in lines {
        let valid = validate_name(name);
        assert_eq!(
            valid.is_ok(),
            grammar(name),
            "validate_name disagrees on {name:?}"
        );
        if let Err(ModuleError::Malformed { name: shown, .. }) = &valid {
            assert!(shown.chars().count() <= MAX_MODULE_LEN);
        }
        if let Ok(list) = &list {
            if list.check(name).is_ok() {
                assert!(grammar(name), "allowed a malformed name {name:?}");
                assert!(!list.is_empty(), "an empty list allowed {name:?}");
            }
        }
    }
    if let Ok(list) = &list {
        // An allow-list that parsed allows nothing outside its entries: a name no entry
        // could have produced is refused.
        assert!(list.check("zz_fuzz_never_listed.x9").is_err() || list_line.contains("zz_"));
    }
}

/// The gateway's `gateway.toml` plus validation (`Config::from_parts` with no flags).
#[cfg(feature = "gateway")]
pub fn gateway_config(data: &[u8]) {
    use taskgate_gateway::config::{Cli, Config, FileConfig};
    use taskgate_shared::config::parse_toml;

    let Some(text) = without_file_keys(data, &[("metrics", "auth_token_file")]) else {
        return;
    };
    let Ok(file) = parse_toml::<FileConfig>("--config fuzz.toml", &text) else {
        return;
    };
    if let Err(errs) = Config::from_parts(&Cli::default(), file) {
        assert!(!errs.0.is_empty());
        for e in &errs.0 {
            assert!(!e.key.is_empty() && !e.reason.is_empty(), "{e:?}");
        }
    }
}

/// The worker's `worker.toml` plus validation (`Config::build` for `worker run`).
#[cfg(feature = "worker")]
pub fn worker_config(data: &[u8]) {
    use taskgate_shared::config::parse_toml;
    use taskgate_worker::{
        cli::{Cli, Command, RunArgs},
        config::{Config, FileConfig},
    };

    let Some(text) = without_file_keys(data, &[("worker", "database_url_file")]) else {
        return;
    };
    let Ok(file) = parse_toml::<FileConfig>("--config fuzz.toml", &text) else {
        return;
    };
    let cli = Cli {
        config: None,
        database_url: None,
        allowed_modules: None,
        log_format: None,
        log_level: None,
        log_dir: None,
        command: Command::Migrate,
    };
    if let Err(errs) = Config::build(&cli, Some(&RunArgs::default()), file) {
        assert!(!errs.0.is_empty());
        for e in &errs.0 {
            assert!(!e.key.is_empty() && !e.reason.is_empty(), "{e:?}");
        }
    }
}

/// The input as TOML text with the keys that name a file to read removed, so the body
/// reads no file the input chooses. `None` when the input is not a TOML table (the typed
/// parse is then still exercised on the raw text).
#[cfg(any(feature = "gateway", feature = "worker"))]
fn without_file_keys(data: &[u8], keys: &[(&str, &str)]) -> Option<String> {
    let raw = std::str::from_utf8(data).ok()?;
    let mut table: toml::Table = match raw.parse() {
        Ok(t) => t,
        Err(_) => return Some(raw.to_string()),
    };
    let mut changed = false;
    for (section, key) in keys {
        if let Some(toml::Value::Table(t)) = table.get_mut(*section) {
            changed |= t.remove(*key).is_some();
        }
    }
    Some(if changed {
        table.to_string()
    } else {
        raw.to_string()
    })
}
