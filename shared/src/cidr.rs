//! CIDR allow-lists for source addresses, IPv4 and IPv6.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use crate::config::ConfigError;

/// A list of networks; an empty list allows every address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrList {
    nets: Vec<IpNet>,
}

impl CidrList {
    /// Parses items that may each hold several comma-separated CIDRs (as in
    /// `METRICS_ALLOW_CIDRS=10.0.0.0/8,fd00::/8`). A bare address means just that host.
    /// Every bad entry is reported, not only the first.
    pub fn parse<S: AsRef<str>>(key: &str, items: &[S]) -> Result<Self, ConfigError> {
        let mut nets = Vec::new();
        let mut bad = Vec::new();
        for part in items
            .iter()
            .flat_map(|i| i.as_ref().split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match parse_one(part) {
                Some(net) => nets.push(net),
                None => bad.push(format!("{part:?}")),
            }
        }
        if !bad.is_empty() {
            return Err(ConfigError::new(
                key,
                format!(
                    "{} not a CIDR; write e.g. 10.0.0.0/8, 192.0.2.7 or fd00::/8",
                    bad.join(", ") + if bad.len() == 1 { " is" } else { " are" }
                ),
            ));
        }
        Ok(Self { nets })
    }

    /// True when the list is empty (allow all) or a network contains `ip`.
    /// IPv4-mapped IPv6 sources (`::ffff:10.0.0.1`) are matched as IPv4.
    pub fn allows(&self, ip: IpAddr) -> bool {
        if self.nets.is_empty() {
            return true;
        }
        let ip = canonical(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// True when no network is configured.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// The configured networks.
    pub fn nets(&self) -> &[IpNet] {
        &self.nets
    }
}

/// Maps IPv4-mapped IPv6 addresses to IPv4, so one rule covers both spellings.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_one(s: &str) -> Option<IpNet> {
    let net = match s.parse::<IpNet>() {
        Ok(net) => net.trunc(),
        Err(_) => IpNet::from(s.parse::<IpAddr>().ok()?),
    };
    Some(canonical_net(net))
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`) as the IPv4 network it means.
/// Sources are matched after [`canonical`], so a mapped entry left as IPv6 would never
/// match anything (found by the `cidr` fuzz target).
fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (
            v6.network().to_ipv4_mapped(),
            v6.prefix_len().checked_sub(96),
        ) {
            if let Ok(v4net) = Ipv4Net::new(v4, len) {
                return IpNet::V4(v4net);
            }
        }
    }
    net
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_matches() {
        let l = CidrList::parse("k", &["10.0.0.0/8, fd00::/8", "192.0.2.7"]).unwrap();
        assert!(l.allows("10.1.2.3".parse().unwrap()));
        assert!(l.allows("::ffff:10.9.9.9".parse().unwrap()));
        assert!(l.allows("fd12::1".parse().unwrap()));
        assert!(l.allows("192.0.2.7".parse().unwrap()));
        assert!(!l.allows("192.0.2.8".parse().unwrap()));
        assert!(!l.allows("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn mapped_entries_mean_their_ipv4_networks() {
        let l = CidrList::parse("k", &["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]).unwrap();
        for ip in [
            "10.1.2.3",
            "::ffff:10.1.2.3",
            "192.0.2.7",
            "::ffff:192.0.2.7",
        ] {
            assert!(l.allows(ip.parse().unwrap()), "{ip}");
        }
        assert!(!l.allows("11.0.0.1".parse().unwrap()));
        assert!(!l.allows("192.0.2.8".parse().unwrap()));
        assert_eq!(l.nets()[0].to_string(), "10.0.0.0/8");
    }

    #[test]
    fn empty_allows_all() {
        let l = CidrList::parse::<&str>("k", &[]).unwrap();
        assert!(l.is_empty() && l.allows("203.0.113.1".parse().unwrap()));
    }

    #[test]
    fn all_bad_entries_named() {
        let e = CidrList::parse("--allow-cidr", &["10.0.0.0/33,nope", "1.2.3.4"]).unwrap_err();
        assert_eq!(e.key, "--allow-cidr");
        assert!(
            e.reason.contains("10.0.0.0/33") && e.reason.contains("nope"),
            "{e}"
        );
    }
}
