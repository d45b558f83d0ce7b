//! The one way the bridge builds HTTP clients for the platforms and CRMs: reqwest on rustls
//! with ring, the same crypto the AWS SDK clients use (bridge_aws::clients), so one TLS stack
//! ships in each function.

/// Makes ring the process's rustls crypto provider. reqwest is built without a provider of
/// its own, so this must run before any client is built; the builders below call it.
pub fn install_crypto() {
    // An error only says a provider is already installed: ours, from an earlier call.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client builder with the crypto provider in place.
pub fn builder() -> reqwest::ClientBuilder {
    install_crypto();
    reqwest::Client::builder()
}

/// A client with reqwest's defaults.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    builder().build()
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_and_the_provider_is_ring() {
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
}
