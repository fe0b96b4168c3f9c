//! Where mail for a domain goes: MX lookup (RFC 5321 §5.1), null MX (RFC
//! 7505), implicit MX, address literals and the smarthost.
//!
//! The answer is a list of [`Exchanger`]s in the order they should be tried,
//! each with every address it has. The SMTP client walks that list; it never
//! does DNS itself, so tests can hand it exchangers directly.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use hickory_resolver::config::{
    ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolveHosts, ResolverConfig,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData, Record};
use hickory_resolver::TokioResolver;
use postino_core::config::DnsConfig;
use postino_core::logsafe::escape;
use rand::seq::SliceRandom;
use tracing::debug;

/// Port used for a smarthost given without one (`relay.example` means
/// `relay.example:25`, as Postfix's `relayhost`).
pub const DEFAULT_SMARTHOST_PORT: u16 = 25;

/// One host to try, with all of its addresses (A records first, then AAAA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanger {
    /// The exchanger's name without the trailing dot, the domain itself for an
    /// implicit MX, or the literal as written (`[192.0.2.1]`).
    pub host: String,
    /// The MX preference (lower is tried first); 0 for an implicit MX.
    pub preference: u16,
    /// Its addresses, in the order to try them.
    pub addrs: Vec<SocketAddr>,
}

/// The exchangers of a domain and whether DNSSEC proved them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxAnswer {
    /// As [`MxResolver::resolve`] returns them.
    pub exchangers: Vec<Exchanger>,
    /// Names of the exchangers whose MX record (or, for an implicit MX,
    /// the domain's address records) and address records were all
    /// DNSSEC-validated (`Secure`): the only hosts DANE applies to (RFC
    /// 7672 §2.2). Empty without `[dns] dnssec`.
    pub secure: Vec<String>,
}

/// The TLSA records of one exchanger, as far as DANE is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsaAnswer {
    /// Validated records (`Secure`), possibly none usable for SMTP.
    Secure(Vec<super::dane::Tlsa>),
    /// No records, or records that are not validated: no DANE for this
    /// host (RFC 7672 §2.2: it falls back to the usual TLS policy).
    Absent,
}

/// Why no exchanger could be found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LookupError {
    /// The domain publishes `MX 0 .`: it accepts no mail (RFC 7505).
    #[error("domain does not accept mail (null MX)")]
    NullMx,
    /// NXDOMAIN for the domain itself.
    #[error("domain does not exist")]
    NoSuchDomain,
    /// The domain exists but none of its exchangers has an address (or it has
    /// neither MX nor A/AAAA records).
    #[error("no address for any mail exchanger")]
    NoAddresses,
    /// The domain cannot be a DNS name (bad label, too long).
    #[error("invalid domain: {0}")]
    InvalidDomain(String),
    /// Timeouts, SERVFAIL, REFUSED, network errors, a bad smarthost setting:
    /// try again later.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

impl LookupError {
    /// True when retrying cannot help and the message should bounce.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, LookupError::Temporary(_))
    }

    /// RFC 3463 enhanced status code for a bounce or a deferral note.
    pub fn status(&self) -> &'static str {
        match self {
            // RFC 7505 §4.2: "556 5.1.10".
            LookupError::NullMx => "5.1.10",
            // X.1.2: bad destination system address.
            LookupError::NoSuchDomain | LookupError::InvalidDomain(_) => "5.1.2",
            // X.4.4: unable to route (Postfix: "Host or domain name not found").
            LookupError::NoAddresses => "5.4.4",
            // X.4.3: directory server failure (Postfix uses it for DNS trouble).
            LookupError::Temporary(_) => "4.4.3",
        }
    }
}

/// Failure to set up the resolver (e.g. an unreadable `/etc/resolv.conf`).
#[derive(Debug, thiserror::Error)]
#[error("DNS resolver setup: {0}")]
pub struct ResolverError(String);

/// Finds exchangers for domains. Cheap to clone: clones share the resolver,
/// its connections and its cache.
#[derive(Clone)]
pub struct MxResolver {
    resolver: Arc<TokioResolver>,
    /// Answers are DNSSEC-validated (`[dns] dnssec` or a trust anchor).
    validates: bool,
}

impl std::fmt::Debug for MxResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MxResolver").finish_non_exhaustive()
    }
}

/// How one name's address lookup ended.
enum Addresses {
    /// The addresses, and whether every record was DNSSEC-validated.
    Found(Vec<IpAddr>, bool),
    /// NXDOMAIN or no A/AAAA records.
    None {
        nxdomain: bool,
    },
    Temporary(String),
}

impl MxResolver {
    /// A resolver that asks exactly `config.nameservers` (UDP, falling back to
    /// TCP for truncated answers) or, when that list is empty, the servers of
    /// the system configuration.
    ///
    /// # Errors
    ///
    /// When the system configuration cannot be read or the resolver cannot be
    /// built.
    pub fn new(config: &DnsConfig) -> Result<Self, ResolverError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| ResolverError(e.to_string()))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts = builder.options_mut();
        if let Some(timeout) = config.timeout {
            opts.timeout = timeout;
        }
        // Mail routing is DNS only (Postfix's `smtp_host_lookup = dns`): an
        // /etc/hosts entry must not silently redirect a domain's mail.
        opts.use_hosts_file = ResolveHosts::Never;
        // Names are queried fully qualified (see `fqdn`), so search lists and
        // ndots never apply.
        opts.ndots = 0;
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.try_tcp_on_error = true;
        // A negative answer is not kept: the queue retries every few minutes
        // and a domain whose owner just added its MX must be seen at the next
        // try, not after the SOA's negative TTL. The local recursive resolver
        // caches anyway. Errors (SERVFAIL, timeouts) are never cached by
        // hickory.
        opts.negative_max_ttl = Some(Duration::ZERO);
        if config.validates() {
            opts.validate = true;
            if let Some(path) = &config.trust_anchor {
                let anchors = TrustAnchors::from_file(path).map_err(|e| {
                    ResolverError(format!("dns.trust_anchor {}: {e}", path.display()))
                })?;
                builder = builder.with_trust_anchor(Arc::new(anchors));
            }
        }
        let resolver = builder.build().map_err(|e| ResolverError(e.to_string()))?;
        Ok(MxResolver {
            resolver: Arc::new(resolver),
            validates: config.validates(),
        })
    }

    /// The TLSA records of `_port._tcp.host` (RFC 7672 §2.2.3), validated.
    ///
    /// # Errors
    ///
    /// A lookup that failed (timeout, SERVFAIL, DNSSEC bogus): RFC 7672
    /// §2.2 says such a host must not be used until it can be looked up.
    pub async fn tlsa(&self, host: &str, port: u16) -> Result<TlsaAnswer, LookupError> {
        if !self.validates {
            return Ok(TlsaAnswer::Absent);
        }
        let name = fqdn(&format!("_{port}._tcp.{host}"))?;
        match self.resolver.tlsa_lookup(name).await {
            Ok(lookup) => {
                let answers = lookup.answers();
                if answers.is_empty() || !all_secure(answers) {
                    return Ok(TlsaAnswer::Absent);
                }
                let records = answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::TLSA(t) => Some(super::dane::Tlsa::from_rdata(t)),
                        _ => None,
                    })
                    .collect();
                Ok(TlsaAnswer::Secure(records))
            }
            Err(e) => match classify(&e) {
                Negative::NxDomain | Negative::NoData => Ok(TlsaAnswer::Absent),
                Negative::Other => Err(LookupError::Temporary(format!(
                    "TLSA _{port}._tcp.{host}: {e}"
                ))),
            },
        }
    }

    /// The `_mta-sts.DOMAIN` TXT record's text (RFC 8461 §3.1): the strings
    /// of each record joined; `Ok(vec![])` when there is none.
    ///
    /// # Errors
    ///
    /// A temporary DNS failure.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        let name = fqdn(name)?;
        match self.resolver.txt_lookup(name.clone()).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part))
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => match classify(&e) {
                Negative::NxDomain | Negative::NoData => Ok(Vec::new()),
                Negative::Other => Err(LookupError::Temporary(format!(
                    "TXT {}: {e}",
                    display_name(&name)
                ))),
            },
        }
    }

    /// The addresses of `host` on `port` (for the MTA-STS policy server).
    ///
    /// # Errors
    ///
    /// No address, or a DNS failure.
    pub async fn host_addrs(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, LookupError> {
        let name = fqdn(host)?;
        match self.addresses(&name).await {
            Addresses::Found(ips, _) => Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()),
            Addresses::None { nxdomain: true } => Err(LookupError::NoSuchDomain),
            Addresses::None { nxdomain: false } => Err(LookupError::NoAddresses),
            Addresses::Temporary(e) => Err(LookupError::Temporary(e)),
        }
    }

    /// The exchangers for `domain`, best first, each with its addresses on
    /// `port`.
    ///
    /// MX records are sorted by preference and shuffled within one preference
    /// (RFC 5321 §5.1). Without MX records the domain itself is the exchanger
    /// (implicit MX). `MX 0 .` is [`LookupError::NullMx`]. An address literal
    /// (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) is used as is. Exchangers without
    /// addresses are left out.
    ///
    /// # Errors
    ///
    /// See [`LookupError`]: permanent errors mean the mail should bounce.
    pub async fn resolve(&self, domain: &str, port: u16) -> Result<Vec<Exchanger>, LookupError> {
        self.resolve_mx(domain, port).await.map(|a| a.exchangers)
    }

    /// [`MxResolver::resolve`], saying which exchangers DNSSEC proved.
    ///
    /// # Errors
    ///
    /// As [`MxResolver::resolve`]; an answer that fails DNSSEC validation
    /// is [`LookupError::Temporary`].
    pub async fn resolve_mx(&self, domain: &str, port: u16) -> Result<MxAnswer, LookupError> {
        if let Some(ip) = parse_address_literal(domain)? {
            return Ok(MxAnswer {
                exchangers: vec![Exchanger {
                    host: domain.to_string(),
                    preference: 0,
                    addrs: vec![SocketAddr::new(ip, port)],
                }],
                secure: Vec::new(),
            });
        }
        let name = fqdn(domain)?;
        let mut mx_secure = false;
        let records = match self.resolver.mx_lookup(name.clone()).await {
            Ok(lookup) => {
                mx_secure = self.validates && all_secure(lookup.answers());
                lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.clone())),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            }
            Err(e) => match classify(&e) {
                Negative::NxDomain => return Err(LookupError::NoSuchDomain),
                Negative::NoData => Vec::new(),
                Negative::Other => return Err(LookupError::Temporary(format!("MX {domain}: {e}"))),
            },
        };
        debug!(domain = %escape(domain), mx = records.len(), "MX lookup");

        if records.is_empty() {
            // RFC 5321 §5.1: no MX, the domain is its own implicit MX.
            return match self.addresses(&name).await {
                Addresses::Found(ips, secure) => Ok(MxAnswer {
                    secure: if secure && self.validates {
                        vec![display_name(&name)]
                    } else {
                        Vec::new()
                    },
                    exchangers: vec![Exchanger {
                        host: display_name(&name),
                        preference: 0,
                        addrs: ips
                            .into_iter()
                            .map(|ip| SocketAddr::new(ip, port))
                            .collect(),
                    }],
                }),
                Addresses::None { nxdomain: true } => Err(LookupError::NoSuchDomain),
                Addresses::None { nxdomain: false } => Err(LookupError::NoAddresses),
                Addresses::Temporary(e) => Err(LookupError::Temporary(e)),
            };
        }
        // RFC 7505 §3: a null MX is the one and only record. As in Postfix, a
        // root exchanger among real ones is ignored instead: it names no host.
        if records.len() == 1 && records[0].1.is_root() {
            return Err(LookupError::NullMx);
        }
        let mut records: Vec<_> = records.into_iter().filter(|(_, n)| !n.is_root()).collect();
        order_by_preference(&mut records, &mut rand::thread_rng());

        let lookups = join_all(records.iter().map(|(_, n)| self.addresses(n))).await;
        let mut exchangers = Vec::with_capacity(records.len());
        let mut secure = Vec::new();
        let mut temporary = None;
        for ((preference, name), result) in records.into_iter().zip(lookups) {
            match result {
                Addresses::Found(ips, addrs_secure) => {
                    if mx_secure && addrs_secure {
                        secure.push(display_name(&name));
                    }
                    exchangers.push(Exchanger {
                        host: display_name(&name),
                        preference,
                        addrs: ips
                            .into_iter()
                            .map(|ip| SocketAddr::new(ip, port))
                            .collect(),
                    })
                }
                Addresses::None { .. } => {
                    debug!(domain = %escape(domain), exchanger = %escape(&name.to_string()), "MX host has no address");
                }
                Addresses::Temporary(e) => {
                    debug!(domain = %escape(domain), exchanger = %escape(&name.to_string()), error = %escape(&e.to_string()), "MX host lookup failed");
                    temporary.get_or_insert(e);
                }
            }
        }
        if exchangers.is_empty() {
            // A lookup that may succeed later beats "no address": only bounce
            // when every exchanger is known to have none.
            return Err(match temporary {
                Some(e) => LookupError::Temporary(e),
                None => LookupError::NoAddresses,
            });
        }
        Ok(MxAnswer { exchangers, secure })
    }

    /// The smarthost `host:port` (or `host`, port 25; `[addr]:port` and
    /// `addr:port` for literals) as a single exchanger, by its A/AAAA records
    /// (no MX lookup, as the setting names a host).
    ///
    /// # Errors
    ///
    /// Every error is [`LookupError::Temporary`]: a smarthost that does not
    /// resolve is a local configuration problem, and mail should wait for the
    /// postmaster to fix it rather than bounce.
    pub async fn resolve_smarthost(&self, hostport: &str) -> Result<Vec<Exchanger>, LookupError> {
        let (host, port) = split_host_port(hostport)
            .ok_or_else(|| LookupError::Temporary(format!("invalid smarthost {hostport:?}")))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![Exchanger {
                host: host.to_string(),
                preference: 0,
                addrs: vec![SocketAddr::new(ip, port)],
            }]);
        }
        let name = fqdn(host).map_err(|e| LookupError::Temporary(format!("smarthost: {e}")))?;
        match self.addresses(&name).await {
            Addresses::Found(ips, _) => Ok(vec![Exchanger {
                host: host.to_string(),
                preference: 0,
                addrs: ips
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect(),
            }]),
            Addresses::None { .. } => Err(LookupError::Temporary(format!(
                "smarthost {host}: no address"
            ))),
            Addresses::Temporary(e) => Err(LookupError::Temporary(e)),
        }
    }

    /// A and AAAA records of `name`, asked in parallel. One family failing
    /// temporarily does not hide the other's addresses.
    async fn addresses(&self, name: &Name) -> Addresses {
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name.clone())
        );
        let mut ips = Vec::new();
        let mut nxdomain = false;
        let mut temporary = None;
        let mut secure = self.validates;
        for result in [v4, v6] {
            match result {
                Ok(lookup) => {
                    secure &= all_secure(lookup.answers());
                    ips.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                        RData::A(a) => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                        _ => None,
                    }));
                }
                Err(e) => match classify(&e) {
                    Negative::NxDomain => nxdomain = true,
                    Negative::NoData => {}
                    Negative::Other => {
                        temporary.get_or_insert_with(|| format!("{}: {e}", display_name(name)));
                    }
                },
            }
        }
        if !ips.is_empty() {
            Addresses::Found(ips, secure)
        } else if let Some(e) = temporary {
            Addresses::Temporary(e)
        } else {
            Addresses::None { nxdomain }
        }
    }
}

enum Negative {
    NxDomain,
    NoData,
    Other,
}

fn classify(e: &NetError) -> Negative {
    match e {
        NetError::Dns(DnsError::NoRecordsFound(nr))
            if nr.response_code == ResponseCode::NXDomain =>
        {
            Negative::NxDomain
        }
        NetError::Dns(DnsError::NoRecordsFound(_)) => Negative::NoData,
        NetError::Dns(DnsError::ResponseCode(ResponseCode::NXDomain)) => Negative::NxDomain,
        // A validated negative answer (NSEC/NSEC3): bogus ones are
        // `DnssecBogus`, a temporary failure.
        NetError::Dns(DnsError::Nsec { response, .. })
            if response.metadata.response_code == ResponseCode::NXDomain =>
        {
            Negative::NxDomain
        }
        NetError::Dns(DnsError::Nsec { .. }) => Negative::NoData,
        _ => Negative::Other,
    }
}

/// True when every record of an answer was DNSSEC-validated.
fn all_secure(records: &[Record]) -> bool {
    !records.is_empty() && records.iter().all(|r| r.proof == Proof::Secure)
}

/// Sorts by preference and shuffles each run of equal preference, so load
/// spreads over equally preferred exchangers (RFC 5321 §5.1).
fn order_by_preference<T>(records: &mut [(u16, T)], rng: &mut impl rand::Rng) {
    records.shuffle(rng);
    // A stable sort keeps the shuffled order within one preference.
    records.sort_by_key(|(pref, _)| *pref);
}

/// The domain as an absolute DNS name, so no search domain is ever appended.
/// International names become their A-label (punycode) form.
fn fqdn(domain: &str) -> Result<Name, LookupError> {
    let domain = domain.trim_end_matches('.');
    if domain.is_empty() {
        return Err(LookupError::InvalidDomain(String::new()));
    }
    let mut name = Name::from_utf8(domain)
        .map_err(|e| LookupError::InvalidDomain(format!("{domain}: {e}")))?;
    name.set_fqdn(true);
    Ok(name)
}

fn display_name(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_string()
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]` (RFC 5321 §4.1.3). `Ok(None)` for a
/// domain name; an error for a bracketed text that is no address.
fn parse_address_literal(domain: &str) -> Result<Option<IpAddr>, LookupError> {
    let Some(inner) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) else {
        return Ok(None);
    };
    let invalid = || LookupError::InvalidDomain(domain.to_string());
    if let Some(v6) = inner
        .get(..5)
        .filter(|tag| tag.eq_ignore_ascii_case("IPv6:"))
        .map(|_| &inner[5..])
    {
        return v6
            .parse::<Ipv6Addr>()
            .map(|ip| Some(IpAddr::V6(ip)))
            .map_err(|_| invalid());
    }
    inner
        .parse::<std::net::Ipv4Addr>()
        .map(|ip| Some(IpAddr::V4(ip)))
        .map_err(|_| invalid())
}

/// Splits `host:port`, `[v6]:port`, `host` (port 25). `None` on a bad port.
fn split_host_port(hostport: &str) -> Option<(&str, u16)> {
    let hostport = hostport.trim();
    if hostport.is_empty() {
        return None;
    }
    if hostport.starts_with('[') {
        let end = hostport.find(']')?;
        let (host, rest) = hostport.split_at(end + 1);
        return match rest.strip_prefix(':') {
            Some(port) => Some((host, port.parse().ok()?)),
            None if rest.is_empty() => Some((host, DEFAULT_SMARTHOST_PORT)),
            None => None,
        };
    }
    match hostport.rsplit_once(':') {
        // More than one colon without brackets: a bare IPv6 address.
        Some((host, _)) if host.contains(':') => Some((hostport, DEFAULT_SMARTHOST_PORT)),
        Some((host, port)) if !host.is_empty() => Some((host, port.parse().ok()?)),
        Some(_) => None,
        None => Some((hostport, DEFAULT_SMARTHOST_PORT)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn address_literals() {
        let cases: &[(&str, Result<Option<IpAddr>, ()>)] = &[
            ("example.com", Ok(None)),
            ("[127.0.0.5]", Ok(Some("127.0.0.5".parse().unwrap()))),
            ("[IPv6:::1]", Ok(Some("::1".parse().unwrap()))),
            (
                "[ipv6:2001:db8::1]",
                Ok(Some("2001:db8::1".parse().unwrap())),
            ),
            ("[::1]", Err(())),
            ("[300.1.1.1]", Err(())),
            ("[example.com]", Err(())),
            ("[]", Err(())),
        ];
        for (input, want) in cases {
            let got = parse_address_literal(input).map_err(|_| ());
            assert_eq!(&got, want, "{input}");
        }
    }

    #[test]
    fn host_port() {
        let cases: &[(&str, Option<(&str, u16)>)] = &[
            ("relay.example:587", Some(("relay.example", 587))),
            ("relay.example", Some(("relay.example", 25))),
            ("[192.0.2.1]:2525", Some(("[192.0.2.1]", 2525))),
            ("[::1]:26", Some(("[::1]", 26))),
            ("[::1]", Some(("[::1]", 25))),
            ("127.0.0.1:2525", Some(("127.0.0.1", 2525))),
            ("2001:db8::1", Some(("2001:db8::1", 25))),
            ("relay.example:port", None),
            ("relay.example:70000", None),
            (":25", None),
            ("[::1]x", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(split_host_port(input), *want, "{input}");
        }
    }

    #[test]
    fn preference_order_shuffles_only_ties() {
        let mut seen_first = std::collections::HashSet::new();
        for seed in 0..64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut records = vec![(20, "c"), (10, "a"), (30, "d"), (10, "b")];
            order_by_preference(&mut records, &mut rng);
            let prefs: Vec<u16> = records.iter().map(|r| r.0).collect();
            assert_eq!(prefs, [10, 10, 20, 30]);
            assert_eq!(&records[2..], &[(20, "c"), (30, "d")]);
            seen_first.insert(records[0].1);
        }
        assert_eq!(
            seen_first.len(),
            2,
            "both equal-preference hosts come first sometimes"
        );
    }

    #[test]
    fn fqdn_is_absolute_and_idna() {
        assert_eq!(fqdn("example.com").unwrap().to_ascii(), "example.com.");
        assert_eq!(fqdn("example.com.").unwrap().to_ascii(), "example.com.");
        assert_eq!(
            fqdn("bücher.example").unwrap().to_ascii(),
            "xn--bcher-kva.example."
        );
        assert!(fqdn("").is_err());
        assert!(fqdn(&"a".repeat(64)).is_err());
    }

    #[test]
    fn permanence_and_status() {
        assert!(LookupError::NullMx.is_permanent());
        assert_eq!(LookupError::NullMx.status(), "5.1.10");
        assert_eq!(LookupError::NoSuchDomain.status(), "5.1.2");
        assert_eq!(LookupError::NoAddresses.status(), "5.4.4");
        assert!(!LookupError::Temporary("x".into()).is_permanent());
        assert!(LookupError::Temporary("x".into()).status().starts_with('4'));
    }
}
