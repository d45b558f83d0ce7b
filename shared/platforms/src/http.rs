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

    /// A self-signed certificate for 127.0.0.1 and localhost and its key, made for this test
    /// only (P-256, not a CA, valid 2020-2120): no root trusts it. Not a secret.
    const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBbjCCAROgAwIBAgIUB/CHAHl9/ZS5DHYQ3aLqTfs2YsUwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJbG9jYWxob3N0MCAXDTIwMDEwMTAwMDAwMFoYDzIxMjAwMTAx
MDAwMDAwWjAUMRIwEAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASmFZNy7ADRBF2r2M92k1xGVFqLpFg/JZg3BXwZsV4/W2mfPBhr77PX
8WryYw/5Aexu1YatR9Fy/fonmFiMaWiKo0EwPzAaBgNVHREEEzARgglsb2NhbGhv
c3SHBH8AAAEwDAYDVR0TAQH/BAIwADATBgNVHSUEDDAKBggrBgEFBQcDATAKBggq
hkjOPQQDAgNJADBGAiEAnyaV+r3idLGYAi1pag8ou/gfD74MVNH1v62RA/xELdkC
IQDIDBizg04xIdg2LKVFWmK9ysbis9hN/HfKSONMVHl7Dw==
-----END CERTIFICATE-----";
    const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4yqouw441xLnS/0o
+1GS/RrB8nLVccdPXNxG7WcgFOqhRANCAASmFZNy7ADRBF2r2M92k1xGVFqLpFg/
JZg3BXwZsV4/W2mfPBhr77PX8WryYw/5Aexu1YatR9Fy/fonmFiMaWiK
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

    /// The clients verify servers: one whose certificate no Mozilla root signed is refused,
    /// and the same server is reached by a client built the same way that trusts its
    /// certificate.
    #[tokio::test]
    async fn a_server_certificate_no_mozilla_root_signed_is_refused() {
        let port = tls_server(2);
        let url = format!("https://127.0.0.1:{port}/");
        let e = super::client().unwrap().get(&url).send().await.unwrap_err();
        let text = super::error_text(e);
        assert!(text.contains("UnknownIssuer"), "{text}");
        super::install_crypto();
        let trusting = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(TEST_CERT.as_bytes()).unwrap()])
            .build()
            .unwrap();
        let ok = trusting.get(&url).send().await.unwrap();
        assert_eq!(ok.status(), 200);
    }
}
