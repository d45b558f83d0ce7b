//! The reports bucket as the reconcile run's report sink: one object per report file.

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use bridge_core::reconcile::run::{ReportSink, SinkError};

pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Sink {
    /// A sink writing into `bucket`. Emulators serve buckets by path, not by virtual host:
    /// `path_style` for them.
    pub fn new(aws: &aws_config::SdkConfig, bucket: String, path_style: bool) -> S3Sink {
        let mut b = aws_sdk_s3::config::Builder::from(aws).force_path_style(path_style);
        if let Some(url) = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|v| !v.is_empty())
        {
            b = b.endpoint_url(url);
        }
        let client = aws_sdk_s3::Client::from_conf(b.build());
        S3Sink { client, bucket }
    }
}

#[async_trait]
impl ReportSink for S3Sink {
    async fn put(&self, key: &str, body: String, content_type: &str) -> Result<(), SinkError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(ByteStream::from(body.into_bytes()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| {
                SinkError(format!(
                    "{key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(&e)
                ))
            })
    }
}
