//! The Google sender Lambda (SQS-triggered): delivers claimed events to the Google Ads API or
//! the Data Manager API, per account. Clients, credentials and the mapping are loaded once here.

use bridge_aws::lambda::required;
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (settings, aws, ssm) = bridge_aws::lambda::sender_init().await?;
    let param = required("GOOGLE_CREDENTIALS_PARAMETER")?;
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
