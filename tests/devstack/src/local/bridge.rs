//! The one assembly of a whole bridge on this machine, used by `bridge-local up` and by every
//! end-to-end test: the fakes as destinations (or real endpoints), a stack from
//! `infra/template.yaml` pointed at them, the secrets in the emulator's SSM, and the functions'
//! binaries under the local runtime with the template's mappings.

use super::{Options, Plan, Running, runtime::LineSink};
use crate::fakes::google::FakeGoogle;
use crate::fakes::hubspot::FakeHubSpot;
use crate::fakes::meta::FakeMeta;
use crate::{Stack, StackSpec};
use aws_config::SdkConfig;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The secrets the bridge reads from SSM, and the tokens the fakes know.
#[derive(Clone, Debug)]
pub struct Secrets {
    pub meta_token: String,
    /// With one, the fake Meta requires `appsecret_proof` on every request.
    pub meta_app_secret: Option<String>,
    pub hubspot_token: String,
    /// What goes under the webhooks path besides the HubSpot token: each source's signing
    /// secret (`generic`, `hubspot`, `salesforce`) and `hubspot-app-secret`.
    pub webhooks: Vec<(String, String)>,
}

/// Where the functions send.
pub enum Destinations {
    /// The strict fakes of Meta, Google and HubSpot, on `base_port` + 100, 101 and 102 (the
    /// local stack's fixed ports, which `post-samples` finds), else on ephemeral ports.
    Fakes { base_port: Option<u16> },
    /// The endpoints and SSM secrets already configured (`BRIDGE_REAL_DESTINATIONS=1`).
    Real,
}

/// What a bridge is started with.
pub struct BridgeConfig {
    pub stack: String,
    /// Use the stack as it is when it exists already (`bridge-local up` across runs).
    pub reuse_stack: bool,
    /// Template parameters, on top of the destinations' URLs and the secrets' names.
    pub params: Vec<(String, String)>,
    /// SSM names start with this: `{prefix}/meta/access-token`, `{prefix}/webhooks/...`.
    /// `/conversion-bridge` is the template's default.
    pub ssm_prefix: String,
    pub secrets: Secrets,
    pub destinations: Destinations,
    pub plan_path: PathBuf,
    /// Also write the stack's variables here (for the operator commands).
    pub env_file: Option<PathBuf>,
    pub bin_dir: PathBuf,
    pub url_addr: String,
    pub instances: usize,
    /// Environment for every function on top of the emulator's endpoint and credentials.
    pub env: BTreeMap<String, String>,
    /// Run the template's schedules; tests invoke the scheduled function themselves.
    pub schedules: bool,
    pub sink: LineSink,
}

/// The fakes a bridge sends to.
#[derive(Clone)]
pub struct Fakes {
    pub meta: FakeMeta,
    pub google: FakeGoogle,
    pub hubspot: FakeHubSpot,
}

/// A running bridge.
pub struct Bridge {
    pub stack: Stack,
    pub plan: Plan,
    pub running: Running,
    pub fakes: Option<Fakes>,
    pub aws: SdkConfig,
    /// The functions' environment (what an operator's command is given too).
    pub env: BTreeMap<String, String>,
    bin_dir: PathBuf,
    url_addr: String,
    instances: usize,
    schedules: bool,
    sink: LineSink,
}

impl Bridge {
    pub async fn start(cfg: BridgeConfig) -> Result<Bridge, String> {
        let fakes = match cfg.destinations {
            Destinations::Real => None,
            Destinations::Fakes { base_port } => {
                let addr = |offset: u16| match base_port {
                    Some(p) => format!("127.0.0.1:{}", p.saturating_add(offset)),
                    None => "127.0.0.1:0".to_string(),
                };
                let meta = FakeMeta::start_on(&addr(100), &cfg.secrets.meta_token).await;
                meta.set_app_secret(cfg.secrets.meta_app_secret.as_deref());
                let google = FakeGoogle::start_on(&addr(101)).await;
                let hubspot = FakeHubSpot::start_on(&addr(102), &cfg.secrets.hubspot_token).await;
                Some(Fakes {
                    meta,
                    google,
                    hubspot,
                })
            }
        };
        let prefix = cfg.ssm_prefix.trim_end_matches('/');
        let webhooks = format!("{prefix}/webhooks");
        let meta_token = format!("{prefix}/meta/access-token");
        let meta_app_secret = format!("{prefix}/meta/app-secret");
        let google_credentials = format!("{prefix}/google/credentials");
        let mut params: Vec<(String, String)> = Vec::new();
        let mut secrets: Vec<(String, String)> = Vec::new();
        if let Some(f) = &fakes {
            params.extend(
                [
                    ("MetaGraphBaseUrl", f.meta.base_url.clone()),
                    ("MetaPixelId", "1234567890".to_string()),
                    ("GoogleAdsBaseUrl", f.google.base_url.clone()),
                    ("GoogleDataManagerBaseUrl", f.google.base_url.clone()),
                    ("GoogleOAuthTokenUrl", f.google.token_url()),
                    ("HubSpotApiBaseUrl", f.hubspot.base_url.clone()),
                    ("WebhookSecretsParameterPath", webhooks.clone()),
                    ("MetaAccessTokenParameter", meta_token.clone()),
                    ("GoogleCredentialsParameter", google_credentials.clone()),
                ]
                .map(|(k, v)| (k.to_string(), v)),
            );
            secrets.push((meta_token, cfg.secrets.meta_token.clone()));
            secrets.push((google_credentials, f.google.credentials_json()));
            secrets.push((
                format!("{webhooks}/hubspot-token"),
                cfg.secrets.hubspot_token.clone(),
            ));
            for (name, value) in &cfg.secrets.webhooks {
                secrets.push((format!("{webhooks}/{name}"), value.clone()));
            }
            if let Some(s) = &cfg.secrets.meta_app_secret {
                params.push(("MetaAppSecretParameter".into(), meta_app_secret.clone()));
                secrets.push((meta_app_secret, s.clone()));
            }
        }
        for (k, v) in cfg.params {
            params.retain(|(x, _)| *x != k);
            params.push((k, v));
        }
        let stack = Stack::deploy(&StackSpec {
            name: cfg.stack.clone(),
            reuse: cfg.reuse_stack,
            params: &params,
            plan: Some(&cfg.plan_path),
            env_file: cfg.env_file.as_deref(),
        })?;
        let plan = Plan::load(&cfg.plan_path)?;
        let aws = crate::sdk_config().await;
        let ssm = aws_sdk_ssm::Client::new(&aws);
        for (name, value) in secrets {
            ssm.put_parameter()
                .name(&name)
                .value(value)
                .r#type(aws_sdk_ssm::types::ParameterType::SecureString)
                .overwrite(true)
                .send()
                .await
                .map_err(|e| format!("SSM {name}: {e}"))?;
        }
        let mut env = BTreeMap::new();
        env.insert("AWS_ENDPOINT_URL".to_string(), crate::endpoint());
        // The Region the stack's queues, table and parameters were made in (AWS_REGION, else
        // us-east-1), so the functions find them.
        let region = aws
            .region()
            .map_or("us-east-1".to_string(), |r| r.to_string());
        env.insert("AWS_REGION".to_string(), region);
        for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            let v = std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "test".to_string());
            env.insert(k.to_string(), v);
        }
        env.extend(cfg.env);
        let running = Self::run(
            &plan,
            &aws,
            &cfg.bin_dir,
            &cfg.url_addr,
            cfg.instances,
            &env,
            cfg.schedules,
            &cfg.sink,
        )
        .await?;
        Ok(Bridge {
            stack,
            plan,
            running,
            fakes,
            aws,
            env,
            bin_dir: cfg.bin_dir,
            url_addr: cfg.url_addr,
            instances: cfg.instances,
            schedules: cfg.schedules,
            sink: cfg.sink,
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn run(
        plan: &Plan,
        aws: &SdkConfig,
        bin_dir: &std::path::Path,
        url_addr: &str,
        instances: usize,
        env: &BTreeMap<String, String>,
        schedules: bool,
        sink: &LineSink,
    ) -> Result<Running, String> {
        Running::start(
            plan,
            bridge_aws::clients::sqs(aws),
            Options {
                bin_dir: bin_dir.to_path_buf(),
                url_addr: url_addr.to_string(),
                instances,
                env: env.clone(),
                schedules,
                sink: sink.clone(),
            },
        )
        .await
    }

    /// Deploys the functions again with `extra_env` changed (a new `MAPPING_PATH`, say), as a
    /// stack update would: they stop, and new instances start on the same table, queues and
    /// fakes. The function URL may move when it was on an ephemeral port.
    pub async fn redeploy(&mut self, extra_env: &[(&str, &str)]) -> Result<(), String> {
        self.running.stop();
        // Idle pollers see the stop within their one-second receive: none takes a message
        // meant for the new instances.
        tokio::time::sleep(Duration::from_secs(3)).await;
        for (k, v) in extra_env {
            self.env.insert(k.to_string(), v.to_string());
        }
        self.running = Self::run(
            &self.plan,
            &self.aws,
            &self.bin_dir,
            &self.url_addr,
            self.instances,
            &self.env,
            self.schedules,
            &self.sink,
        )
        .await?;
        Ok(())
    }
}
