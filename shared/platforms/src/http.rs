//! The one way the bridge builds HTTP clients for the platforms and CRMs: reqwest on rustls
//! with ring, the same crypto the AWS SDK clients use (bridge_aws::clients), so one TLS stack
//! ships in each function.

/// Makes ring the process's rustls crypto provider. reqwest is built without a provider of
/// its own, so this must run before any client is built; the builders below call it.
pub fn install_crypto() {
    // An error only says a provider is already installed: ours, from an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS configuration every platform client uses: ring, TLS 1.2 and 1.3, and Mozilla's
/// root certificates as `webpki-roots` compiles them in, as trust anchors already parsed (the
/// crate's constants), so a cold start parses no certificate. reqwest's default
/// (rustls-platform-verifier) read and parsed the system's certificate files for every client
/// (4-5 ms of each cold start on a Debian host); handing reqwest Mozilla's certificates to
/// parse took 0.6-1 ms. Built once per process. reqwest is built without HTTP/2, so no ALPN
/// protocol is set (it would offer none of its own either).
fn tls() -> rustls::ClientConfig {
    static TLS: std::sync::LazyLock<Option<rustls::ClientConfig>> =
        std::sync::LazyLock::new(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .ok()
            .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        });
    match &*TLS {
        Some(c) => c.clone(),
        // ring supports both safe protocol versions, so this is not reached; an empty store
        // would refuse every server rather than trust any.
        None => rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    }
}

/// A client builder with the crypto provider and the root certificates in place.
pub fn builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder().tls_backend_preconfigured(tls())
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
        assert!(
            webpki_roots::TLS_SERVER_ROOTS.len() > 100,
            "Mozilla's roots"
        );
        let tls = super::tls();
        assert!(tls.alpn_protocols.is_empty());
        assert!(
            tls.crypto_provider()
                .cipher_suites
                .iter()
                .any(|s| format!("{:?}", s.suite()).contains("TLS13_AES_128_GCM_SHA256"))
        );
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

    /// A self-signed certificate for 127.0.0.1 and its key, made for this test only
    /// (`openssl req -x509 -newkey ec`, not a CA): no root trusts it.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBrTCCAVSgAwIBAgIUE2+vwohOP0EHgHfv85+hH+iboGswCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTI2MTIwMTAzMDI0OFoYDzIxMjYxMTA3
MDMwMjQ4WjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAARpCp7NSnrpAMLDfrY8mi/sLaR8zTiwB6SMBm3yGUXl53IHDD3PIIMP
DwTsU3LjljJ/h3VkvWPuD4PTKiYvsMJ2o4GBMH8wHQYDVR0OBBYEFN1wukzlBZR9
kew21Enl0e5SpaCTMB8GA1UdIwQYMBaAFN1wukzlBZR9kew21Enl0e5SpaCTMBoG
A1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9zdDAMBgNVHRMBAf8EAjAAMBMGA1UdJQQM
MAoGCCsGAQUFBwMBMAoGCCqGSM49BAMCA0cAMEQCIFJxjzeucKa/g1qC66S5/CG7
JblEPhj8JkMgA52Ys5ufAiAE/jJ9hhM38cFn/Q8YRcU5Qe3xgN0vn6mnXszAbMA2
VA==
-----END CERTIFICATE-----";
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgMXl+XOslbApjUzp1
i692Ak4uo00PS3/x0mqdAOP/kOyhRANCAARpCp7NSnrpAMLDfrY8mi/sLaR8zTiw
B6SMBm3yGUXl53IHDD3PIIMPDwTsU3LjljJ/h3VkvWPuD4PTKiYvsMJ2
-----END PRIVATE KEY-----";

    /// A TLS server on 127.0.0.1 with the test certificate that answers each of `n` connections
    /// with `200 ok` once the handshake succeeds.
    fn tls_server(n: usize) -> u16 {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::io::{Read, Write};
        let cert = CertificateDer::from_pem_slice(TEST_CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(TEST_KEY.as_bytes()).unwrap();
        let config = std::sync::Arc::new(
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for _ in 0..n {
                let Ok((sock, _)) = listener.accept() else {
                    return;
                };
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut buf = [0u8; 4096];
                // A client that refuses the certificate ends the handshake: the read fails.
                if tls.read(&mut buf).is_ok() {
                    let _ = tls.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    );
                    let _ = tls.flush();
                }
            }
        });
        port
    }

    /// The preconfigured TLS still verifies: a server whose certificate no Mozilla root signed
    /// is refused, and the same server is reached once its certificate is the trusted root.
    #[tokio::test]
    async fn a_server_certificate_no_mozilla_root_signed_is_refused() {
        let port = tls_server(2);
        let url = format!("https://127.0.0.1:{port}/");
        let e = super::client().unwrap().get(&url).send().await.unwrap_err();
        let text = super::error_text(e);
        assert!(text.contains("UnknownIssuer"), "{text}");
        let trusting = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(TEST_CERT.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let ok = trusting.get(&url).send().await.unwrap();
        assert_eq!(ok.status(), 200);
    }
}
