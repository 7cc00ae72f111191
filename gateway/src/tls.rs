//! TLS client settings, one piece of code for every TLS connection the
//! project makes: the gateway's AMQP broker (`amqps://`), its backend client
//! (`https://`) and the operator's exchange declare.
//!
//! rustls with the ring provider (no aws-lc). The server's certificate is
//! verified against the configured CAs (a PEM file or Secret), or the
//! system's store when none is configured, and its name against the URL's
//! host; there is no way to turn either check off. A client certificate is
//! optional. Key material never appears in an error: messages name the file
//! (or Secret) and say what is wrong with it.
//!
//! [`failure`] turns a connect error into a short, actionable reason
//! (unknown CA, hostname mismatch, expired, client certificate refused) for
//! logs, `/readyz`, metrics and the operator's `BrokerReady` condition.

use std::path::{Path, PathBuf};

use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};

use crate::config::TlsConfig;

/// Why a TLS client configuration cannot be built. `what` names the
/// setting (`broker.amqp.tls.caFile /etc/ca.pem`, `Secret ns/name key
/// ca.crt`); nothing here quotes a key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{what}: cannot read {path}: {source}")]
    Read {
        /// The setting.
        what: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The CA or client certificate file holds no PEM certificate.
    #[error("{what}: no PEM certificate in it (expected 'BEGIN CERTIFICATE' blocks)")]
    NoCertificate {
        /// The setting.
        what: String,
    },
    /// The text is not well-formed PEM.
    #[error("{what}: not a well-formed PEM certificate file: {reason}")]
    Pem {
        /// The setting.
        what: String,
        /// The parser's reason (never the file's contents).
        reason: String,
    },
    /// A certificate of the CA bundle is not usable as a trust anchor.
    #[error("{what}: certificate {index} is not a usable CA certificate: {reason}")]
    BadCa {
        /// The setting.
        what: String,
        /// 1-based position in the file.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The key file holds no usable private key.
    #[error(
        "{what}: no PEM private key in it (PKCS#8 'PRIVATE KEY', PKCS#1 'RSA PRIVATE KEY' or SEC1 'EC PRIVATE KEY')"
    )]
    NoKey {
        /// The setting.
        what: String,
    },
    /// The client certificate and key cannot be used together.
    #[error("{what}: the client certificate and key cannot be used: {reason}")]
    Identity {
        /// The setting.
        what: String,
        /// Why (e.g. the key does not belong to the certificate).
        reason: String,
    },
    /// The crypto provider offers no usable protocol version (cannot
    /// happen with ring's defaults).
    #[error("{what}: TLS setup failed: {reason}")]
    Provider {
        /// The setting.
        what: String,
        /// Why.
        reason: String,
    },
    /// No CA configured and the system's store holds none.
    #[error("{what}: no CA configured and no CA certificates in the system store ({reason}): set a CA file")]
    NoSystemRoots {
        /// The setting.
        what: String,
        /// What loading the system store found.
        reason: String,
    },
}

/// One PEM document and what it is called in messages
/// (`broker.amqp.tls.caFile /etc/ca.pem`, `Secret ns/name key ca.crt`).
#[derive(Clone)]
pub struct Pem {
    /// The setting or Secret it comes from.
    pub name: String,
    /// The PEM text.
    pub pem: Vec<u8>,
}

/// PEM material of a client TLS configuration, from files or Secrets.
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// CA certificates trusted instead of the system store.
    pub ca: Option<Pem>,
    /// Client certificate chain, and its private key.
    pub identity: Option<(Pem, Pem)>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.as_ref().map(|p| &p.name))
            .field("identity", &self.identity.as_ref().map(|(cert, key)| (&cert.name, &key.name)))
            .finish()
    }
}

fn read(field: &str, path: &Path) -> Result<Pem, TlsError> {
    match std::fs::read(path) {
        Ok(pem) => Ok(Pem { name: format!("{field} {}", path.display()), pem }),
        Err(source) => Err(TlsError::Read { what: field.to_string(), path: path.to_owned(), source }),
    }
}

impl TlsMaterial {
    /// Reads the files of `config`; `field` is its dotted path
    /// (`broker.amqp.tls`) for messages.
    pub fn from_files(config: &TlsConfig, field: &str) -> Result<TlsMaterial, TlsError> {
        let ca = match &config.ca_file {
            Some(path) => Some(read(&format!("{field}.caFile"), path)?),
            None => None,
        };
        let identity = match (&config.cert_file, &config.key_file) {
            (Some(cert), Some(key)) => {
                Some((read(&format!("{field}.certFile"), cert)?, read(&format!("{field}.keyFile"), key)?))
            }
            // Validated config sets both or neither.
            _ => None,
        };
        Ok(TlsMaterial { ca, identity })
    }

    /// The rustls client configuration; `what` names the whole
    /// (`broker.amqp.tls`, `spec.rabbitmq.tls`) in messages about it.
    pub fn client_config(&self, what: &str) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match &self.ca {
            Some(ca) => ca_roots(ca)?,
            None => system_roots().map_err(|reason| TlsError::NoSystemRoots { what: what.to_string(), reason })?,
        };
        let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Provider { what: what.to_string(), reason: e.to_string() })?
            .with_root_certificates(roots);
        let config = match &self.identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = certificates(cert)?;
                let key =
                    PrivateKeyDer::from_pem_slice(&key.pem).map_err(|_| TlsError::NoKey { what: key.name.clone() })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Identity { what: what.to_string(), reason: e.to_string() })?
            }
        };
        Ok(Arc::new(config))
    }
}

/// Loads and builds in one step: `config`'s files, named by `field`.
pub fn client_config(config: &TlsConfig, field: &str) -> Result<Arc<ClientConfig>, TlsError> {
    TlsMaterial::from_files(config, field)?.client_config(field)
}

/// Reads and checks the TLS files the configuration uses (`backend.tls`
/// for `https://`, `broker.amqp.tls` for `amqps://`), as starting would.
pub fn check_files(config: &crate::config::Config) -> Result<(), TlsError> {
    if config.backend.url.as_deref().is_some_and(|u| u.starts_with("https:")) {
        client_config(&config.backend.tls, "backend.tls")?;
    }
    let amqps = config.broker.amqp.url.as_ref().is_some_and(|u| u.0.starts_with("amqps:"));
    if config.broker.kind == crate::config::BrokerKind::Amqp && amqps {
        client_config(&config.broker.amqp.tls, "broker.amqp.tls")?;
    }
    Ok(())
}

/// Makes ring the process's default rustls provider, for clients built
/// without a configuration of ours (reqwest builds one even for http://,
/// and panics without a provider). Idempotent.
pub fn install_default_provider() {
    // An error only means a provider is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certificates(pem: &Pem) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&pem.pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { what: pem.name.clone(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: pem.name.clone() });
    }
    Ok(certs)
}

fn ca_roots(pem: &Pem) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in certificates(pem)?.into_iter().enumerate() {
        roots.add(cert).map_err(|e| TlsError::BadCa { what: pem.name.clone(), index: i + 1, reason: e.to_string() })?;
    }
    Ok(Arc::new(roots))
}

/// The system's CA store (`/etc/ssl/certs`, `SSL_CERT_FILE`), read once.
fn system_roots() -> Result<Arc<RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(if errors.is_empty() { "none found".to_string() } else { errors.join("; ") });
            }
            Ok(Arc::new(roots))
        })
        .clone()
}

/// A TLS failure of a connection, explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFailure {
    /// Metric label and condition detail: `unknown_ca`, `hostname_mismatch`,
    /// `expired`, `invalid_certificate`, `client_certificate_refused`,
    /// `handshake`.
    pub reason: &'static str,
    /// What happened and what to check, for logs and `/readyz`.
    pub message: String,
}

/// The TLS failure somewhere in `error`'s chain of causes, if any.
pub fn failure(error: &(dyn std::error::Error + 'static)) -> Option<TlsFailure> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(explain(tls));
        }
        // `io::Error::source` skips the error it wraps: look at it first.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            let inner: &(dyn std::error::Error + 'static) = inner;
            if let Some(found) = failure(inner) {
                return Some(found);
            }
        }
        next = e.source();
    }
    None
}

fn explain(error: &rustls::Error) -> TlsFailure {
    let (reason, message) = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => (
                "unknown_ca",
                "the server's certificate is not trusted: unknown issuer (it is not signed by the configured CA, \
                 or by the system's CAs when none is configured)"
                    .to_string(),
            ),
            CertificateError::NotValidForName => (
                "hostname_mismatch",
                "hostname mismatch: the server's certificate is not valid for the host of the URL".to_string(),
            ),
            CertificateError::NotValidForNameContext { expected, presented } => (
                "hostname_mismatch",
                format!(
                    "hostname mismatch: the server's certificate is not valid for {} (it names {})",
                    server_name(expected),
                    if presented.is_empty() { "no host".to_string() } else { presented.join(", ") }
                ),
            ),
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                ("expired", format!("the server's certificate is outside its validity period: {error}"))
            }
            _ => ("invalid_certificate", format!("the server's certificate is refused: {error}")),
        },
        rustls::Error::AlertReceived(
            alert @ (AlertDescription::CertificateRequired
            | AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied),
        ) => (
            "client_certificate_refused",
            format!(
                "the server refused the client certificate (TLS alert {alert:?}): it requires one signed by a CA \
                 it trusts; check the client certificate settings"
            ),
        ),
        _ => ("handshake", format!("TLS handshake failed: {error}")),
    };
    TlsFailure { reason, message: format!("TLS: {message}") }
}

fn server_name(name: &rustls::pki_types::ServerName<'_>) -> String {
    match name {
        rustls::pki_types::ServerName::DnsName(dns) => dns.as_ref().to_string(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_PEM: &[u8] = b"hello";

    #[test]
    fn missing_and_malformed_material_is_named_never_quoted() {
        let e = client_config(
            &TlsConfig { ca_file: Some("/nonexistent/ca.pem".into()), ..Default::default() },
            "broker.amqp.tls",
        )
        .expect_err("no file");
        assert!(e.to_string().starts_with("broker.amqp.tls.caFile: cannot read /nonexistent/ca.pem"), "{e}");

        let pem = |name: &str, text: &[u8]| Pem { name: name.to_string(), pem: text.to_vec() };
        let e = TlsMaterial { ca: Some(pem("Secret default/ca key ca.crt", NOT_PEM)), identity: None }
            .client_config("spec.rabbitmq.tls")
            .expect_err("not pem");
        assert!(e.to_string().starts_with("Secret default/ca key ca.crt: no PEM certificate"), "{e}");

        let e = TlsMaterial {
            ca: Some(pem(
                "backend.tls.caFile /ca.pem",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            )),
            identity: None,
        }
        .client_config("backend.tls")
        .expect_err("not a certificate");
        assert!(e.to_string().contains("/ca.pem: certificate 1 is not a usable CA"), "{e}");

        let key = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n";
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("cert");
        let e = TlsMaterial {
            ca: Some(pem("ca", ca.cert.pem().as_bytes())),
            identity: Some((pem("cert", ca.cert.pem().as_bytes()), pem("key", key.as_bytes()))),
        }
        .client_config("backend.tls")
        .expect_err("key of another certificate");
        let text = e.to_string();
        assert!(text.contains("client certificate and key cannot be used"), "{text}");
        assert!(!text.contains("c2VjcmV0"), "the key never appears: {text}");
    }

    #[test]
    fn failures_are_explained_through_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        let f = failure(&io).expect("found");
        assert_eq!(f.reason, "unknown_ca");
        assert!(f.message.contains("unknown issuer"), "{}", f.message);
        let wrapped = lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
        ));
        assert_eq!(failure(&wrapped).expect("found").reason, "client_certificate_refused");
        assert_eq!(failure(&std::io::Error::other("refused")), None);
    }
}
