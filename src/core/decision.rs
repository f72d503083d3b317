//! The enforcement decision (docs/behaviour.md#decision-rules): one pure function, no I/O.
//!
//! Listeners extract the destination address and the host, normalise the host
//! ([`crate::wire::host`]), call [`decide`] and act on the [`Verdict`]. `icp-gate explain` and the admin
//! API's `/v1/decision` call the same function, so what they print is what the data path does.
//!
//! The rules, in order:
//! 1. no route for the destination → refuse (`no_route`);
//! 2. route not mainland → allow (`non_mainland`), nothing looked up;
//! 3. host missing → block (`missing_host`); unparseable → block (`invalid_host`, a protocol error);
//!    TLS without SNI → `policy.no_sni` (`no_sni`); malformed ClientHello (`invalid_sni`) or not
//!    TLS (`not_tls`) → block, protocol errors;
//! 4. IP literal → `policy.ip_literal` (`ip_literal`);
//! 5. host or a parent in `policy.exempt` → allow (`exempt`);
//! 6. longest match from the host down to its registrable domain; a host that is a public suffix
//!    or has no registrable domain → block (`invalid_host`); no entry → block (`unfiled`);
//!    revoked → block (`revoked`); filed but accessed elsewhere → block (`not_accessed`), unless
//!    the route has `require_access_here = false` → allow (`filed_elsewhere`); filed and accessed
//!    here → allow (`filed`).
//!
//! In report mode (globally or on the route) a block becomes `report`: the request goes through,
//! counted and logged with the reason it would have been blocked for. Protocol errors stay
//! blocked in every mode.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::config::{Action, Mode, PolicyConfig};
use crate::core::routes::{Route, RouteTable};
use crate::registry::{EntryRef, Snapshot, Status};
use crate::wire::host::{self, Host};

/// What happens to the request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Forwarded to the origin.
    Allow,
    /// Answered with the block page (HTTP), refused (TLS), or 400 / closed for protocol errors.
    Block,
    /// Would have been blocked, forwarded anyway because of report mode.
    Report,
    /// No route for the destination: closed, nothing forwarded.
    Refuse,
}

impl Decision {
    pub const ALL: [Decision; 4] = [
        Decision::Allow,
        Decision::Block,
        Decision::Report,
        Decision::Refuse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block => "block",
            Decision::Report => "report",
            Decision::Refuse => "refuse",
        }
    }

    /// Whether traffic goes through to the origin.
    pub fn forwards(self) -> bool {
        matches!(self, Decision::Allow | Decision::Report)
    }
}

/// Why. These codes appear in metrics, logs, the `icp-gate-reason` header and the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    NoRoute,
    NonMainland,
    MissingHost,
    InvalidHost,
    NoSni,
    InvalidSni,
    NotTls,
    IpLiteral,
    Exempt,
    Unfiled,
    Revoked,
    NotAccessed,
    FiledElsewhere,
    Filed,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::NoRoute,
        Reason::NonMainland,
        Reason::MissingHost,
        Reason::InvalidHost,
        Reason::NoSni,
        Reason::InvalidSni,
        Reason::NotTls,
        Reason::IpLiteral,
        Reason::Exempt,
        Reason::Unfiled,
        Reason::Revoked,
        Reason::NotAccessed,
        Reason::FiledElsewhere,
        Reason::Filed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoRoute => "no_route",
            Reason::NonMainland => "non_mainland",
            Reason::MissingHost => "missing_host",
            Reason::InvalidHost => "invalid_host",
            Reason::NoSni => "no_sni",
            Reason::InvalidSni => "invalid_sni",
            Reason::NotTls => "not_tls",
            Reason::IpLiteral => "ip_literal",
            Reason::Exempt => "exempt",
            Reason::Unfiled => "unfiled",
            Reason::Revoked => "revoked",
            Reason::NotAccessed => "not_accessed",
            Reason::FiledElsewhere => "filed_elsewhere",
            Reason::Filed => "filed",
        }
    }

    /// A registry entry allowed it: a tunnel opened for it must close when an update blocks the
    /// host, so listeners register such tunnels for revocation.
    pub fn registry_allowed(self) -> bool {
        matches!(self, Reason::Filed | Reason::FiledElsewhere)
    }
}

/// The host as the listener found it, already normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostInput<'a> {
    /// A normalised domain name ([`host::normalize_name`]).
    Name(&'a str),
    Ip(IpAddr),
    /// No host. `required`: HTTP/1.1 must carry one (RFC 9112 §3.2), so its absence is a protocol
    /// error; HTTP/1.0 may omit it and gets the block page.
    Missing {
        required: bool,
    },
    /// A host that does not parse, or several that disagree.
    Invalid,
    /// A TLS ClientHello without server_name.
    NoSni,
    /// A malformed or oversize ClientHello, or an SNI that does not parse.
    InvalidSni,
    /// The first bytes on a TLS listener are not a TLS handshake.
    NotTls,
}

impl<'a> From<&'a Host<'_>> for HostInput<'a> {
    fn from(host: &'a Host<'_>) -> HostInput<'a> {
        match host {
            Host::Name(name) => HostInput::Name(name),
            Host::Ip(ip) => HostInput::Ip(*ip),
        }
    }
}

impl<'a> HostInput<'a> {
    /// A host an operator typed (`explain`, `/v1/decision`), already parsed: an empty one means
    /// none was given, as an HTTP/1.0 request without `Host`.
    pub fn typed<E>(raw: &str, parsed: &'a Result<Host<'_>, E>) -> HostInput<'a> {
        match parsed {
            Ok(host) => HostInput::from(host),
            Err(_) if raw.is_empty() => HostInput::Missing { required: false },
            Err(_) => HostInput::Invalid,
        }
    }
}

/// The policy half of the decision's inputs, compiled from the config.
#[derive(Debug, Clone)]
pub struct Policy {
    pub routes: RouteTable,
    pub mode: Mode,
    pub ip_literal: Action,
    pub no_sni: Action,
    /// foldhash: probed for every parent of every host when the list is not empty.
    exempt: HashSet<String, foldhash::fast::RandomState>,
}

impl Policy {
    pub fn new(routes: RouteTable, policy: &PolicyConfig) -> Policy {
        Policy {
            routes,
            mode: policy.mode,
            ip_literal: policy.ip_literal,
            no_sni: policy.no_sni,
            exempt: policy.exempt.iter().cloned().collect(),
        }
    }

    /// Rule 1: the route for a destination, if any. Listeners ask this at the door, before they
    /// read a byte, so a destination without a route gets nothing read and nothing forwarded.
    pub fn route(&self, dst: IpAddr) -> Option<&Route> {
        self.routes.lookup(dst)
    }

    /// Whether `name` or one of its parent domains is exempt.
    fn is_exempt(&self, name: &str) -> bool {
        !self.exempt.is_empty() && parents(name).any(|d| self.exempt.contains(d))
    }
}

/// The outcome, with what led to it (for logs, `explain` and `/v1/decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict<'p, 'h, 's> {
    pub decision: Decision,
    pub reason: Reason,
    /// The route the destination matched (for the origin to forward to).
    pub route: Option<&'p Route>,
    /// The registry entry that decided, if any.
    pub matched: Option<EntryRef<'s>>,
    /// The host's registrable domain, when a lookup was made. Borrowed from the host, not the
    /// snapshot, so a listener can keep it after releasing the snapshot (the tunnel index's key).
    pub registrable: Option<&'h str>,
    /// The request itself was malformed: HTTP answers 400 and TLS closes, in every mode.
    pub protocol_error: bool,
}

/// Decides one request or connection. Pure: same inputs, same verdict.
pub fn decide<'p, 'h, 's>(
    dst: IpAddr,
    host: HostInput<'h>,
    snapshot: &'s Snapshot,
    policy: &'p Policy,
) -> Verdict<'p, 'h, 's> {
    let Some(route) = policy.route(dst) else {
        return verdict(Decision::Refuse, Reason::NoRoute, None);
    };
    let route = Some(route);
    let Some(r) = route.filter(|r| r.mainland) else {
        return verdict(Decision::Allow, Reason::NonMainland, route);
    };
    let mode = r.mode.unwrap_or(policy.mode);
    let by_action = |action: Action, reason| match action {
        Action::Allow => verdict(Decision::Allow, reason, route),
        Action::Block => verdict(Decision::Block, reason, route),
    };

    let name = match host {
        HostInput::Name(name) => name,
        HostInput::Ip(_) => return reported(by_action(policy.ip_literal, Reason::IpLiteral), mode),
        HostInput::Missing { required } => {
            let v = verdict(Decision::Block, Reason::MissingHost, route);
            return if required {
                protocol(v)
            } else {
                reported(v, mode)
            };
        }
        HostInput::Invalid => {
            return protocol(verdict(Decision::Block, Reason::InvalidHost, route));
        }
        HostInput::NoSni => return reported(by_action(policy.no_sni, Reason::NoSni), mode),
        HostInput::InvalidSni => {
            return protocol(verdict(Decision::Block, Reason::InvalidSni, route));
        }
        HostInput::NotTls => return protocol(verdict(Decision::Block, Reason::NotTls, route)),
    };

    if policy.is_exempt(name) {
        return verdict(Decision::Allow, Reason::Exempt, route);
    }

    let Some(registrable) = host::registrable_domain(name) else {
        return reported(verdict(Decision::Block, Reason::InvalidHost, route), mode);
    };
    let matched = snapshot
        .find_first(parents(name).take_while(|candidate| candidate.len() >= registrable.len()));
    let (decision, reason) = match matched {
        None => (Decision::Block, Reason::Unfiled),
        Some(e) if e.status == Status::Revoked => (Decision::Block, Reason::Revoked),
        Some(e) if !e.access_here && r.require_access_here => {
            (Decision::Block, Reason::NotAccessed)
        }
        Some(e) if !e.access_here => (Decision::Allow, Reason::FiledElsewhere),
        Some(_) => (Decision::Allow, Reason::Filed),
    };
    let v = Verdict {
        decision,
        reason,
        route,
        matched,
        registrable: Some(registrable),
        protocol_error: false,
    };
    reported(v, mode)
}

fn verdict<'p, 'h, 's>(
    decision: Decision,
    reason: Reason,
    route: Option<&'p Route>,
) -> Verdict<'p, 'h, 's> {
    Verdict {
        decision,
        reason,
        route,
        matched: None,
        registrable: None,
        protocol_error: false,
    }
}

fn protocol<'p, 'h, 's>(v: Verdict<'p, 'h, 's>) -> Verdict<'p, 'h, 's> {
    Verdict {
        protocol_error: true,
        ..v
    }
}

/// Report mode turns a block into a report; everything else is unchanged.
fn reported<'p, 'h, 's>(v: Verdict<'p, 'h, 's>, mode: Mode) -> Verdict<'p, 'h, 's> {
    if v.decision == Decision::Block && mode == Mode::Report {
        Verdict {
            decision: Decision::Report,
            ..v
        }
    } else {
        v
    }
}

/// `a.b.example.com`, `b.example.com`, `example.com`, `com`: the name and each parent.
///
/// A byte scan, not `split_once('.')`: the generic char searcher cost ~120 instructions per
/// label on every request (callgrind), more than the registry lookups it feeds.
fn parents(name: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(name), |n| {
        let dot = n.bytes().position(|b| b == b'.')?;
        // A '.' is ASCII, so the byte after it starts a character.
        n.get(dot + 1..)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Origin, RouteConfig};
    use crate::registry::Entry;

    const MAINLAND: &str = "10.0.0.1";
    const ABROAD: &str = "192.0.2.1";
    const UNROUTED: &str = "203.0.113.9";
    /// Mainland, `require_access_here = false`; and the same in report mode.
    const WAIVED: &str = "10.7.0.1";
    const WAIVED_REPORT: &str = "10.6.0.1";

    fn entry(domain: &str, status: Status, access_here: bool) -> Entry {
        Entry {
            domain: domain.into(),
            icp: format!("京ICP备000{}号", domain.len()),
            status,
            access_here,
        }
    }

    fn registry() -> Snapshot {
        let entries = [
            entry("filed.cn", Status::Filed, true),
            entry("elsewhere.cn", Status::Filed, false),
            entry("gone.cn", Status::Revoked, true),
            // A sub-domain entry overrides its parent, both ways.
            entry("x.gov.cn", Status::Filed, true),
            entry("edu.x.gov.cn", Status::Revoked, true),
            entry("open.gone.cn", Status::Filed, true),
            entry("xn--fsqu00a.xn--fiqs8s", Status::Filed, true),
            entry("github.io", Status::Filed, true),
            // Under a waiving route the longest match still decides, both ways.
            entry("old.elsewhere.cn", Status::Revoked, false),
            entry("mail.gone.cn", Status::Filed, false),
        ];
        Snapshot::from_entries(&entries, 1).unwrap()
    }

    fn route(dst: &str, mainland: bool, mode: Option<Mode>) -> RouteConfig {
        RouteConfig {
            dst: dst.parse().unwrap(),
            mainland,
            x_forwarded_for: true,
            send_proxy_protocol: None,
            mode,
            require_access_here: true,
            http_origin: Some(Origin::parse("127.0.0.1:1").unwrap()),
            tls_origin: None,
            quic_origin: None,
        }
    }

    fn policy_with(mode: Mode, ip_literal: Action, no_sni: Action, exempt: &[&str]) -> Policy {
        let routes = RouteTable::new(vec![
            route("10.0.0.0/8", true, None),
            route("10.9.0.0/16", true, Some(Mode::Report)),
            route("10.8.0.0/16", true, Some(Mode::Enforce)),
            RouteConfig {
                require_access_here: false,
                ..route("10.7.0.0/16", true, None)
            },
            RouteConfig {
                require_access_here: false,
                ..route("10.6.0.0/16", true, Some(Mode::Report))
            },
            route("192.0.2.0/24", false, None),
        ]);
        Policy::new(
            routes,
            &PolicyConfig {
                mode,
                ip_literal,
                no_sni,
                exempt: exempt.iter().map(|s| s.to_string()).collect(),
            },
        )
    }

    fn policy() -> Policy {
        policy_with(
            Mode::Enforce,
            Action::Allow,
            Action::Block,
            &["console.example"],
        )
    }

    fn check(dst: &str, host: HostInput<'_>, policy: &Policy) -> (Decision, Reason) {
        let snap = registry();
        let v = decide(dst.parse().unwrap(), host, &snap, policy);
        (v.decision, v.reason)
    }

    fn name(dst: &str, host: &str) -> (Decision, Reason) {
        check(dst, HostInput::Name(host), &policy())
    }

    #[test]
    fn rule1_no_route_refuses() {
        assert_eq!(
            name(UNROUTED, "filed.cn"),
            (Decision::Refuse, Reason::NoRoute)
        );
        assert_eq!(
            check(UNROUTED, HostInput::NotTls, &policy()),
            (Decision::Refuse, Reason::NoRoute)
        );
    }

    #[test]
    fn a_typed_host_maps_like_a_request_host() {
        let typed = |raw: &str| {
            let parsed = host::parse_authority(raw.as_bytes());
            match HostInput::typed(raw, &parsed) {
                HostInput::Name(n) => format!("name {n}"),
                other => format!("{other:?}"),
            }
        };
        assert_eq!(typed("WWW.Example.CN:8080"), "name www.example.cn");
        assert_eq!(typed("10.0.0.1"), "Ip(10.0.0.1)");
        assert_eq!(typed(""), "Missing { required: false }");
        assert_eq!(typed("a b"), "Invalid");
    }

    #[test]
    fn rule2_non_mainland_allows_without_lookup() {
        assert_eq!(
            name(ABROAD, "unfiled.cn"),
            (Decision::Allow, Reason::NonMainland)
        );
        assert_eq!(
            check(ABROAD, HostInput::Invalid, &policy()),
            (Decision::Allow, Reason::NonMainland)
        );
        let snap = registry();
        let p = policy();
        let v = decide(
            ABROAD.parse().unwrap(),
            HostInput::Name("filed.cn"),
            &snap,
            &p,
        );
        assert_eq!((v.matched, v.registrable), (None, None));
    }

    #[test]
    fn rule3_missing_or_invalid_host() {
        let p = policy();
        assert_eq!(
            check(MAINLAND, HostInput::Missing { required: false }, &p),
            (Decision::Block, Reason::MissingHost)
        );
        assert_eq!(
            check(MAINLAND, HostInput::Missing { required: true }, &p),
            (Decision::Block, Reason::MissingHost)
        );
        assert_eq!(
            check(MAINLAND, HostInput::Invalid, &p),
            (Decision::Block, Reason::InvalidHost)
        );
        assert_eq!(
            check(MAINLAND, HostInput::InvalidSni, &p),
            (Decision::Block, Reason::InvalidSni)
        );
        assert_eq!(
            check(MAINLAND, HostInput::NotTls, &p),
            (Decision::Block, Reason::NotTls)
        );
    }

    #[test]
    fn rule3_no_sni_follows_policy() {
        assert_eq!(
            check(MAINLAND, HostInput::NoSni, &policy()),
            (Decision::Block, Reason::NoSni)
        );
        let allow = policy_with(Mode::Enforce, Action::Allow, Action::Allow, &[]);
        assert_eq!(
            check(MAINLAND, HostInput::NoSni, &allow),
            (Decision::Allow, Reason::NoSni)
        );
    }

    #[test]
    fn rule4_ip_literal_follows_policy() {
        let ip = HostInput::Ip("10.0.0.1".parse().unwrap());
        assert_eq!(
            check(MAINLAND, ip, &policy()),
            (Decision::Allow, Reason::IpLiteral)
        );
        let block = policy_with(Mode::Enforce, Action::Block, Action::Block, &[]);
        assert_eq!(
            check(MAINLAND, ip, &block),
            (Decision::Block, Reason::IpLiteral)
        );
    }

    #[test]
    fn rule5_exempt_covers_sub_domains_only() {
        assert_eq!(
            name(MAINLAND, "console.example"),
            (Decision::Allow, Reason::Exempt)
        );
        assert_eq!(
            name(MAINLAND, "a.b.console.example"),
            (Decision::Allow, Reason::Exempt)
        );
        assert_eq!(
            name(MAINLAND, "xconsole.example"),
            (Decision::Block, Reason::Unfiled)
        );
        assert_eq!(
            name(MAINLAND, "example"),
            (Decision::Block, Reason::InvalidHost)
        );
    }

    #[test]
    fn rule6_every_registry_reason() {
        assert_eq!(name(MAINLAND, "filed.cn"), (Decision::Allow, Reason::Filed));
        assert_eq!(
            name(MAINLAND, "unfiled.cn"),
            (Decision::Block, Reason::Unfiled)
        );
        assert_eq!(
            name(MAINLAND, "elsewhere.cn"),
            (Decision::Block, Reason::NotAccessed)
        );
        assert_eq!(
            name(MAINLAND, "gone.cn"),
            (Decision::Block, Reason::Revoked)
        );
    }

    #[test]
    fn rule6_waived_access_allows_filed_elsewhere_only() {
        for host in ["elsewhere.cn", "smtp.elsewhere.cn", "mail.gone.cn"] {
            assert_eq!(
                name(WAIVED, host),
                (Decision::Allow, Reason::FiledElsewhere),
                "{host}"
            );
            // Every other route still requires the access here.
            assert_eq!(
                name(MAINLAND, host),
                (Decision::Block, Reason::NotAccessed),
                "{host}"
            );
        }
        // The waiver covers the access only: no filing, or a revoked one, is still blocked.
        for (host, reason) in [
            ("unfiled.cn", Reason::Unfiled),
            ("gone.cn", Reason::Revoked),
            ("www.gone.cn", Reason::Revoked),
            ("old.elsewhere.cn", Reason::Revoked),
            ("a.old.elsewhere.cn", Reason::Revoked),
            ("edu.x.gov.cn", Reason::Revoked),
        ] {
            assert_eq!(name(WAIVED, host), (Decision::Block, reason), "{host}");
        }
        assert_eq!(
            name(WAIVED, "com.cn"),
            (Decision::Block, Reason::InvalidHost)
        );
        assert_eq!(name(WAIVED, "filed.cn"), (Decision::Allow, Reason::Filed));
        assert_eq!(
            name(WAIVED, "console.example"),
            (Decision::Allow, Reason::Exempt)
        );
        let snap = registry();
        let p = policy();
        let v = decide(
            WAIVED.parse().unwrap(),
            HostInput::Name("smtp.elsewhere.cn"),
            &snap,
            &p,
        );
        assert_eq!(v.matched.map(|e| e.domain), Some("elsewhere.cn"));
        assert_eq!(v.registrable, Some("elsewhere.cn"));
        assert!(!v.protocol_error);
    }

    #[test]
    fn rule6_waiver_in_report_mode() {
        // filed_elsewhere is an allow, so report mode leaves it alone; blocks become reports.
        assert_eq!(
            name(WAIVED_REPORT, "elsewhere.cn"),
            (Decision::Allow, Reason::FiledElsewhere)
        );
        assert_eq!(
            name(WAIVED_REPORT, "unfiled.cn"),
            (Decision::Report, Reason::Unfiled)
        );
        assert_eq!(
            name(WAIVED_REPORT, "gone.cn"),
            (Decision::Report, Reason::Revoked)
        );
        let global_report = policy_with(Mode::Report, Action::Allow, Action::Block, &[]);
        assert_eq!(
            check(WAIVED, HostInput::Name("elsewhere.cn"), &global_report),
            (Decision::Allow, Reason::FiledElsewhere)
        );
        assert_eq!(
            check(WAIVED, HostInput::Name("old.elsewhere.cn"), &global_report),
            (Decision::Report, Reason::Revoked)
        );
        assert_eq!(
            check(MAINLAND, HostInput::Name("elsewhere.cn"), &global_report),
            (Decision::Report, Reason::NotAccessed)
        );
    }

    /// Listeners register a tunnel for revocation by `registry_allowed`: it must hold exactly
    /// for the allows an entry made, or a tunnel an update blocks would stay open.
    #[test]
    fn registry_allowed_is_exactly_an_allow_by_an_entry() {
        let snap = registry();
        let p = policy();
        for dst in [MAINLAND, WAIVED, WAIVED_REPORT, ABROAD, UNROUTED] {
            for host in [
                "filed.cn",
                "elsewhere.cn",
                "mail.gone.cn",
                "unfiled.cn",
                "gone.cn",
                "console.example",
                "com.cn",
            ] {
                let v = decide(dst.parse().unwrap(), HostInput::Name(host), &snap, &p);
                assert_eq!(
                    v.reason.registry_allowed(),
                    v.decision == Decision::Allow && v.matched.is_some(),
                    "{dst} {host}: {v:?}"
                );
            }
        }
    }

    #[test]
    fn every_reason_is_listed_once_in_declaration_order() {
        // Metrics and block pages index by position in ALL, block pages by `reason as usize`.
        let mut seen = HashSet::new();
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?}");
            assert!(seen.insert(reason.as_str()), "{reason:?}");
        }
        assert_eq!(Reason::FiledElsewhere.as_str(), "filed_elsewhere");
    }

    #[test]
    fn rule6_parent_entry_covers_sub_domains() {
        assert_eq!(
            name(MAINLAND, "www.filed.cn"),
            (Decision::Allow, Reason::Filed)
        );
        assert_eq!(
            name(MAINLAND, "a.b.c.filed.cn"),
            (Decision::Allow, Reason::Filed)
        );
        assert_eq!(
            name(MAINLAND, "www.gone.cn"),
            (Decision::Block, Reason::Revoked)
        );
        assert_eq!(
            name(MAINLAND, "www.xn--fsqu00a.xn--fiqs8s"),
            (Decision::Allow, Reason::Filed)
        );
        // A name that merely ends with a filed name is a different domain.
        assert_eq!(
            name(MAINLAND, "notfiled.cn"),
            (Decision::Block, Reason::Unfiled)
        );
    }

    #[test]
    fn rule6_longest_match_wins_both_ways() {
        // gov.cn sub-domains filed by different subjects.
        assert_eq!(
            name(MAINLAND, "www.x.gov.cn"),
            (Decision::Allow, Reason::Filed)
        );
        assert_eq!(
            name(MAINLAND, "edu.x.gov.cn"),
            (Decision::Block, Reason::Revoked)
        );
        assert_eq!(
            name(MAINLAND, "a.edu.x.gov.cn"),
            (Decision::Block, Reason::Revoked)
        );
        // A filed sub-domain of a revoked parent stays open, and only it.
        assert_eq!(
            name(MAINLAND, "open.gone.cn"),
            (Decision::Allow, Reason::Filed)
        );
        assert_eq!(
            name(MAINLAND, "www.open.gone.cn"),
            (Decision::Allow, Reason::Filed)
        );
        assert_eq!(
            name(MAINLAND, "shut.gone.cn"),
            (Decision::Block, Reason::Revoked)
        );
        let snap = registry();
        let p = policy();
        let v = decide(
            MAINLAND.parse().unwrap(),
            HostInput::Name("a.edu.x.gov.cn"),
            &snap,
            &p,
        );
        assert_eq!(v.matched.map(|e| e.domain), Some("edu.x.gov.cn"));
        assert_eq!(v.registrable, Some("x.gov.cn"));
    }

    #[test]
    fn rule6_public_suffixes_and_bare_names_are_invalid() {
        assert_eq!(
            name(MAINLAND, "com.cn"),
            (Decision::Block, Reason::InvalidHost)
        );
        assert_eq!(
            name(MAINLAND, "gov.cn"),
            (Decision::Block, Reason::InvalidHost)
        );
        assert_eq!(name(MAINLAND, "cn"), (Decision::Block, Reason::InvalidHost));
        assert_eq!(
            name(MAINLAND, "localhost"),
            (Decision::Block, Reason::InvalidHost)
        );
        let snap = registry();
        let p = policy();
        let v = decide(
            MAINLAND.parse().unwrap(),
            HostInput::Name("com.cn"),
            &snap,
            &p,
        );
        assert!(
            !v.protocol_error,
            "a public suffix gets the block page, not a 400"
        );
    }

    #[test]
    fn rule6_lookup_stops_at_the_registrable_domain() {
        // github.io is in the ICANN section's view a registrable domain, so its entry covers
        // user.github.io; but a private-section suffix never widens a match upwards.
        assert_eq!(
            name(MAINLAND, "user.github.io"),
            (Decision::Allow, Reason::Filed)
        );
    }

    #[test]
    fn report_mode_turns_blocks_into_reports_except_protocol_errors() {
        let p = policy_with(Mode::Report, Action::Block, Action::Block, &[]);
        let cases = [
            (
                HostInput::Name("unfiled.cn"),
                Decision::Report,
                Reason::Unfiled,
            ),
            (
                HostInput::Name("gone.cn"),
                Decision::Report,
                Reason::Revoked,
            ),
            (
                HostInput::Name("elsewhere.cn"),
                Decision::Report,
                Reason::NotAccessed,
            ),
            (
                HostInput::Name("com.cn"),
                Decision::Report,
                Reason::InvalidHost,
            ),
            (HostInput::Name("filed.cn"), Decision::Allow, Reason::Filed),
            (
                HostInput::Ip("10.0.0.1".parse().unwrap()),
                Decision::Report,
                Reason::IpLiteral,
            ),
            (HostInput::NoSni, Decision::Report, Reason::NoSni),
            (
                HostInput::Missing { required: false },
                Decision::Report,
                Reason::MissingHost,
            ),
            (
                HostInput::Missing { required: true },
                Decision::Block,
                Reason::MissingHost,
            ),
            (HostInput::Invalid, Decision::Block, Reason::InvalidHost),
            (HostInput::InvalidSni, Decision::Block, Reason::InvalidSni),
            (HostInput::NotTls, Decision::Block, Reason::NotTls),
        ];
        for (host, decision, reason) in cases {
            assert_eq!(check(MAINLAND, host, &p), (decision, reason), "{host:?}");
        }
        assert_eq!(
            check(UNROUTED, HostInput::Name("x.cn"), &p),
            (Decision::Refuse, Reason::NoRoute)
        );
    }

    #[test]
    fn report_mode_per_route_overrides_global() {
        let p = policy();
        assert_eq!(
            name("10.9.1.1", "unfiled.cn"),
            (Decision::Report, Reason::Unfiled)
        );
        assert_eq!(
            name("10.9.1.1", "filed.cn"),
            (Decision::Allow, Reason::Filed)
        );
        let global_report = policy_with(Mode::Report, Action::Allow, Action::Block, &[]);
        assert_eq!(
            check("10.8.1.1", HostInput::Name("unfiled.cn"), &global_report),
            (Decision::Block, Reason::Unfiled)
        );
        assert_eq!(
            check("10.1.1.1", HostInput::Name("unfiled.cn"), &p),
            (Decision::Block, Reason::Unfiled)
        );
    }

    #[test]
    fn protocol_errors_are_flagged() {
        let snap = registry();
        let p = policy();
        let dst = MAINLAND.parse().unwrap();
        for host in [
            HostInput::Invalid,
            HostInput::InvalidSni,
            HostInput::NotTls,
            HostInput::Missing { required: true },
        ] {
            assert!(decide(dst, host, &snap, &p).protocol_error, "{host:?}");
        }
        for host in [
            HostInput::Name("unfiled.cn"),
            HostInput::NoSni,
            HostInput::Missing { required: false },
        ] {
            assert!(!decide(dst, host, &snap, &p).protocol_error, "{host:?}");
        }
    }

    #[test]
    fn parents_walks_every_label() {
        assert_eq!(
            parents("a.b.example.com").collect::<Vec<_>>(),
            ["a.b.example.com", "b.example.com", "example.com", "com"]
        );
        assert_eq!(parents("com").collect::<Vec<_>>(), ["com"]);
        assert_eq!(
            parents("xn--fsqu00a.xn--fiqs8s").collect::<Vec<_>>(),
            ["xn--fsqu00a.xn--fiqs8s", "xn--fiqs8s"]
        );
    }

    /// The TLS listener keys its live-tunnel index by the verdict's registrable domain after
    /// releasing the snapshot; this only compiles while it borrows from the host.
    #[test]
    fn registrable_outlives_the_snapshot() {
        let p = policy();
        let host = String::from("www.open.gone.cn");
        let registrable = {
            let snap = registry();
            decide(MAINLAND.parse().unwrap(), HostInput::Name(&host), &snap, &p).registrable
        };
        assert_eq!(registrable, Some("gone.cn"));
    }
}
