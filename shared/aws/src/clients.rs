//! AWS SDK clients, built once per process from the standard environment.
//!
//! Endpoints come only from the standard settings (`AWS_ENDPOINT_URL`, and per service
//! `AWS_ENDPOINT_URL_DYNAMODB`, `AWS_ENDPOINT_URL_SQS`, `AWS_ENDPOINT_URL_SSM`,
//! `AWS_ENDPOINT_URL_S3`), so the same binary talks to real AWS, LocalStack or moto without
//! knowing which.

use crate::lambda::env;
pub use aws_config::SdkConfig;
use bridge_platforms::config::InvalidVar;
use bridge_platforms::credentials::{Deferred, ReadError};

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
        .region(aws_config::Region::new(region.clone()))
        .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
            aws_config::environment::credentials::EnvironmentVariableCredentialsProvider::new(),
        ))
        .http_client(http_client(SdkTrust::for_lambda(
            &region,
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
        )));
    if let Some(url) = env("AWS_ENDPOINT_URL") {
        b = b.endpoint_url(url);
    }
    Ok(b.build())
}

/// The SDK configuration with aws-config's whole default chain (profiles, SSO, assumed roles,
/// instance metadata): what a person running `bridge-backfill` on their own machine has. It
/// trusts Mozilla's whole set of roots, since a profile may name any endpoint.
pub async fn operator_sdk_config() -> SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http_client(SdkTrust::Mozilla))
        .load()
        .await
}

/// Which root certificates the SDK's HTTP client trusts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SdkTrust {
    /// Amazon Trust Services' roots only: what AWS's own service endpoints chain to.
    Aws,
    /// Every root Mozilla trusts: for an endpoint that is not AWS's own (an emulator, a proxy).
    Mozilla,
}

impl SdkTrust {
    /// The roots a Lambda function needs: Amazon Trust Services' when it talks to AWS's own
    /// endpoints in a commercial or GovCloud Region, Mozilla's whole set when an endpoint is
    /// overridden with an `https` URL (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_<SERVICE>`: a
    /// proxy or emulator with a certificate of its own) or the Region is in the China
    /// partition, whose endpoints are run apart from AWS's own. A plain `http` emulator needs
    /// no roots, so it runs with the same trust as a deployed function.
    pub fn for_lambda(region: &str, vars: impl IntoIterator<Item = (String, String)>) -> SdkTrust {
        // A blank value is unset, as `env` reads it.
        let tls_override = vars.into_iter().any(|(k, v)| {
            let v = v.trim().to_ascii_lowercase();
            k.starts_with("AWS_ENDPOINT_URL") && !v.is_empty() && !v.starts_with("http://")
        });
        if tls_override || region.starts_with("cn-") {
            SdkTrust::Mozilla
        } else {
            SdkTrust::Aws
        }
    }
}

/// The SDK's HTTP client on rustls with ring (the SDK's default is aws-lc): the same crypto as
/// the platform clients (bridge_platforms::http), so one TLS stack ships. Its roots are
/// compiled in (`webpki-root-certs`, Mozilla's set) instead of read from the system's
/// certificate files at every cold start.
///
/// The SDK takes roots only as PEM and decodes and parses all of them for each connector it
/// builds: Mozilla's 118 were 40% of a sender's cold-start CPU (perf, local profile). AWS
/// serves every service endpoint with a certificate from Amazon Trust Services, whose five
/// roots (Amazon Root CA 1-4, Starfield Services Root CA G2) are what AWS tells clients with
/// a restricted trust list to trust (AWS Security Blog, "How to Prepare for AWS's Move to Its
/// Own Certificate Authority"), so [`SdkTrust::Aws`] trusts those alone.
pub fn http_client(trust: SdkTrust) -> aws_sdk_dynamodb::config::SharedHttpClient {
    use aws_smithy_http_client::tls;
    let builder = aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(
        tls::rustls_provider::CryptoMode::Ring,
    ));
    match tls::TlsContext::builder()
        .with_trust_store(tls::TrustStore::empty().with_pem_certificate(root_pem(trust)))
        .build()
    {
        Ok(ctx) => builder.tls_context(ctx).build_https(),
        Err(e) => {
            tracing::warn!(error = %e, "compiled-in roots refused: the system's are used");
            builder.build_https()
        }
    }
}

/// Amazon Trust Services' root certificates, by the subject each names itself with.
const AWS_ROOTS: &[&[u8]] = &[
    b"Amazon Root CA 1",
    b"Amazon Root CA 2",
    b"Amazon Root CA 3",
    b"Amazon Root CA 4",
    b"Starfield Services Root Certificate Authority - G2",
];

/// The compiled-in roots `trust` takes.
fn roots(trust: SdkTrust) -> Vec<&'static rustls::pki_types::CertificateDer<'static>> {
    let all = webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter();
    if trust == SdkTrust::Mozilla {
        return all.collect();
    }
    // A root is self-signed, so a name it carries is its own: no other root's DER holds
    // Amazon's names. memmem, not a naive scan: this runs at every cold start over ~200 kB.
    let names: Vec<memchr::memmem::Finder> =
        AWS_ROOTS.iter().map(memchr::memmem::Finder::new).collect();
    all.filter(|cert| names.iter().any(|n| n.find(cert.as_ref()).is_some()))
        .collect()
}

/// The roots `trust` takes as one PEM bundle, the form the SDK's trust store takes. Only
/// those rustls accepts: the SDK adds each with an `expect`, so one it refused would panic in
/// the first request, not here.
fn root_pem(trust: SdkTrust) -> Vec<u8> {
    use base64::Engine;
    let mut pem = String::new();
    for cert in roots(trust) {
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
/// name: one round trip per cold start instead of one per secret.
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

/// The longest the credentials' read may take before it counts as failed (and is tried
/// again at the next use): the SDK bounds only the connection, and a send waits for the read.
pub const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// SSM's error codes for `GetParameters` that a retry cannot mend: the role may not read the
/// parameter or its KMS key, the key is disabled or gone, the request is malformed. Sources:
/// the operation's own errors as aws-sdk-ssm generates them (`GetParametersError`:
/// InternalServerError, InvalidKeyId) and the SSM API Reference's "Common Errors"
/// (AccessDeniedException, ValidationException, UnrecognizedClientException; ThrottlingException
/// and the 5xx ones are transient). A name SSM does not have is no error: it comes back in
/// `InvalidParameters` ([`ParameterError::Missing`]).
const PERMANENT_SSM_CODES: &[&str] = &[
    "AccessDeniedException",
    "InvalidKeyId",
    "ValidationException",
    "UnrecognizedClientException",
];

/// `read` (an SSM call) within [`READ_TIMEOUT`]; `what` names it in the error when it took longer.
pub async fn within_read_timeout<T, E>(
    what: &str,
    read: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Result<T, E>, String> {
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .map_err(|_| format!("{what}: no answer in {} s", READ_TIMEOUT.as_secs()))
}

/// What reading parameters failed with, as a platform's credentials error: permanent when a
/// person must act (above), else transient (throttling, a 5xx, a connection that failed).
pub fn read_error(e: &ParameterError) -> ReadError {
    use aws_sdk_ssm::error::ProvideErrorMetadata;
    match e {
        ParameterError::Missing(_) => ReadError {
            message: e.to_string(),
            permanent: true,
        },
        ParameterError::Ssm(source) => ReadError {
            message: format!("{e}: {}", aws_sdk_ssm::error::DisplayErrorContext(source)),
            permanent: source
                .code()
                .is_some_and(|c| PERMANENT_SSM_CODES.contains(&c)),
        },
    }
}

/// Credentials built from the SSM parameters `names`, read in one request that starts now and
/// is waited for at their first use (see [`Deferred`]), within [`READ_TIMEOUT`]. What
/// [`read_error`] calls permanent, or values `build` refuses, are dead-lettered with an alert;
/// anything else is retried with the pair's backoff. Either error answers for
/// [`bridge_platforms::credentials::FAILURE_HOLD`], then the next use reads again.
pub fn deferred_parameters<T, B>(cfg: &SdkConfig, names: Vec<String>, build: B) -> Deferred<T>
where
    T: Send + Sync + 'static,
    B: Fn(std::collections::HashMap<String, String>) -> Result<T, ReadError>
        + Send
        + Sync
        + 'static,
{
    let ssm = ssm(cfg);
    let build = std::sync::Arc::new(build);
    Deferred::read(move || {
        let (ssm, names, build) = (ssm.clone(), names.clone(), build.clone());
        async move {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let read = match within_read_timeout("SSM GetParameters", parameters(&ssm, &refs)).await
            {
                Ok(read) => read.map_err(|e| read_error(&e)),
                Err(message) => Err(ReadError {
                    message,
                    permanent: false,
                }),
            };
            match read {
                Ok(values) => build(values),
                Err(e) => {
                    tracing::warn!(parameters = ?names, error = %e, permanent = e.permanent, "credentials not read");
                    Err(e)
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::{AWS_ROOTS, SdkTrust, root_pem};

    fn parsed(pem: &[u8]) -> Vec<CertificateDer<'static>> {
        let certs: Vec<CertificateDer> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .unwrap();
        let mut store = rustls::RootCertStore::empty();
        for c in &certs {
            store.add(c.clone()).unwrap();
        }
        certs
    }

    #[test]
    fn ssm_errors_a_person_must_mend_are_permanent_and_the_rest_transient() {
        use aws_sdk_ssm::error::ErrorMetadata;
        use aws_sdk_ssm::operation::get_parameters::GetParametersError;
        let ssm = |code: &str| {
            super::ParameterError::Ssm(aws_sdk_ssm::Error::from(GetParametersError::generic(
                ErrorMetadata::builder()
                    .code(code)
                    .message("not authorized to perform ssm:GetParameters")
                    .build(),
            )))
        };
        for code in [
            "AccessDeniedException",
            "InvalidKeyId",
            "ValidationException",
        ] {
            let e = super::read_error(&ssm(code));
            assert!(e.permanent, "{code}");
            assert!(e.message.contains(code), "{}", e.message);
        }
        for code in ["ThrottlingException", "InternalServerError"] {
            assert!(!super::read_error(&ssm(code)).permanent, "{code}");
        }
        let missing = super::read_error(&super::ParameterError::Missing("/bridge/token".into()));
        assert!(missing.permanent);
        assert_eq!(
            missing.message,
            "SSM parameter /bridge/token does not exist"
        );
    }

    #[test]
    fn with_mozillas_roots_the_sdk_trusts_every_compiled_in_root_and_reads_its_pem() {
        let certs = parsed(&root_pem(SdkTrust::Mozilla));
        assert_eq!(certs.len(), webpki_root_certs::TLS_SERVER_ROOT_CERTS.len());
        assert!(certs.len() > 100);
        let _client = super::http_client(SdkTrust::Mozilla);
    }

    #[test]
    fn with_aws_roots_the_sdk_trusts_each_amazon_trust_services_root_once() {
        let certs = parsed(&root_pem(SdkTrust::Aws));
        assert_eq!(certs.len(), AWS_ROOTS.len());
        for name in AWS_ROOTS {
            let holding = certs
                .iter()
                .filter(|c| c.as_ref().windows(name.len()).any(|w| w == *name))
                .count();
            assert_eq!(holding, 1, "{}", String::from_utf8_lossy(name));
        }
        let _client = super::http_client(SdkTrust::Aws);
    }

    #[test]
    fn an_https_endpoint_override_or_the_china_partition_trusts_mozillas_roots() {
        let vars = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let trust = |region, v: &[(&str, &str)]| SdkTrust::for_lambda(region, vars(v));
        assert_eq!(
            trust(
                "eu-west-1",
                &[("AWS_REGION", "eu-west-1"), ("TABLE_NAME", "t")]
            ),
            SdkTrust::Aws
        );
        assert_eq!(trust("us-gov-west-1", &[]), SdkTrust::Aws);
        assert_eq!(
            trust("eu-west-1", &[("AWS_ENDPOINT_URL", " ")]),
            SdkTrust::Aws
        );
        assert_eq!(
            trust(
                "eu-west-1",
                &[("AWS_ENDPOINT_URL", "http://127.0.0.1:5000")]
            ),
            SdkTrust::Aws
        );
        assert_eq!(
            trust(
                "eu-west-1",
                &[("AWS_ENDPOINT_URL", "https://localhost.localstack.cloud")]
            ),
            SdkTrust::Mozilla
        );
        assert_eq!(
            trust(
                "eu-west-1",
                &[("AWS_ENDPOINT_URL_SSM", "HTTPS://proxy.example")]
            ),
            SdkTrust::Mozilla
        );
        assert_eq!(trust("cn-north-1", &[]), SdkTrust::Mozilla);
    }
}
