//! Client IP resolution (socket peer, or `X-Forwarded-For` behind a trusted proxy) and the allowlist.
use std::net::IpAddr;

use ipnet::IpNet;

/// The optional IP allowlist of the webhook endpoint.
#[derive(Clone, Debug, Default)]
pub struct IpPolicy {
    allowed: Vec<IpNet>,
    trusted_proxies: Vec<IpNet>,
}

impl IpPolicy {
    pub fn new(allowed: Vec<IpNet>, trusted_proxies: Vec<IpNet>) -> Self {
        Self {
            allowed,
            trusted_proxies,
        }
    }

    /// Whether an allowlist is configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.allowed.is_empty()
    }

    /// The client's address: the peer, unless the peer is a trusted proxy, in which case the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, forwarded_for: Option<&str>) -> IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let Some(header) = forwarded_for else {
            return peer;
        };
        let mut client = peer;
        for hop in header.rsplit(',') {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !self.is_trusted_proxy(ip) {
                        break;
                    }
                }
                // An entry we cannot read ends the chain we can vouch for.
                Err(_) => break,
            }
        }
        client
    }

    /// Whether `ip` may call the webhook endpoint.
    pub fn allows(&self, ip: IpAddr) -> bool {
        !self.is_enabled() || self.allowed.iter().any(|net| net.contains(&canonical(ip)))
    }

    fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.trusted_proxies
            .iter()
            .any(|net| net.contains(&canonical(ip)))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, from dual-stack sockets) compare as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn no_allowlist_allows_everyone() {
        let policy = IpPolicy::default();
        assert!(policy.allows(ip("203.0.113.9")));
    }

    #[test]
    fn allowlist_checks_the_peer_and_ignores_untrusted_forwarded_for() {
        let policy = IpPolicy::new(nets(&["203.0.113.0/24"]), vec![]);
        assert!(policy.allows(policy.client_ip(ip("203.0.113.9"), None)));
        let spoofed = policy.client_ip(ip("198.51.100.1"), Some("203.0.113.9"));
        assert_eq!(spoofed, ip("198.51.100.1"));
        assert!(!policy.allows(spoofed));
    }

    #[test]
    fn trusted_proxy_hands_over_the_client_address() {
        let policy = IpPolicy::new(nets(&["203.0.113.0/24"]), nets(&["10.0.0.0/8"]));
        let client = policy.client_ip(ip("10.1.1.1"), Some("1.1.1.1, 203.0.113.9, 10.2.2.2"));
        assert_eq!(client, ip("203.0.113.9"));
        assert!(policy.allows(client));
        assert_eq!(policy.client_ip(ip("10.1.1.1"), None), ip("10.1.1.1"));
        assert_eq!(
            policy.client_ip(ip("10.1.1.1"), Some("garbage")),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_peers_match_ipv4_ranges() {
        let policy = IpPolicy::new(nets(&["127.0.0.0/8"]), vec![]);
        assert!(policy.allows(ip("::ffff:127.0.0.1")));
    }
}
