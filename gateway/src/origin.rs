//! `OriginPolicy`: which browser pages may open a websocket (DESIGN.md §8).
//! Browsers send the user's cookies with a cross-site websocket upgrade, so
//! without this check any page the user visits could act as the user
//! (cross-site websocket hijacking). Pure: no I/O.
//!
//! * no `Origin` header (not a browser): allowed;
//! * `security.allowedOrigins` empty (the default): same-origin only, the
//!   Origin's host (and port) equal to the request's `Host`;
//! * entries are exact origins (`https://app.example.com`) or patterns
//!   with one leading wildcard label (`https://*.example.com`, which
//!   matches subdomains at any depth but not `example.com` itself);
//! * `["*"]` allows every origin.

/// An `allowedOrigins` entry that is not an origin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{entry:?} is not an origin: write scheme://host[:port] (e.g. https://app.example.com or https://*.example.com), or \"*\""
)]
pub struct InvalidOrigin {
    /// The entry.
    pub entry: String,
}

/// One parsed origin: lowercase scheme and authority, default port dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    /// `http`, `https`.
    scheme: String,
    /// `host` or `host:port`.
    authority: String,
}

impl Origin {
    fn parse(text: &str) -> Option<Origin> {
        let (scheme, authority) = text.trim().trim_end_matches('/').split_once("://")?;
        let scheme = scheme.to_ascii_lowercase();
        let authority = normalize_authority(&scheme, authority)?;
        (!scheme.is_empty() && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)))
            .then_some(Origin { scheme, authority })
    }
}

/// Lowercase `host[:port]` with the scheme's default port removed; `None`
/// when it holds a path, user info or nothing.
fn normalize_authority(scheme: &str, authority: &str) -> Option<String> {
    let a = authority.to_ascii_lowercase();
    if a.is_empty() || a.contains(['/', '@', '?', '#', ' ']) {
        return None;
    }
    let default = match scheme {
        "http" | "ws" => Some(":80"),
        "https" | "wss" => Some(":443"),
        _ => None,
    };
    Some(match default {
        Some(port) if a.ends_with(port) => a[..a.len() - port.len()].to_string(),
        _ => a,
    })
}

/// Which origins may open a websocket.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    /// `*` was listed.
    any: bool,
    /// Exact origins.
    exact: Vec<Origin>,
    /// `scheme://*.suffix`: scheme and `.suffix` (with its port, if any).
    subdomains: Vec<(String, String)>,
}

impl OriginPolicy {
    /// From `security.allowedOrigins`.
    pub fn new(allowed: &[String]) -> Result<OriginPolicy, InvalidOrigin> {
        let mut policy = OriginPolicy::default();
        for entry in allowed {
            let invalid = || InvalidOrigin { entry: entry.clone() };
            if entry.trim() == "*" {
                policy.any = true;
                continue;
            }
            let origin = Origin::parse(entry).ok_or_else(invalid)?;
            match origin.authority.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => {
                    policy.subdomains.push((origin.scheme, format!(".{suffix}")));
                }
                _ if origin.authority.contains('*') => return Err(invalid()),
                _ => policy.exact.push(origin),
            }
        }
        Ok(policy)
    }

    /// Whether an upgrade with this `Origin` (if any) to this `Host` (if
    /// any) may go on.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.any {
            return true;
        }
        // `null` (sandboxed frames, file:// pages) and garbage: refused.
        let Some(origin) = Origin::parse(origin) else {
            return false;
        };
        let same_origin =
            host.and_then(|h| normalize_authority(&origin.scheme, h)).is_some_and(|h| h == origin.authority);
        same_origin
            || self.exact.contains(&origin)
            || self.subdomains.iter().any(|(scheme, suffix)| {
                *scheme == origin.scheme
                    && origin.authority.len() > suffix.len()
                    && origin.authority.ends_with(suffix.as_str())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> OriginPolicy {
        OriginPolicy::new(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).expect("valid entries")
    }

    #[test]
    fn default_is_same_origin_and_clients_without_origin() {
        let p = policy(&[]);
        assert!(p.allows(None, Some("chat.example.com")));
        assert!(p.allows(Some("https://chat.example.com"), Some("chat.example.com")));
        assert!(p.allows(Some("https://CHAT.example.com"), Some("chat.example.com:443")));
        assert!(p.allows(Some("http://127.0.0.1:8080"), Some("127.0.0.1:8080")));
        assert!(!p.allows(Some("http://127.0.0.1:8081"), Some("127.0.0.1:8080")));
        assert!(!p.allows(Some("https://evil.example"), Some("chat.example.com")));
        assert!(!p.allows(Some("https://chat.example.com.evil.example"), Some("chat.example.com")));
        assert!(!p.allows(Some("null"), Some("chat.example.com")));
        assert!(!p.allows(Some("https://chat.example.com"), None));
        assert!(!p.allows(Some(""), Some("chat.example.com")));
    }

    #[test]
    fn listed_origins_and_subdomain_patterns() {
        let p = policy(&["https://app.example.com", "https://*.example.org", "http://localhost:3000"]);
        assert!(p.allows(Some("https://app.example.com"), Some("gw.internal")));
        assert!(p.allows(Some("https://app.example.com/"), Some("gw.internal")));
        assert!(!p.allows(Some("http://app.example.com"), Some("gw.internal")), "scheme counts");
        assert!(p.allows(Some("https://a.example.org"), Some("gw.internal")));
        assert!(p.allows(Some("https://a.b.example.org"), Some("gw.internal")));
        assert!(!p.allows(Some("https://example.org"), Some("gw.internal")), "the bare domain is not a subdomain");
        assert!(!p.allows(Some("https://evilexample.org"), Some("gw.internal")));
        assert!(!p.allows(Some("https://a.example.org:8443"), Some("gw.internal")), "port counts");
        assert!(p.allows(Some("http://localhost:3000"), Some("gw.internal")));
        assert!(!p.allows(Some("http://localhost:3001"), Some("gw.internal")));
    }

    #[test]
    fn star_allows_everything() {
        let p = policy(&["*"]);
        assert!(p.allows(Some("https://evil.example"), Some("x")));
        assert!(p.allows(Some("null"), None));
    }

    #[test]
    fn invalid_entries_are_named() {
        for bad in ["example.com", "https://", "https://a/b", "https://*", "https://a.*.com", "https://u@a.com"] {
            let e = OriginPolicy::new(&[bad.to_string()]).expect_err(bad);
            assert_eq!(e.entry, bad);
        }
    }
}
