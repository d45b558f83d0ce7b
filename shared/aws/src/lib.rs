//! The AWS side of the bridge: the DynamoDB event store and the SQS delivery queues (the real
//! implementations of the core's ports), SSM parameters, environment settings, and the Lambda
//! glue (SQS records in, batch item failures out; logging set up for Lambda).

pub mod clients;
pub mod config;
pub mod dynamodb;
pub mod lambda;
pub mod s3;
pub mod sqs;
pub mod telemetry;
