//! The SQS delivery queue against the emulator: batching, visibility, dead-lettering and the
//! template's redrive policy.

use aws_sdk_sqs::Client;
use bridge_aws::sqs::{QueueUrls, SqsQueue};
use bridge_core::delivery::{Destination, ErrorCode, ErrorInfo};
use bridge_core::queue::{DeadLetter, DeliveryMessage, DeliveryQueue};
use bridge_tests::{Stack, sdk_config};
use std::collections::BTreeMap;
use std::time::Duration;

async fn setup(test: &str, params: &[(&str, &str)]) -> (Stack, Client, SqsQueue) {
    let stack = Stack::create(test, params);
    let client = bridge_aws::clients::sqs(&sdk_config().await);
    let urls = BTreeMap::from([
        (
            Destination::Meta,
            QueueUrls {
                queue: stack.var("META_QUEUE_URL"),
                dlq: Some(stack.var("META_DLQ_URL")),
            },
        ),
        (
            Destination::Google,
            QueueUrls {
                queue: stack.var("GOOGLE_QUEUE_URL"),
                dlq: Some(stack.var("GOOGLE_DLQ_URL")),
            },
        ),
    ]);
    let queue = SqsQueue::new(client.clone(), urls);
    (stack, client, queue)
}

/// Everything visible, in successive receives; use only with a visibility that keeps received
/// messages hidden until the loop ends.
async fn receive(client: &Client, url: &str, visibility: i32) -> Vec<aws_sdk_sqs::types::Message> {
    assert!(
        visibility > 0,
        "visibility 0 would receive the same message again"
    );
    let mut all = Vec::new();
    for _ in 0..10 {
        let got = receive_once(client, url, visibility).await;
        if got.is_empty() {
            break;
        }
        all.extend(got);
    }
    all
}

/// One ReceiveMessage call.
async fn receive_once(
    client: &Client,
    url: &str,
    visibility: i32,
) -> Vec<aws_sdk_sqs::types::Message> {
    {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .visibility_timeout(visibility)
            .message_attribute_names("All")
            .message_system_attribute_names(
                aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
            )
            .send()
            .await
            .unwrap();
        out.messages().to_vec()
    }
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn enqueue_routes_by_destination_in_batches() {
    let (stack, client, queue) = setup("enqueue", &[]).await;
    let mut msgs: Vec<_> = (0..25)
        .map(|i| DeliveryMessage::new(format!("e{i}"), Destination::Meta))
        .collect();
    msgs.push(DeliveryMessage::new("g1", Destination::Google));
    assert!(queue.enqueue(&msgs).await.is_empty());
    let meta = receive(&client, &stack.var("META_QUEUE_URL"), 60).await;
    let mut ids: Vec<String> = meta
        .iter()
        .map(|m| DeliveryMessage::from_body(m.body().unwrap()).unwrap().key)
        .collect();
    ids.sort();
    let mut want: Vec<String> = (0..25).map(|i| format!("e{i}")).collect();
    want.sort();
    assert_eq!(ids, want);
    let google = receive(&client, &stack.var("GOOGLE_QUEUE_URL"), 60).await;
    assert_eq!(google.len(), 1);
    assert_eq!(
        DeliveryMessage::from_body(google[0].body().unwrap()).unwrap(),
        DeliveryMessage::new("g1", Destination::Google)
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn enqueue_to_an_unconfigured_destination_reports_failure() {
    let stack = Stack::create("unconfigured", &[]);
    let client = bridge_aws::clients::sqs(&sdk_config().await);
    let urls = BTreeMap::from([(
        Destination::Meta,
        QueueUrls {
            queue: stack.var("META_QUEUE_URL"),
            dlq: None,
        },
    )]);
    let queue = SqsQueue::new(client, urls);
    let failed = queue
        .enqueue(&[DeliveryMessage::new("x", Destination::Google)])
        .await;
    assert_eq!(failed, [DeliveryMessage::new("x", Destination::Google)]);
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn template_redrive_moves_a_message_to_the_dlq_after_max_receive_count() {
    let (stack, client, queue) = setup("redrive", &[("MaxReceiveCount", "2")]).await;
    queue
        .enqueue(&[DeliveryMessage::new("poison", Destination::Meta)])
        .await;
    let url = stack.var("META_QUEUE_URL");
    // Received and never deleted, as when a sender lists it in batchItemFailures each time.
    for n in 1..=2 {
        let got = receive_once(&client, &url, 0).await;
        assert_eq!(got.len(), 1, "receive {n}");
    }
    assert!(
        receive_once(&client, &url, 0).await.is_empty(),
        "the third receive finds it gone"
    );
    let dlq = receive(&client, &stack.var("META_DLQ_URL"), 60).await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(
        DeliveryMessage::from_body(dlq[0].body().unwrap())
            .unwrap()
            .key,
        "poison"
    );
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn change_visibility_hides_a_message_for_the_retry_delay() {
    let (stack, client, queue) = setup("visibility", &[]).await;
    queue
        .enqueue(&[DeliveryMessage::new("later", Destination::Google)])
        .await;
    let url = stack.var("GOOGLE_QUEUE_URL");
    let got = receive_once(&client, &url, 30).await;
    let receipt = got[0].receipt_handle().unwrap().to_string();
    let failed = queue
        .change_visibility(Destination::Google, &[(receipt, Duration::from_secs(2))])
        .await;
    assert!(failed.is_empty());
    assert!(
        receive_once(&client, &url, 30).await.is_empty(),
        "hidden during the delay"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        receive_once(&client, &url, 30).await.len(),
        1,
        "visible again after it"
    );
    let bad = queue
        .change_visibility(
            Destination::Google,
            &[("not-a-receipt".into(), Duration::from_secs(5))],
        )
        .await;
    assert_eq!(bad, ["not-a-receipt"]);
}

#[tokio::test]
#[ignore = "needs the local AWS emulator: bash infra/local/test.sh starts it and runs this"]
async fn dead_letters_carry_the_reason_as_attributes() {
    let (stack, client, queue) = setup("dead_letter", &[]).await;
    let dl = DeadLetter {
        message: DeliveryMessage::new("bad", Destination::Meta),
        reason: ErrorInfo::new(ErrorCode::meta(190, None), "Invalid OAuth access token"),
        attempts: 3,
    };
    assert!(queue.dead_letter(&[dl]).await.is_empty());
    let got = receive(&client, &stack.var("META_DLQ_URL"), 60).await;
    assert_eq!(got.len(), 1);
    let attrs = got[0].message_attributes().unwrap();
    assert_eq!(attrs["error_code"].string_value(), Some("meta_190"));
    assert_eq!(
        attrs["error_message"].string_value(),
        Some("Invalid OAuth access token")
    );
    assert_eq!(attrs["attempts"].string_value(), Some("3"));
    assert_eq!(attrs["destination"].string_value(), Some("meta"));
}
