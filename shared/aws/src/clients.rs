//! AWS SDK clients, built once per process from the standard environment.
//!
//! Endpoints come only from the standard settings (`AWS_ENDPOINT_URL`, and per service
//! `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SQS`, `AWS_ENDPOINT_URL_SSM`,
//! `AWS_ENDPOINT_URL_S3`), so the same binary talks to real AWS, LocalStack or moto without
//! knowing which.

use crate::lambda::env;
pub use aws_config::SdkConfig;
use bridge_platforms::config::InvalidVar;

/// The SDK configuration a function runs with: its region, credentials and endpoint from the
/// environment Lambda sets (`AWS_REGION`; `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`; `AWS_ENDPOINT_URL` for an emulator), and nothing else. aws-config's
/// default chain also reads profile files and knows SSO, STS web identity, IMDS and ECS
/// credentials, none of which a Lambda function uses: without it that code stays out of each
/// artifact and the profile reads out of each cold start. Retries, timeouts, sleep and clock
/// are the SDK's defaults for this behavior version. Operators' commands use
/// [`operator_sdk_config`].
pub async fn sdk_config() -> Result<SdkConfig, InvalidVar> {
    let region = env("AWS_REGION")
        .or_else(|| env("AWS_DEFAULT_REGION"))
        .ok_or(InvalidVar {
            var: "AWS_REGION",
            reason: "is required (Lambda sets it)".into(),
        })?;
    let mut b = SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
        ))
        .http_client(http_client());
    if let Some(url) = env("AWS_ENDPOINT_URL") {
        b = b.endpoint_url(url);
    }
    Ok(b.build())
}

/// The SDK configuration with aws-config's whole default chain (profiles, SSO, assumed roles,
/// instance metadata): what a person running `bridge-backfill` on their own machine has.
pub async fn operator_sdk_config() -> SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http_client())
        .load()
        .await
}

/// The SDK's HTTP client on rustls with ring (the SDK's default is aws-lc): the same crypto as
/// the platform clients (bridge_platforms::http), so one TLS stack ships. It trusts the same
/// roots too, Mozilla's as `webpki-root-certs` compiles them in (Amazon Trust Services' roots
/// among them), instead of reading and parsing the system's certificate files at every cold
/// start.
pub fn http_client() -> aws_sdk_dynamodb::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    let builder = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ));
    match tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::empty().with_pem_certificate(root_pem()))
        .build()
    {
        Ok(ctx) => builder.tls_context(ctx).build_https(),
        Err(e) => {
            tracing::warn!(error = %e, "compiled-in roots refused: the system's are used");
            builder.build_https()
        }
    }
}

/// The compiled-in root certificates as one PEM bundle, the form the SDK's trust store takes.
/// Only those rustls accepts: the SDK adds each with an `expect`, so one it refused would
/// panic in the first request, not here.
fn root_pem() -> Vec<u8> {
    use base64::Engine;
    let mut pem = String::new();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        if rustls::RootCertStore::empty().add(cert.clone()).is_err() {
            continue;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        // PEM lines are 64 characters. base64 is ASCII, so every cut is at a char boundary.
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    pem.into_bytes()
}

// Each client honours its service's own endpoint variable over the global one, as the SDK's
// environment loader would.
pub fn dynamodb(cfg: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
    let mut b = aws_sdk_dynamodb::config::Builder::from(cfg);
    if let Some(url) = env("AWS_ENDPOINT_URL_DYNAMODB") {
        b = b.endpoint_url(url);
    }
    aws_sdk_dynamodb::Client::from_conf(b.build())
}

pub fn sqs(cfg: &aws_config::SdkConfig) -> aws_sdk_sqs::Client {
    let mut b = aws_sdk_sqs::config::Builder::from(cfg);
    if let Some(url) = env("AWS_ENDPOINT_URL_SQS") {
        b = b.endpoint_url(url);
    }
    aws_sdk_sqs::Client::from_conf(b.build())
}

pub fn ssm(cfg: &aws_config::SdkConfig) -> aws_sdk_ssm::Client {
    let mut b = aws_sdk_ssm::config::Builder::from(cfg);
    if let Some(url) = env("AWS_ENDPOINT_URL_SSM") {
        b = b.endpoint_url(url);
    }
    aws_sdk_ssm::Client::from_conf(b.build())
}

/// Every parameter under `path` (decrypted), keyed by its last path segment. Read once at
/// init: secrets are cached for the life of the execution environment.
pub async fn parameters_by_path(
    client: &aws_sdk_ssm::Client,
    path: &str,
) -> Result<std::collections::HashMap<String, String>, aws_sdk_ssm::Error> {
    let mut out = std::collections::HashMap::new();
    let mut token = None;
    loop {
        let page = client
            .get_parameters_by_path()
            .path(path)
            .recursive(true)
            .with_decryption(true)
            .set_next_token(token)
            .send()
            .await?;
        for p in page.parameters() {
            if let (Some(name), Some(value)) = (p.name(), p.value()) {
                let key = name.rsplit('/').next().unwrap_or(name).to_string();
                out.insert(key, value.to_string());
            }
        }
        token = page.next_token().map(str::to_string);
        if token.is_none() {
            return Ok(out);
        }
    }
}

/// One parameter's decrypted value.
pub async fn parameter(
    client: &aws_sdk_ssm::Client,
    name: &str,
) -> Result<String, aws_sdk_ssm::Error> {
    let out = client
        .get_parameter()
        .name(name)
        .with_decryption(true)
        .send()
        .await?;
    Ok(out
        .parameter()
        .and_then(|p| p.value())
        .unwrap_or_default()
        .to_string())
}

/// What reading named parameters found wrong: a name SSM does not have (named, since
/// parameter names are configuration, not secrets), or the call itself.
#[derive(Debug, thiserror::Error)]
pub enum ParameterError {
    #[error("SSM parameter {0} does not exist")]
    Missing(String),
    #[error("SSM GetParameters failed")]
    Ssm(#[from] aws_sdk_ssm::Error),
}

/// Several parameters' decrypted values in one request (SSM takes up to 10 names), keyed by
/// name: one round trip of the init instead of one per secret.
pub async fn parameters(
    client: &aws_sdk_ssm::Client,
    names: &[&str],
) -> Result<std::collections::HashMap<String, String>, ParameterError> {
    let out = client
        .get_parameters()
        .set_names(Some(names.iter().map(|n| n.to_string()).collect()))
        .with_decryption(true)
        .send()
        .await
        .map_err(aws_sdk_ssm::Error::from)?;
    if let Some(missing) = out.invalid_parameters().first() {
        return Err(ParameterError::Missing(missing.clone()));
    }
    Ok(out
        .parameters()
        .iter()
        .filter_map(|p| Some((p.name()?.to_string(), p.value()?.to_string())))
        .collect())
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn the_sdk_trusts_every_compiled_in_root_and_reads_its_pem() {
        let pem = super::root_pem();
        let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(certs.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        assert!(certs.len() > 100);
        let mut store = rustls::RootCertStore::empty();
        for c in certs {
            store.add(c).unwrap();
        }
        let _client = super::http_client();
    }
}
