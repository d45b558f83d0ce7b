//! The one way the bridge builds HTTP clients for the platforms and CRMs: reqwest on rustls
//! with ring, the same crypto the AWS SDK clients use (bridge_aws::clients), so one TLS stack
//! ships in each function.

/// Makes ring the process's rustls crypto provider. reqwest is built without a provider of
/// its own, so this must run before any client is built; the builders below call it.
pub fn install_crypto() {
    // An error only says a provider is already installed: ours, from an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Mozilla's root certificates as `webpki-root-certs` compiles them in, parsed once per
/// process. reqwest's default (rustls-platform-verifier) reads and parses the system's
/// certificate files for every client it builds: 4-5 ms of each cold start on a Debian host,
/// against 0.2 ms for these. The AWS SDK clients trust the same roots
/// (`bridge_aws::clients::http_client`).
fn roots() -> Vec<reqwest::Certificate> {
    static ROOTS: std::sync::LazyLock<Vec<reqwest::Certificate>> = std::sync::LazyLock::new(|| {
        webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .filter_map(|c| reqwest::Certificate::from_der(c.as_ref()).ok())
            .collect()
    });
    ROOTS.clone()
}

/// A client builder with the crypto provider and the root certificates in place.
pub fn builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder().tls_certs_only(roots())
}

/// A client with reqwest's defaults.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    builder().build()
}

/// A transport error's text without its URL. reqwest's `Display` names the URL, and these
/// texts go into logs, the delivery log (kept 400 days) and DLQ attributes: whatever a URL
/// carries (a customer id, a path, a token if anyone ever put one there) must not follow.
/// Its causes (refused, reset, DNS) are kept, since they are what an operator acts on.
pub fn error_text(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_and_the_provider_is_ring() {
        assert!(super::roots().len() > 100, "Mozilla's roots");
        assert!(super::client().is_ok());
        assert!(super::client().is_ok(), "a second call is harmless");
        let provider = rustls::crypto::CryptoProvider::get_default().expect("installed");
        assert!(
            provider
                .cipher_suites
                .iter()
                .any(|s| format!("{:?}", s.suite()).contains("TLS13_AES_128_GCM_SHA256"))
        );
    }

    #[tokio::test]
    async fn transport_errors_never_carry_the_url() {
        // A port nothing listens on: the connection is refused at once.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let url = format!("http://127.0.0.1:{port}/v1/act_SECRET-PATH?access_token=SECRET-TOKEN");
        let e = super::client()
            .expect("client")
            .get(&url)
            .send()
            .await
            .expect_err("nothing listens");
        assert!(
            e.to_string().contains("SECRET-TOKEN"),
            "reqwest names the URL: {e}"
        );
        let text = super::error_text(e);
        assert!(!text.contains("SECRET"), "{text}");
        assert!(!text.contains(&port.to_string()), "{text}");
        assert!(text.contains("error sending request"), "{text}");
    }
}
