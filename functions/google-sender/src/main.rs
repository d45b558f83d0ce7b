//! The Google sender Lambda (SQS-triggered): delivers claimed events to the Google Ads API or
//! the Data Manager API, per account. Clients, credentials and the mapping are loaded once here.

use bridge_aws::config::Settings;
use bridge_aws::lambda::env;
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    bridge_aws::telemetry::init();
    let settings = Settings::from_env()?;
    let aws = bridge_aws::clients::sdk_config().await?;
    let ssm = bridge_aws::clients::ssm(&aws);
    let param =
        env("GOOGLE_CREDENTIALS_PARAMETER").ok_or("GOOGLE_CREDENTIALS_PARAMETER is required")?;
    let credentials =
        GoogleCredentials::from_json(&bridge_aws::clients::parameter(&ssm, &param).await?)?;
    let platform = GooglePlatform::new(
        bridge_platforms::http::client()?,
        settings.platforms.google_config(credentials),
        settings.mapping.clone(),
    )
    .with_waits(settings.platforms.google_waits());
    bridge_aws::lambda::run_sender(platform, &settings, &aws).await
}
