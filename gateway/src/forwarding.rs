//! Which request data the gateway forwards to the backend's `bootstrap/`
//! call (DESIGN.md §2 "Connect"). Pure: rules in, headers out.
//!
//! The 3.x forwarding table is expressed as [`default_rules`]; configured
//! extra rules are appended, and one whose target header matches a default
//! rule replaces it (so `Authorization` can become `Bearer {}`).

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use serde::{Deserialize, Serialize};

/// Where a forwarded value comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Source {
    /// A header of the client's upgrade request.
    Header(String),
    /// A cookie of the client's `Cookie` header.
    Cookie(String),
    /// A query parameter of the upgrade URL.
    Query(String),
    /// A fixed value.
    Value(String),
    /// The TCP peer's IP address.
    PeerAddress,
    /// The client's address: what a trusted proxy (`security.trustedProxies`)
    /// says in `X-Real-IP` or `X-Forwarded-For`, else the TCP peer's.
    ClientAddress,
}

/// One or several sources; the first one present wins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Sources {
    /// A single source.
    One(Source),
    /// Sources tried in order.
    Many(Vec<Source>),
}

impl Sources {
    fn iter(&self) -> impl Iterator<Item = &Source> {
        match self {
            Sources::One(s) => std::slice::from_ref(s).iter(),
            Sources::Many(v) => v.iter(),
        }
    }
}

/// Sets header `header` on the backend request from `from`, optionally
/// through a `format` template in which `{}` stands for the value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ForwardRule {
    /// Header name sent to the backend.
    pub header: String,
    /// Where the value comes from. Written as `{cookie: name}` maps (not
    /// YAML tags), so a printed config reads back.
    #[serde(with = "serde_yaml::with::singleton_map_recursive")]
    pub from: Sources,
    /// Template, `{}` replaced by the value; default: the value as is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// Why a forwarding rule is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRule {
    /// Not a valid HTTP header name.
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    /// `Host` is the backend's, never the client's.
    #[error("the Host header is never forwarded")]
    Host,
    /// `from: []`.
    #[error("a rule needs at least one source in `from`")]
    NoSource,
}

/// A validated rule, header name parsed.
#[derive(Clone, Debug)]
struct CompiledRule {
    header: HeaderName,
    from: Sources,
    format: Option<String>,
}

/// The forwarding table of one gateway: built-in 3.x rules plus extras.
#[derive(Clone, Debug)]
pub struct ForwardingTable {
    /// Rules applied in order; target headers are unique.
    rules: Vec<CompiledRule>,
}

/// The 3.x table: `Cookie`, `User-Agent`, `X-Real-IP` (the client's
/// address: the header only from a trusted proxy, else the TCP peer),
/// `X-CSRFToken` from the `csrftoken` cookie, `Authorization: Token <t>` from
/// `?token=<t>`.
pub fn default_rules() -> Vec<ForwardRule> {
    let rule = |header: &str, from: Sources, format: Option<&str>| ForwardRule {
        header: header.into(),
        from,
        format: format.map(Into::into),
    };
    vec![
        rule("Cookie", Sources::One(Source::Header("Cookie".into())), None),
        rule("User-Agent", Sources::One(Source::Header("User-Agent".into())), None),
        rule("X-Real-IP", Sources::One(Source::ClientAddress), None),
        rule("X-CSRFToken", Sources::One(Source::Cookie("csrftoken".into())), None),
        rule("Authorization", Sources::One(Source::Query("token".into())), Some("Token {}")),
    ]
}

/// Checks one rule; used by config validation and [`ForwardingTable::new`].
pub fn validate_rule(rule: &ForwardRule) -> Result<(), InvalidRule> {
    compile(rule).map(|_| ())
}

fn compile(rule: &ForwardRule) -> Result<CompiledRule, InvalidRule> {
    let header =
        HeaderName::try_from(rule.header.as_str()).map_err(|_| InvalidRule::HeaderName(rule.header.clone()))?;
    if header == header::HOST {
        return Err(InvalidRule::Host);
    }
    if rule.from.iter().next().is_none() {
        return Err(InvalidRule::NoSource);
    }
    Ok(CompiledRule { header, from: rule.from.clone(), format: rule.format.clone() })
}

/// What the gateway knows of a client's upgrade request.
pub struct ClientRequest<'a> {
    /// The upgrade request's headers.
    pub headers: &'a HeaderMap,
    /// The raw query string, if any.
    pub query: Option<&'a str>,
    /// The TCP peer address.
    pub peer: IpAddr,
    /// The client's address ([`client_address`]).
    pub client: IpAddr,
}

/// The client's address. A TCP peer in `trusted` is a proxy whose word is
/// taken: its `X-Real-IP`, else the right-most `X-Forwarded-For` entry that
/// is not itself a trusted proxy. Anyone else could write those headers
/// themselves, so for them it is the TCP peer.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let header_ip = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    if let Some(ip) = header_ip("x-real-ip") {
        return ip;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map_while(|entry| entry.trim().parse().ok())
        .collect();
    forwarded.iter().rev().find(|ip| !is_trusted(ip)).or(forwarded.first()).copied().unwrap_or(peer)
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

fn query(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

impl ForwardingTable {
    /// The default rules with `extra` appended or replacing defaults.
    pub fn new(extra: &[ForwardRule]) -> Result<ForwardingTable, InvalidRule> {
        let mut rules: Vec<CompiledRule> = default_rules().iter().map(compile).collect::<Result<_, _>>()?;
        for rule in extra {
            let rule = compile(rule)?;
            rules.retain(|r| r.header != rule.header);
            rules.push(rule);
        }
        Ok(ForwardingTable { rules })
    }

    /// The headers to send to the backend for this client. A value that is
    /// not a valid header value (say a query parameter with a newline) is
    /// not forwarded.
    pub fn backend_headers(&self, request: &ClientRequest<'_>) -> Vec<(HeaderName, HeaderValue)> {
        let mut out = Vec::with_capacity(self.rules.len());
        for rule in &self.rules {
            let value = rule.from.iter().find_map(|source| match source {
                Source::Header(name) => {
                    // Several `Cookie` headers (HTTP/2 style) are joined as one.
                    let values: Vec<&str> =
                        request.headers.get_all(name.as_str()).iter().filter_map(|v| v.to_str().ok()).collect();
                    (!values.is_empty()).then(|| values.join("; "))
                }
                Source::Cookie(name) => cookie(request.headers, name).map(str::to_owned),
                Source::Query(name) => query(request.query, name),
                Source::Value(v) => Some(v.clone()),
                Source::PeerAddress => Some(request.peer.to_string()),
                Source::ClientAddress => Some(request.client.to_string()),
            });
            let Some(value) = value else { continue };
            let value = match &rule.format {
                Some(template) => template.replace("{}", &value),
                None => value,
            };
            if let Ok(value) = HeaderValue::try_from(value) {
                out.push((rule.header.clone(), value));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::try_from(*k).expect("name"), HeaderValue::try_from(*v).expect("value"));
        }
        h
    }

    fn run(table: &ForwardingTable, h: &HeaderMap, q: Option<&str>) -> Vec<(String, String)> {
        let peer = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let req = ClientRequest { headers: h, query: q, peer, client: client_address(h, peer, &[]) };
        table
            .backend_headers(&req)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().expect("ascii").to_string()))
            .collect()
    }

    #[test]
    fn the_3x_table() {
        let t = ForwardingTable::new(&[]).expect("valid");
        let h = headers(&[
            ("cookie", "sessionid=abc; csrftoken=tok1"),
            ("user-agent", "ua/1"),
            ("host", "evil"),
            ("x-other", "1"),
        ]);
        assert_eq!(
            run(&t, &h, Some("token=t%20k&x=1")),
            [
                ("cookie", "sessionid=abc; csrftoken=tok1"),
                ("user-agent", "ua/1"),
                ("x-real-ip", "10.1.2.3"),
                ("x-csrftoken", "tok1"),
                ("authorization", "Token t k"),
            ]
            .map(|(a, b)| (a.to_string(), b.to_string()))
        );
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_its_address_and_absent_sources_are_skipped() {
        let t = ForwardingTable::new(&[]).expect("valid");
        let h = headers(&[("x-real-ip", "192.0.2.9"), ("x-forwarded-for", "192.0.2.8")]);
        assert_eq!(run(&t, &h, None), [("x-real-ip".to_string(), "10.1.2.3".to_string())]);
    }

    #[test]
    fn trusted_proxies_say_who_the_client_is() {
        let nets: Vec<ipnet::IpNet> = ["10.0.0.0/8", "fd00::/8"].iter().map(|n| n.parse().expect("net")).collect();
        let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
        let proxy = ip("10.1.2.3");
        let addr = |pairs: &[(&str, &str)], peer| client_address(&headers(pairs), peer, &nets);
        assert_eq!(addr(&[("x-real-ip", "192.0.2.9")], proxy), ip("192.0.2.9"));
        assert_eq!(addr(&[("x-real-ip", "192.0.2.9")], ip("198.51.100.1")), ip("198.51.100.1"), "not a proxy");
        assert_eq!(addr(&[("x-real-ip", " 2001:db8::1 ")], ip("fd00::5")), ip("2001:db8::1"));
        // X-Forwarded-For: the right-most address that is not a proxy of ours
        // (what is left of it was written by whoever the client is).
        assert_eq!(addr(&[("x-forwarded-for", "6.6.6.6, 192.0.2.7, 10.9.9.9")], proxy), ip("192.0.2.7"));
        assert_eq!(addr(&[("x-forwarded-for", "192.0.2.7"), ("x-forwarded-for", "10.0.0.1")], proxy), ip("192.0.2.7"));
        assert_eq!(addr(&[("x-forwarded-for", "10.0.0.2, 10.0.0.1")], proxy), ip("10.0.0.2"), "all proxies");
        assert_eq!(addr(&[("x-forwarded-for", "garbage")], proxy), proxy);
        assert_eq!(addr(&[("x-real-ip", "not-an-ip")], proxy), proxy);
        assert_eq!(addr(&[], proxy), proxy);
    }

    #[test]
    fn extra_rules_add_and_replace() {
        let extra = [
            ForwardRule {
                header: "Authorization".into(),
                from: Sources::One(Source::Query("token".into())),
                format: Some("Bearer {}".into()),
            },
            ForwardRule {
                header: "X-Tenant".into(),
                from: Sources::Many(vec![Source::Cookie("tenant".into()), Source::Value("default".into())]),
                format: None,
            },
        ];
        let t = ForwardingTable::new(&extra).expect("valid");
        let got = run(&t, &HeaderMap::new(), Some("token=abc"));
        assert!(got.contains(&("authorization".into(), "Bearer abc".into())), "{got:?}");
        assert!(got.contains(&("x-tenant".into(), "default".into())), "{got:?}");
        assert_eq!(got.iter().filter(|(k, _)| k == "authorization").count(), 1);
    }

    #[test]
    fn header_injection_is_not_forwarded() {
        let t = ForwardingTable::new(&[]).expect("valid");
        let got = run(&t, &HeaderMap::new(), Some("token=a%0D%0AX-Evil:%201"));
        assert!(got.iter().all(|(k, _)| k != "authorization"), "{got:?}");
    }

    #[test]
    fn invalid_rules() {
        let rule = |h: &str, from: Sources| ForwardRule { header: h.into(), from, format: None };
        assert_eq!(validate_rule(&rule("Host", Sources::One(Source::Value("x".into())))), Err(InvalidRule::Host));
        assert_eq!(
            validate_rule(&rule("bad header", Sources::One(Source::Value("x".into())))),
            Err(InvalidRule::HeaderName("bad header".into()))
        );
        assert_eq!(validate_rule(&rule("X-A", Sources::Many(vec![]))), Err(InvalidRule::NoSource));
    }

    #[test]
    fn rules_round_trip_through_yaml() {
        let rules = vec![ForwardRule {
            header: "X-A".into(),
            from: Sources::Many(vec![Source::Cookie("c".into()), Source::PeerAddress]),
            format: Some("{}".into()),
        }];
        let yaml = serde_yaml::to_string(&rules).expect("yaml");
        assert!(yaml.contains("cookie: c"), "{yaml}");
        let back: Vec<ForwardRule> = serde_yaml::from_str(&yaml).expect("reads back");
        assert_eq!(back, rules);
    }

    #[test]
    fn rules_read_from_yaml() {
        let rules: Vec<ForwardRule> = serde_yaml::from_str(
            "- header: X-Tenant\n  from: {header: X-Tenant}\n- header: X-Ip\n  from: [{header: X-Forwarded-For}, peerAddress]\n  format: 'ip={}'\n",
        )
        .expect("yaml");
        assert_eq!(rules[0].from, Sources::One(Source::Header("X-Tenant".into())));
        assert_eq!(rules[1].from, Sources::Many(vec![Source::Header("X-Forwarded-For".into()), Source::PeerAddress]));
    }
}
