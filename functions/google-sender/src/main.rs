//! The Google sender Lambda (SQS-triggered): delivers claimed events to the Google Ads API or
//! the Data Manager API, per account. Clients and the mapping are built once here, at init;
//! the credentials are read from SSM from here on and waited for by the first request.

use bridge_aws::lambda::{SenderInit, required};
use bridge_platforms::google::{GoogleCredentials, GooglePlatform};
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let aws = bridge_aws::lambda::start().await?;
    let param = required("GOOGLE_CREDENTIALS_PARAMETER")?;
    let credentials =
        bridge_aws::clients::deferred_parameters(&aws, vec![param.clone()], move |mut values| {
            GoogleCredentials::from_parameter(&param, values.remove(&param))
        });
    let init = SenderInit::new(&aws)?;
    let platform = GooglePlatform::new(
        bridge_platforms::http::client()?,
        init.settings.platforms.google_config(credentials),
        init.settings.mapping.clone(),
    )
    .with_waits(init.settings.platforms.google_waits());
    bridge_aws::lambda::run_sender(platform, init).await
}
