//! The Google sender Lambda (SQS-triggered): delivers claimed events to the Google Ads API or
//! the Data Manager API, per account. Clients, credentials and the mapping are loaded once here.

use bridge_aws::config::Settings;
use bridge_aws::lambda::{env, env_secs};
use bridge_platforms::google::{
    GoogleConfig, GoogleCredentials, GooglePlatform, TOO_RECENT_WAIT, Waits,
};
use lambda_runtime::Error;
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Error> {
    bridge_aws::telemetry::init();
    let settings = Settings::from_env()?;
    let aws = bridge_aws::clients::sdk_config().await;
    let ssm = bridge_aws::clients::ssm(&aws);
    let param =
        env("GOOGLE_CREDENTIALS_PARAMETER").ok_or("GOOGLE_CREDENTIALS_PARAMETER is required")?;
    let credentials =
        GoogleCredentials::from_json(&bridge_aws::clients::parameter(&ssm, &param).await?)?;
    let e = &settings.endpoints;
    let cfg = GoogleConfig {
        ads_base_url: e.google_ads_base_url.clone(),
        ads_api_version: e.google_ads_api_version.clone(),
        datamanager_base_url: e.google_datamanager_base_url.clone(),
        token_url: e.google_oauth_token_url.clone(),
        credentials,
        validate_only: env("GOOGLE_VALIDATE_ONLY").is_some_and(|v| v == "true"),
        timeout: env_secs("GOOGLE_TIMEOUT_SECS", 30),
        terms_ttl: env_secs("GOOGLE_TERMS_TTL_SECS", 3600),
    };
    // Google asks for six hours after TOO_RECENT_*; an emulator run compresses that.
    let too_recent = match env("GOOGLE_TOO_RECENT_WAIT_SECS") {
        None => TOO_RECENT_WAIT,
        Some(v) => v
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| (1..=21_600).contains(s))
            .map(Duration::from_secs)
            .ok_or(
                "GOOGLE_TOO_RECENT_WAIT_SECS must be a whole number of seconds from 1 to 21600",
            )?,
    };
    let platform = GooglePlatform::new(
        bridge_platforms::http::client()?,
        cfg,
        settings.mapping.clone(),
    )
    .with_waits(Waits {
        too_recent,
        ..Waits::default()
    });
    bridge_aws::lambda::run_sender(platform, &settings, &aws).await
}
