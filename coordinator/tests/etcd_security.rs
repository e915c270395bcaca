//! `EtcdStore` over TLS and etcd authentication, against real etcd processes:
//! the conformance suite through an `etcds://...&user=` URL, the refusals a
//! misconfigured client must get (each naming its cause, none hanging), role
//! permissions, and the renewal of expired auth tokens.
//!
//! Certificates are made per test run with the `openssl` command (a throwaway
//! CA, a server certificate for 127.0.0.1, a client certificate, and a second
//! CA that signed nothing of the server's); users and roles are added, and
//! authentication enabled, with `etcdctl`.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use kiln_coordinator::Error;
use kiln_coordinator::conformance::{self, Settings};
use kiln_coordinator::etcd_server::{EtcdServer, EtcdServerOptions, ServerTls};
use kiln_coordinator::store::etcd::{EtcdOptions, EtcdSecurity, EtcdStore};
use kiln_coordinator::store::{self, Store};
use kiln_proto::store_url::StoreUrl;
use tokio::time::{Instant, timeout};

/// etcd grants leases of whole seconds, at least 2.
const TTL: Duration = Duration::from_secs(2);

/// The longest a refused connect may take: the default connect and attempt
/// timeouts are 2 s; a refusal must not wait for the 30 s request deadline.
const REFUSAL_BOUND: Duration = Duration::from_secs(6);

const ROOT_PASSWORD: &str = "root-secret-1";
const KILN_PASSWORD: &str = "kiln-secret-2";
const READER_PASSWORD: &str = "reader-secret-3";

/// A throwaway PKI in a temporary folder.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// CA `ca`, a server certificate `server` (for 127.0.0.1) and a client
    /// certificate `client` signed by it, and an unrelated CA `other-ca`.
    fn generate() -> anyhow::Result<Pki> {
        let dir = tempfile::Builder::new().prefix("kiln-pki-").tempdir()?;
        let pki = Pki { dir };
        pki.self_signed("ca")?;
        pki.self_signed("other-ca")?;
        pki.signed("server")?;
        pki.signed("client")?;
        for (name, password) in [
            ("kiln", KILN_PASSWORD),
            ("reader", READER_PASSWORD),
            ("wrong", "not-the-password"),
        ] {
            std::fs::write(
                pki.path(&format!("{name}.password")),
                format!("{password}\n"),
            )?;
        }
        Ok(pki)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn pem(&self, name: &str) -> String {
        self.path(&format!("{name}.pem")).display().to_string()
    }

    fn key(&self, name: &str) -> String {
        self.path(&format!("{name}.key")).display().to_string()
    }

    fn password_file(&self, user: &str) -> String {
        self.path(&format!("{user}.password")).display().to_string()
    }

    fn openssl(&self, args: &[&str]) -> anyhow::Result<()> {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .context("run openssl (is it installed?)")?;
        ensure!(
            output.status.success(),
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    }

    fn self_signed(&self, name: &str) -> anyhow::Result<()> {
        let (key, pem) = (self.key(name), self.pem(name));
        let subject = format!("/CN=kiln-test-{name}");
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
            "-subj",
            &subject,
            "-days",
            "2",
        ])
    }

    fn signed(&self, name: &str) -> anyhow::Result<()> {
        let (key, pem) = (self.key(name), self.pem(name));
        let csr = self.path(&format!("{name}.csr")).display().to_string();
        let ext = self.path(&format!("{name}.ext")).display().to_string();
        std::fs::write(
            &ext,
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
             extendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        let subject = format!("/CN=kiln-test-{name}");
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subject,
        ])?;
        let serial = self.path("ca.srl").display().to_string();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &self.pem("ca"),
            "-CAkey",
            &self.key("ca"),
            "-CAserial",
            &serial,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ])
    }

    fn server_tls(&self, client_cert_auth: bool) -> ServerTls {
        ServerTls {
            cert: self.pem("server").into(),
            key: self.key("server").into(),
            ca: self.pem("ca").into(),
            client_cert_auth,
        }
    }
}

/// Starts an etcd with a TLS client port (and client certificates required
/// when `client_cert_auth`) and, when `auth`, users `root`, `kiln` (may read
/// and write every key under `/`) and `reader` (may only read them), with
/// authentication enabled.
async fn start_secured(
    pki: &Pki,
    client_cert_auth: bool,
    auth: bool,
    token_ttl: Option<Duration>,
) -> anyhow::Result<EtcdServer> {
    let options = EtcdServerOptions {
        tls: Some(pki.server_tls(client_cert_auth)),
        auth_token_ttl: token_ttl,
    };
    let etcd = tokio::task::spawn_blocking(move || EtcdServer::start_with(options))
        .await?
        .context("start etcd with TLS")?;
    if auth {
        let endpoint = format!("https://{}", etcd.endpoints()[0]);
        let root = format!("root:{ROOT_PASSWORD}");
        let kiln = format!("kiln:{KILN_PASSWORD}");
        let reader = format!("reader:{READER_PASSWORD}");
        let steps: [&[&str]; 12] = [
            &["user", "add", &root],
            &["role", "add", "root"],
            &["user", "grant-role", "root", "root"],
            &["user", "add", &kiln],
            &["role", "add", "kiln"],
            &[
                "role",
                "grant-permission",
                "kiln",
                "--prefix=true",
                "readwrite",
                "/",
            ],
            &["user", "grant-role", "kiln", "kiln"],
            &["user", "add", &reader],
            &["role", "add", "reader"],
            &[
                "role",
                "grant-permission",
                "reader",
                "--prefix=true",
                "read",
                "/",
            ],
            &["user", "grant-role", "reader", "reader"],
            &["auth", "enable"],
        ];
        for step in steps {
            etcdctl(pki, &endpoint, client_cert_auth, step)?;
        }
    }
    Ok(etcd)
}

fn etcdctl(pki: &Pki, endpoint: &str, client_cert: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("etcdctl");
    command
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", endpoint, "--cacert", &pki.pem("ca")])
        .args(["--dial-timeout", "5s", "--command-timeout", "10s"]);
    if client_cert {
        command.args(["--cert", &pki.pem("client"), "--key", &pki.key("client")]);
    }
    let output = command
        .args(args)
        .output()
        .context("run etcdctl (is etcd-client installed?)")?;
    ensure!(
        output.status.success(),
        "etcdctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Connects, failing the test if it takes longer than [`REFUSAL_BOUND`].
async fn connect_bounded(
    url: &str,
) -> anyhow::Result<kiln_coordinator::Result<std::sync::Arc<dyn Store>>> {
    let started = Instant::now();
    let result = timeout(REFUSAL_BOUND, store::connect(url))
        .await
        .with_context(|| format!("connect to {url} still waiting after {REFUSAL_BOUND:?}"))?;
    ensure!(
        started.elapsed() < REFUSAL_BOUND,
        "connect to {url} took {:?}",
        started.elapsed()
    );
    Ok(result)
}

/// The error a connect must end with.
async fn refused(url: &str) -> anyhow::Result<Error> {
    match connect_bounded(url).await? {
        Ok(_) => bail!("{url}: connected, expected a refusal"),
        Err(error) => {
            println!("{url}\n  -> {error}");
            Ok(error)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_with_client_certificates_and_auth_pass_the_conformance_suite() -> anyhow::Result<()> {
    let pki = tokio::task::spawn_blocking(Pki::generate).await??;
    let etcd = start_secured(&pki, true, true, None).await?;
    let url = format!(
        "{}&cert={}&key={}&user=kiln&password_file={}",
        etcd.url(),
        pki.pem("client"),
        pki.key("client"),
        pki.password_file("kiln")
    );
    ensure!(url.starts_with("etcds://"), "{url}");

    // The URL through `store::connect` ...
    let via_url = connect_bounded(&url).await??;
    via_url.put("/kiln/via-url", b"1".to_vec(), None).await?;
    // ... and its parts, whose `Debug` must not show the password.
    let StoreUrl::Etcd(parsed) = StoreUrl::parse(&url)? else {
        bail!("{url} is not an etcd URL");
    };
    let security = EtcdSecurity::from_url(&parsed)?;
    let store =
        EtcdStore::connect_secured(&parsed.endpoints, &security, EtcdOptions::default()).await?;
    for described in [format!("{security:?}"), format!("{store:?}")] {
        ensure!(
            described.contains("tls: true") && described.contains("\"kiln\""),
            "{described}"
        );
        ensure!(
            !described.contains(KILN_PASSWORD),
            "Debug shows the password: {described}"
        );
    }
    let settings = Settings {
        lease_ttl: TTL,
        slack: Duration::from_secs(2),
        ..Settings::default()
    };
    conformance::run_all_with(store, settings).await;

    // The server requires a client certificate: without one the handshake fails.
    let without_cert = format!(
        "{}&user=kiln&password_file={}",
        etcd.url(),
        pki.password_file("kiln")
    );
    let error = refused(&without_cert).await?;
    ensure!(
        matches!(error, Error::Unavailable { .. }) && error.to_string().contains("TLS"),
        "no client certificate: {error}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_clients_are_refused_naming_the_cause() -> anyhow::Result<()> {
    let pki = tokio::task::spawn_blocking(Pki::generate).await??;
    let etcd = start_secured(&pki, false, true, None).await?;
    let base = etcd.url();
    let endpoint = &etcd.endpoints()[0];

    // The right credentials work (so the refusals below are about what they change).
    let good = format!(
        "{base}&user=kiln&password_file={}",
        pki.password_file("kiln")
    );
    let store = connect_bounded(&good).await??;
    store.put("/kiln/ok", b"1".to_vec(), None).await?;

    // A wrong password.
    let wrong = format!(
        "{base}&user=kiln&password_file={}",
        pki.password_file("wrong")
    );
    let error = refused(&wrong).await?;
    ensure!(
        matches!(error, Error::AccessDenied { .. })
            && error.to_string().contains("authentication failed"),
        "wrong password: {error}"
    );
    ensure!(!error.to_string().contains("not-the-password"), "{error}");

    // A user but no password anywhere (unless the environment provides one).
    if std::env::var_os(kiln_proto::store_url::PASSWORD_ENV).is_none() {
        let error = refused(&format!("{base}&user=kiln")).await?;
        ensure!(
            matches!(error, Error::Invalid { .. })
                && error.to_string().contains("needs a password"),
            "no password: {error}"
        );
    }

    // No user at all: etcd accepts the connection but refuses the requests.
    let anonymous = connect_bounded(&base).await??;
    let started = Instant::now();
    let error = match anonymous.put("/kiln/anonymous", b"1".to_vec(), None).await {
        Ok(_) => bail!("a put without credentials was accepted"),
        Err(error) => error,
    };
    ensure!(
        started.elapsed() < REFUSAL_BOUND,
        "took {:?}",
        started.elapsed()
    );
    ensure!(
        matches!(error, Error::AccessDenied { .. })
            && error.to_string().contains("requires authentication"),
        "no credentials: {error}"
    );

    // Plain text to a TLS-only port.
    let plain = format!(
        "etcd://{endpoint}?user=kiln&password_file={}",
        pki.password_file("kiln")
    );
    let error = refused(&plain).await?;
    ensure!(
        matches!(error, Error::Unavailable { .. }) && error.to_string().contains("use etcds://"),
        "plain text to a TLS port: {error}"
    );

    // A CA that did not sign the server's certificate.
    let other_ca = format!(
        "etcds://{endpoint}?ca={}&user=kiln&password_file={}",
        pki.pem("other-ca"),
        pki.password_file("kiln")
    );
    let error = refused(&other_ca).await?;
    ensure!(
        matches!(error, Error::Unavailable { .. })
            && error.to_string().contains("TLS handshake failed")
            && error.to_string().contains("UnknownIssuer"),
        "wrong CA: {error}"
    );

    // Files that are not there, named in the error.
    let missing = pki.path("missing.pem").display().to_string();
    for url in [
        format!("etcds://{endpoint}?ca={missing}"),
        format!("{base}&user=kiln&password_file={missing}"),
        format!("{base}&cert={missing}&key={}", pki.key("client")),
    ] {
        let error = refused(&url).await?;
        ensure!(
            matches!(error, Error::Invalid { .. }) && error.to_string().contains(&missing),
            "{url}: {error}"
        );
    }

    // A password inside the URL is refused without echoing it.
    let error = refused(&format!("{base}&user=kiln&password={KILN_PASSWORD}")).await?;
    ensure!(
        error.to_string().contains("must not hold a password")
            && !error.to_string().contains(KILN_PASSWORD),
        "{error}"
    );
    let error = refused(&format!("{base}&colour=blue")).await?;
    ensure!(error.to_string().contains("\"colour\""), "{error}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_write_permission_is_refused() -> anyhow::Result<()> {
    let pki = tokio::task::spawn_blocking(Pki::generate).await??;
    let etcd = start_secured(&pki, false, true, None).await?;
    let writer = connect_bounded(&format!(
        "{}&user=kiln&password_file={}",
        etcd.url(),
        pki.password_file("kiln")
    ))
    .await??;
    writer.put("/kiln/jobs/a", b"1".to_vec(), None).await?;

    let reader = connect_bounded(&format!(
        "{}&user=reader&password_file={}",
        etcd.url(),
        pki.password_file("reader")
    ))
    .await??;
    let kv = reader
        .get("/kiln/jobs/a")
        .await?
        .context("the key the writer put")?;
    ensure!(kv.value == b"1", "read {:?}", kv.value);
    let started = Instant::now();
    match reader.put("/kiln/jobs/a", b"2".to_vec(), None).await {
        Ok(_) => bail!("a read-only user wrote"),
        Err(error) => ensure!(
            matches!(error, Error::AccessDenied { .. })
                && error.to_string().contains("permission denied"),
            "read-only user: {error}"
        ),
    }
    ensure!(
        started.elapsed() < REFUSAL_BOUND,
        "took {:?}",
        started.elapsed()
    );
    let kv = writer.get("/kiln/jobs/a").await?.context("the key")?;
    ensure!(kv.value == b"1", "the refused write changed the key");
    Ok(())
}

/// etcd's simple tokens expire after `--auth-token-ttl` seconds without use;
/// requests after an idle spell renew the token instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_auth_tokens_are_renewed() -> anyhow::Result<()> {
    let pki = tokio::task::spawn_blocking(Pki::generate).await??;
    let ttl = Duration::from_secs(1);
    let etcd = start_secured(&pki, false, true, Some(ttl)).await?;
    let store = connect_bounded(&format!(
        "{}&user=kiln&password_file={}",
        etcd.url(),
        pki.password_file("kiln")
    ))
    .await??;
    store.put("/kiln/t/a", b"1".to_vec(), None).await?;

    // The premise: a client that does not renew its token is refused after
    // the same idle spell (so this test would catch a store that did not).
    let raw_options = etcd_client::ConnectOptions::new()
        .with_user("kiln", KILN_PASSWORD)
        .with_tls(etcd_client::TlsOptions::new().ca_certificate(
            etcd_client::Certificate::from_pem(std::fs::read(pki.pem("ca"))?),
        ));
    let mut raw = etcd_client::Client::connect(
        [format!("https://{}", etcd.endpoints()[0])],
        Some(raw_options),
    )
    .await?;
    raw.get("/kiln/t/a", None).await?;

    // Simple tokens are swept about once a second after they expire.
    let idle = ttl * 3 + Duration::from_secs(1);
    tokio::time::sleep(idle).await;
    match raw.get("/kiln/t/a", None).await {
        Err(error) => ensure!(error.to_string().contains("invalid auth token"), "{error}"),
        Ok(_) => bail!("the token did not expire in {idle:?}; the test proves nothing"),
    }

    let lease = store.grant_lease(Duration::from_secs(60)).await?;
    store.put("/kiln/t/b", b"2".to_vec(), Some(lease)).await?;
    let (keys, revision) = store.get_prefix("/kiln/t/").await?;
    ensure!(keys.len() == 2, "{keys:?}");

    // Watches and keep-alives open new streams after an idle spell too.
    tokio::time::sleep(idle).await;
    let mut watch = store.watch_prefix("/kiln/t/", Some(revision)).await?;
    store.keep_alive(lease).await?;
    tokio::time::sleep(idle).await;
    store.put("/kiln/t/c", b"3".to_vec(), None).await?;
    let event = timeout(Duration::from_secs(5), watch.try_next())
        .await
        .context("no watch event")??
        .context("the watch ended")?;
    ensure!(event.key() == "/kiln/t/c", "{event:?}");
    Ok(())
}
