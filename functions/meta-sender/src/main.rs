//! The Meta sender Lambda (SQS-triggered): delivers claimed events to the Conversions API.
//! Clients and the mapping are built once here, at init; the access token is read from SSM
//! from here on and waited for by the first send.

use bridge_aws::lambda::{SenderInit, env, required};
use bridge_platforms::meta::{MetaAccess, MetaPlatform};
use lambda_runtime::Error;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let aws = bridge_aws::lambda::start().await?;
    let token_param = required("META_ACCESS_TOKEN_PARAMETER")?;
    let secret_param = env("META_APP_SECRET_PARAMETER");
    // Both secrets in one request, which runs while the rest is built and the first batch is
    // claimed.
    let names = std::iter::once(token_param.clone())
        .chain(secret_param.clone())
        .collect();
    let access = bridge_aws::clients::deferred_parameters(&aws, names, move |values| {
        MetaAccess::from_parameters(values, &token_param, secret_param.as_deref())
    });
    let init = SenderInit::new(&aws)?;
    let cfg = init
        .settings
        .platforms
        .meta_config(required("META_PIXEL_ID")?);
    let platform = MetaPlatform::new(
        bridge_platforms::http::client()?,
        cfg,
        init.settings.mapping.clone(),
        access,
    );
    bridge_aws::lambda::run_sender(platform, init).await
}
