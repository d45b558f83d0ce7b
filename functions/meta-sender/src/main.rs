//! The Meta sender Lambda (SQS-triggered): delivers claimed events to the Conversions API.
//! Clients, the access token and the mapping are loaded once here, at init.

use lambda_runtime::Error;
use shared::config::Settings;
use shared::destinations::meta::{MetaConfig, MetaPlatform};
use shared::lambda::{env, env_secs};

#[tokio::main]
async fn main() -> Result<(), Error> {
    shared::telemetry::init();
    let settings = Settings::from_env()?;
    let aws = shared::aws::sdk_config().await;
    let ssm = shared::aws::ssm(&aws);
    let token_param =
        env("META_ACCESS_TOKEN_PARAMETER").ok_or("META_ACCESS_TOKEN_PARAMETER is required")?;
    let access_token = shared::aws::parameter(&ssm, &token_param).await?;
    let app_secret = match env("META_APP_SECRET_PARAMETER") {
        Some(p) => Some(shared::aws::parameter(&ssm, &p).await?),
        None => None,
    };
    let cfg = MetaConfig {
        base_url: settings.endpoints.meta_graph_base_url.clone(),
        api_version: settings.endpoints.meta_api_version.clone(),
        pixel_id: env("META_PIXEL_ID").ok_or("META_PIXEL_ID is required")?,
        access_token,
        app_secret,
        test_event_code: env("META_TEST_EVENT_CODE"),
        timeout: env_secs("META_TIMEOUT_SECS", 20),
    };
    let platform = MetaPlatform::new(reqwest::Client::new(), cfg, settings.mapping.clone());
    shared::lambda::run_sender(platform, &settings, &aws).await
}
