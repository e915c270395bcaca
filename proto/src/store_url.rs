//! Store URLs: which coordination store a command talks to, and how.
//!
//! ```text
//! mem://                                       the in-process store of `kiln run`
//! etcd://HOST:PORT[,HOST:PORT...][?PARAMS]     etcd, plain text
//! etcds://HOST:PORT[,HOST:PORT...]?ca=PATH[&PARAMS]   etcd over TLS
//! ```
//!
//! Parameters (`name=value`, joined by `&`; `%XX` escapes are decoded):
//!
//! - `ca=PATH`: PEM file of the CA(s) that signed the etcd servers'
//!   certificates. Required with `etcds://`; the system's roots are not used.
//! - `cert=PATH`, `key=PATH`: PEM client certificate and its private key, for
//!   an etcd started with `--client-cert-auth`. Both or neither; `etcds://` only.
//! - `user=NAME`: authenticate as this etcd user. The password comes from
//!   `password_file=PATH` (the file's first line), else from the environment
//!   variable [`PASSWORD_ENV`].
//! - `password_file=PATH`: see `user`.
//!
//! A password is never accepted inside the URL (`password=` is refused): URLs
//! end up in logs, job specs, generated scripts and process lists. Parsing
//! checks the syntax only; the files are read when the store is opened
//! (possibly on another machine than the one that validated the URL).

use std::fmt;
use std::path::PathBuf;

/// The environment variable that holds the etcd password when the store URL
/// names a `user` but no `password_file`.
pub const PASSWORD_ENV: &str = "KILN_ETCD_PASSWORD";

/// A parsed store URL. Holds no secret (paths only), so it may be printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// `mem://`.
    Memory,
    /// `etcd://` or `etcds://`.
    Etcd(EtcdUrl),
}

/// Where an etcd cluster is and how to authenticate to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdUrl {
    /// `host:port` of each member, in the order given.
    pub endpoints: Vec<String>,
    /// TLS settings: `Some` for `etcds://`.
    pub tls: Option<EtcdTls>,
    /// `user=`: the etcd user to authenticate as.
    pub user: Option<String>,
    /// `password_file=`: where the user's password is.
    pub password_file: Option<PathBuf>,
}

/// The files of an `etcds://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// `ca=`: the CA certificate(s) the servers' certificates must chain to.
    pub ca: PathBuf,
    /// `cert=` and `key=`: the client identity, if the servers ask for one.
    pub client: Option<ClientIdentity>,
}

/// A client certificate and its key (`cert=`, `key=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// `cert=`: the PEM client certificate.
    pub cert: PathBuf,
    /// `key=`: the PEM private key of that certificate.
    pub key: PathBuf,
}

/// Why a store URL is not valid. The message names the offending part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrlError(String);

impl fmt::Display for StoreUrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StoreUrlError {}

/// The accepted forms, quoted by errors.
const FORMS: &str = "etcd://host:port[,host:port...][?user=NAME&password_file=PATH], \
                     etcds://host:port[,...]?ca=PATH[&cert=PATH&key=PATH][&user=...] or mem://";

impl StoreUrl {
    /// Parses and checks a store URL (syntax only; see the [module docs](self)).
    pub fn parse(url: &str) -> Result<StoreUrl, StoreUrlError> {
        let fail = |message: String| Err(StoreUrlError(message));
        if url == "mem://" {
            return Ok(StoreUrl::Memory);
        }
        let (tls, rest) = if let Some(rest) = url.strip_prefix("etcds://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("etcd://") {
            (false, rest)
        } else {
            return fail(format!("{url:?} is not a store URL; use {FORMS}"));
        };
        let (hosts, query) = match rest.split_once('?') {
            Some((hosts, query)) => (hosts, Some(query)),
            None => (rest, None),
        };
        let mut endpoints = Vec::new();
        for endpoint in hosts.split(',') {
            let ok = endpoint
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if endpoint.contains('@') {
                // Not quoted: the part before '@' may be a password.
                return fail(format!(
                    "the store URL holds user info (user:password@host); give user=NAME and \
                     password_file=PATH or {PASSWORD_ENV} instead"
                ));
            }
            if !ok || endpoint.contains('/') {
                return fail(format!(
                    "{endpoint:?} in {url:?} is not host:port (credentials go in parameters: {FORMS})"
                ));
            }
            endpoints.push(endpoint.to_string());
        }

        let mut ca = None;
        let mut cert = None;
        let mut key = None;
        let mut user = None;
        let mut password_file = None;
        for pair in query.into_iter().flat_map(|q| q.split('&')) {
            if pair.is_empty() {
                continue;
            }
            let Some((name, value)) = pair.split_once('=') else {
                return fail(format!(
                    "parameter {pair:?} of the store URL has no value (name=value)"
                ));
            };
            let value = percent_decode(value)
                .ok_or_else(|| StoreUrlError(format!("parameter {name}: bad %-escape")))?;
            if value.is_empty() {
                return fail(format!("parameter {name} of the store URL is empty"));
            }
            let slot = match name {
                "ca" => &mut ca,
                "cert" => &mut cert,
                "key" => &mut key,
                "user" => &mut user,
                "password_file" => &mut password_file,
                "password" => {
                    return fail(format!(
                        "the store URL must not hold a password (URLs end up in logs and \
                         process lists): give password_file=PATH or set {PASSWORD_ENV}"
                    ));
                }
                other => {
                    return fail(format!(
                        "unknown parameter {other:?} in the store URL; known: ca, cert, key, \
                         user, password_file"
                    ));
                }
            };
            if slot.replace(value).is_some() {
                return fail(format!("parameter {name} appears twice in the store URL"));
            }
        }

        let tls = if tls {
            let Some(ca) = ca else {
                return fail(format!(
                    "etcds:// needs ca=PATH (the CA that signed the etcd servers' \
                     certificates) in {url:?}"
                ));
            };
            let client = match (cert, key) {
                (Some(cert), Some(key)) => Some(ClientIdentity {
                    cert: cert.into(),
                    key: key.into(),
                }),
                (None, None) => None,
                _ => return fail("cert= and key= go together in the store URL".to_string()),
            };
            Some(EtcdTls {
                ca: ca.into(),
                client,
            })
        } else {
            if let Some(name) = [("ca", &ca), ("cert", &cert), ("key", &key)]
                .iter()
                .find_map(|(name, value)| value.is_some().then_some(name))
            {
                return fail(format!(
                    "parameter {name} is a TLS setting: use etcds:// instead of etcd://"
                ));
            }
            None
        };
        if password_file.is_some() && user.is_none() {
            return fail("password_file= needs user=NAME in the store URL".to_string());
        }
        Ok(StoreUrl::Etcd(EtcdUrl {
            endpoints,
            tls,
            user,
            password_file: password_file.map(PathBuf::from),
        }))
    }
}

/// Decodes `%XX` escapes; `None` for a malformed one or a result that is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(url: &str) -> String {
        StoreUrl::parse(url).unwrap_err().to_string()
    }

    #[test]
    fn plain_and_memory_urls() {
        assert_eq!(StoreUrl::parse("mem://").unwrap(), StoreUrl::Memory);
        let StoreUrl::Etcd(etcd) = StoreUrl::parse("etcd://a:1,b:2").unwrap() else {
            panic!("not etcd");
        };
        assert_eq!(etcd.endpoints, ["a:1", "b:2"]);
        assert_eq!(etcd.tls, None);
        assert_eq!(etcd.user, None);
    }

    #[test]
    fn tls_url_with_every_parameter() {
        let url = "etcds://h:2379,[::1]:2379?ca=/c/ca.pem&cert=/c/client.pem&key=/c/client%26.key\
                   &user=kiln&password_file=/c/pw";
        let StoreUrl::Etcd(etcd) = StoreUrl::parse(url).unwrap() else {
            panic!("not etcd");
        };
        assert_eq!(etcd.endpoints, ["h:2379", "[::1]:2379"]);
        let tls = etcd.tls.unwrap();
        assert_eq!(tls.ca, PathBuf::from("/c/ca.pem"));
        assert_eq!(
            tls.client,
            Some(ClientIdentity {
                cert: "/c/client.pem".into(),
                key: "/c/client&.key".into()
            })
        );
        assert_eq!(etcd.user.as_deref(), Some("kiln"));
        assert_eq!(etcd.password_file, Some(PathBuf::from("/c/pw")));
    }

    #[test]
    fn auth_without_tls_is_allowed() {
        let StoreUrl::Etcd(etcd) = StoreUrl::parse("etcd://h:1?user=kiln").unwrap() else {
            panic!("not etcd");
        };
        assert_eq!(etcd.user.as_deref(), Some("kiln"));
    }

    #[test]
    fn refusals_name_the_cause() {
        assert!(error("etcd://h:1?user=u&password=hunter2").contains("must not hold a password"));
        assert!(!error("etcd://h:1?user=u&password=hunter2").contains("hunter2"));
        assert!(error("etcd://h:1?colour=red").contains("unknown parameter \"colour\""));
        assert!(error("etcds://h:1").contains("needs ca=PATH"));
        assert!(error("etcd://h:1?ca=/x").contains("use etcds://"));
        assert!(error("etcds://h:1?ca=/x&cert=/y").contains("go together"));
        assert!(error("etcd://h:1?password_file=/p").contains("needs user="));
        assert!(error("etcd://u:pw@h:1").contains("user info"));
        assert!(!error("etcd://u:pw@h:1").contains("pw"));
        assert!(error("etcd://h:1?user=a&user=b").contains("twice"));
        assert!(error("etcd://h:1?user").contains("no value"));
        assert!(error("http://h:1").contains("not a store URL"));
    }
}
