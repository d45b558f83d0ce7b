//! The Meta sender Lambda (SQS-triggered): delivers claimed events to the Conversions API.
//! Clients, the access token and the mapping are loaded once here, at init.

use bridge_aws::lambda::{env, required};
use bridge_platforms::meta::MetaPlatform;
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let (settings, aws, ssm) = bridge_aws::lambda::sender_init().await?;
    let token_param = required("META_ACCESS_TOKEN_PARAMETER")?;
    let secret_param = env("META_APP_SECRET_PARAMETER");
    // Both secrets in one request: each SSM round trip is paid by every cold start.
    let names: Vec<&str> = std::iter::once(token_param.as_str())
        .chain(secret_param.as_deref())
        .collect();
    let mut values = bridge_aws::clients::parameters(&ssm, &names).await?;
    let access_token = values
        .remove(&token_param)
        .ok_or("META_ACCESS_TOKEN_PARAMETER has no value")?;
    let app_secret = secret_param.and_then(|p| values.remove(&p));
    let cfg = settings
        .platforms
        .meta_config(required("META_PIXEL_ID")?, access_token, app_secret);
    let platform = MetaPlatform::new(
        bridge_platforms::http::client()?,
        cfg,
        settings.mapping.clone(),
    );
    bridge_aws::lambda::run_sender(platform, &settings, &aws).await
}
