//! The worker-level egress allow-list: which destinations each task module may reach.
//!
//! Executors get `HTTPS_PROXY`/`HTTP_PROXY` pointing at the worker's own proxy
//! ([`proxy`]), with a per-task credential so the proxy knows which task (and so which
//! module's policy) a connection belongs to. Where the worker may create network
//! namespaces (root, or unprivileged user namespaces), each executor runs in a namespace
//! whose only way out is that proxy ([`jail`]), so a task that ignores the proxy gets no
//! network at all. Elsewhere egress is advisory and `enforce` refuses to start unless the
//! operator says that is fine.
//!
//! The proxy resolves names itself and checks every resolved address, then connects to
//! the address it checked: a name cannot be re-pointed (DNS rebinding) between the check
//! and the connection. Loopback, link-local (incl. 169.254.169.254), `fd00:ec2::254`,
//! private ranges, CGNAT and IPv4-mapped forms of them are denied unless a policy names
//! them in `allow_cidrs`.

pub mod jail;
pub mod proxy;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use ipnet::IpNet;
use taskgate_shared::{cidr::canonical, config::ConfigErrors};

/// What the policy does with a connection it would deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No proxy, no checks.
    Off,
    /// Allow, but log and count what would be denied.
    Report,
    /// Deny.
    Enforce,
}

/// One module's (or the default) allow-list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Exact host names (lower case, no trailing dot).
    pub hosts: Vec<String>,
    /// `*.suffix` patterns, stored as `.suffix`.
    pub suffixes: Vec<String>,
    /// Networks that may be reached (also how a special range is allowed on purpose).
    pub cidrs: Vec<IpNet>,
    /// Ports; empty means any.
    pub ports: Vec<u16>,
}

/// The whole egress policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Mode.
    pub mode: Mode,
    /// Rule for modules without their own.
    pub default: Option<Rule>,
    /// Rules by exact module name.
    pub modules: BTreeMap<String, Rule>,
    /// Rules by `prefix.` (from `prefix.*` keys), longest first.
    pub prefixes: Vec<(String, Rule)>,
    /// DNS lookup deadline.
    pub dns_timeout: Duration,
    /// Upstream connect deadline.
    pub connect_timeout: Duration,
}

/// The outcome of checking one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the policy allows it.
    pub allowed: bool,
    /// Why (a fixed word for logs and metrics).
    pub reason: &'static str,
    /// The checked address to connect to (when one is known).
    pub addr: Option<SocketAddr>,
}

impl Policy {
    /// Parses the `[egress]` section. `None` mode text means `off`.
    pub fn from_config(section: &crate::config::EgressSection, errs: &mut ConfigErrors) -> Self {
        let mode = match section.mode.as_deref() {
            None | Some("off") => Mode::Off,
            Some("report") => Mode::Report,
            Some("enforce") => Mode::Enforce,
            Some(other) => {
                errs.push(
                    "egress.mode",
                    format!("{other:?} is not a mode; use enforce, report or off"),
                );
                Mode::Off
            }
        };
        let mut modules = BTreeMap::new();
        let mut prefixes = Vec::new();
        for (name, m) in &section.modules {
            let key = format!("egress.modules.\"{name}\"");
            let rule = parse_rule(&key, m, errs);
            if let Some(prefix) = name.strip_suffix(".*") {
                if crate::modules::validate_name(prefix).is_err() {
                    errs.push(&key, "is not a module name or `prefix.*`");
                }
                prefixes.push((format!("{prefix}."), rule));
            } else {
                if crate::modules::validate_name(name).is_err() {
                    errs.push(&key, "is not a module name or `prefix.*`");
                }
                modules.insert(name.clone(), rule);
            }
        }
        prefixes.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        let default = section
            .default
            .as_ref()
            .map(|d| parse_rule("egress.default", d, errs));
        Policy {
            mode,
            default,
            modules,
            prefixes,
            dns_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
        }
    }

    /// The rule that applies to `module`: its own, the longest matching prefix, or the
    /// default.
    pub fn rule_for(&self, module: &str) -> Option<&Rule> {
        self.modules
            .get(module)
            .or_else(|| {
                self.prefixes
                    .iter()
                    .find(|(p, _)| module.starts_with(p.as_str()))
                    .map(|(_, r)| r)
            })
            .or(self.default.as_ref())
    }

    /// Checks `host:port` for `module`, resolving names with a deadline.
    pub async fn decide(&self, module: &str, host: &str, port: u16) -> Decision {
        let deny = |reason, addr| Decision {
            allowed: false,
            reason,
            addr,
        };
        let Some(rule) = self.rule_for(module) else {
            return deny("no_policy", None);
        };
        if !rule.ports.is_empty() && !rule.ports.contains(&port) {
            return deny("port", None);
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let literal = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            let ip = canonical(ip);
            let addr = Some(SocketAddr::new(ip, port));
            return if rule.cidrs.iter().any(|n| n.contains(&ip)) {
                Decision {
                    allowed: true,
                    reason: "cidr",
                    addr,
                }
            } else {
                deny("address", addr)
            };
        }
        if !valid_hostname(&host) {
            return deny("bad_host", None);
        }
        if !rule.hosts.contains(&host) && !rule.suffixes.iter().any(|s| host.ends_with(s.as_str()))
        {
            return deny("host", None);
        }
        let resolved = match tokio::time::timeout(
            self.dns_timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(addrs)) => addrs.collect::<Vec<_>>(),
            Ok(Err(_)) => return deny("dns_failed", None),
            Err(_) => return deny("dns_timeout", None),
        };
        let mut first_denied = None;
        for addr in resolved {
            let ip = canonical(addr.ip());
            let addr = SocketAddr::new(ip, port);
            if rule.cidrs.iter().any(|n| n.contains(&ip)) || !is_special(ip) {
                return Decision {
                    allowed: true,
                    reason: "host",
                    addr: Some(addr),
                };
            }
            first_denied.get_or_insert(addr);
        }
        deny("resolves_to_denied_address", first_denied)
    }
}

fn parse_rule(key: &str, m: &crate::config::EgressModule, errs: &mut ConfigErrors) -> Rule {
    let mut rule = Rule {
        ports: m.allow_ports.clone(),
        ..Rule::default()
    };
    for h in &m.allow_hosts {
        let h = h.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Some(suffix) = h.strip_prefix("*.") {
            if valid_hostname(suffix) {
                rule.suffixes.push(format!(".{suffix}"));
                continue;
            }
        } else if valid_hostname(&h) {
            rule.hosts.push(h);
            continue;
        }
        errs.push(
            format!("{key}.allow_hosts"),
            format!("{h:?} is not a host name or *.suffix"),
        );
    }
    match taskgate_shared::cidr::CidrList::parse(&format!("{key}.allow_cidrs"), &m.allow_cidrs) {
        Ok(list) => rule.cidrs = list.nets().to_vec(),
        Err(e) => errs.0.push(e),
    }
    if m.allow_ports.contains(&0) {
        errs.push(format!("{key}.allow_ports"), "0 is not a port");
    }
    rule
}

fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
        })
}

/// Addresses no task reaches unless a policy names them: loopback, link-local (cloud
/// metadata), private, CGNAT, unspecified, multicast/broadcast/reserved, ULA (incl.
/// `fd00:ec2::254`), and IPv6 forms that embed IPv4.
pub fn is_special(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_special_v4(v4),
        IpAddr::V6(v6) => is_special_v6(v6),
    }
}

fn is_special_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || a >= 240
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64.0.0/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
}

fn is_special_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (incl. fd00:ec2::254)
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] == 0x64 && seg[1] == 0xff9b) // NAT64: embeds IPv4
        || (seg[0] == 0x2002) // 6to4: embeds IPv4
        || seg[..6] == [0, 0, 0, 0, 0, 0] // IPv4-compatible (deprecated)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_ranges() {
        for s in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::a9fe:a9fe",
            "224.0.0.1",
        ] {
            assert!(is_special(s.parse().unwrap()), "{s}");
        }
        for s in ["93.184.216.34", "2606:4700::1111", "100.128.0.1", "1.1.1.1"] {
            assert!(!is_special(s.parse().unwrap()), "{s}");
        }
    }

    fn policy(toml: &str) -> Policy {
        let cfg: crate::config::EgressSection = toml::from_str(toml).unwrap();
        let mut errs = ConfigErrors::default();
        let p = Policy::from_config(&cfg, &mut errs);
        errs.into_result().unwrap();
        p
    }

    #[tokio::test]
    async fn decisions() {
        let p = policy(
            r#"
mode = "enforce"
[modules."tasks.fetch"]
allow_hosts = ["localhost", "*.example.org"]
allow_cidrs = ["203.0.113.0/24", "127.0.0.1/32"]
allow_ports = [443, 8080]
[modules."tasks.rebind"]
allow_hosts = ["localhost"]
"#,
        );
        let d = |m: &'static str, h: &'static str, port| {
            let p = p.clone();
            async move { p.decide(m, h, port).await }
        };
        assert!(d("tasks.fetch", "203.0.113.9", 443).await.allowed);
        assert!(d("tasks.fetch", "127.0.0.1", 8080).await.allowed);
        assert_eq!(d("tasks.fetch", "127.0.0.1", 22).await.reason, "port");
        assert_eq!(
            d("tasks.fetch", "169.254.169.254", 443).await.reason,
            "address"
        );
        assert_eq!(
            d("tasks.fetch", "::ffff:169.254.169.254", 443).await.reason,
            "address"
        );
        assert_eq!(d("tasks.fetch", "10.0.0.1", 443).await.reason, "address");
        assert_eq!(d("tasks.fetch", "evil.com", 443).await.reason, "host");
        assert_eq!(
            d("tasks.other", "203.0.113.9", 443).await.reason,
            "no_policy"
        );
        // Allowed by name, but the name resolves to loopback, which only an explicit CIDR allows.
        assert_eq!(
            d("tasks.rebind", "localhost", 80).await.reason,
            "resolves_to_denied_address"
        );
        assert!(d("tasks.fetch", "localhost", 443).await.allowed);
    }

    #[test]
    fn bad_policies_are_named() {
        let cfg: crate::config::EgressSection = toml::from_str(
            "mode = \"enforced\"\n[modules.\"tasks.x\"]\nallow_hosts = [\"bad host\"]\nallow_cidrs = [\"10.0.0.0/99\"]\nallow_ports = [0]\n",
        )
        .unwrap();
        let mut errs = ConfigErrors::default();
        Policy::from_config(&cfg, &mut errs);
        let text = errs.to_string();
        for k in ["egress.mode", "allow_hosts", "allow_cidrs", "allow_ports"] {
            assert!(text.contains(k), "{k}: {text}");
        }
    }
}
