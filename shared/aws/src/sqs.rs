//! SQS delivery queues: batched sends, visibility changes and dead-lettering.

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, MessageAttributeValue, SendMessageBatchRequestEntry,
};
use bridge_core::delivery::Destination;
use bridge_core::queue::{DeadLetter, DeliveryMessage, DeliveryQueue, QueueError, SQS_BATCH};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct QueueUrls {
    pub queue: String,
    pub dlq: Option<String>,
}

pub struct SqsQueue {
    client: Client,
    urls: BTreeMap<Destination, QueueUrls>,
}

fn attr(v: impl Into<String>) -> Option<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .ok()
}

fn cut(s: &str, max: usize) -> String {
    s.char_indices()
        .take_while(|(i, _)| *i < max)
        .map(|(_, c)| c)
        .collect()
}

impl SqsQueue {
    pub fn new(client: Client, urls: BTreeMap<Destination, QueueUrls>) -> Self {
        SqsQueue { client, urls }
    }

    /// A destination's dead-letter queue: its depth, and its oldest message's age from a peek
    /// at up to ten messages (a zero visibility timeout hides nothing; a DLQ has no redrive
    /// policy, so the receive count it adds does not matter). `None` without a DLQ.
    pub async fn dead_letter_figures(
        &self,
        d: Destination,
        now: bridge_core::timestamp::Timestamp,
    ) -> Option<bridge_core::reconcile::QueueFigures> {
        let url = self.urls.get(&d)?.dlq.clone()?;
        let attrs = self
            .client
            .get_queue_attributes()
            .queue_url(&url)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            .send()
            .await
            .ok()?;
        let depth = attrs
            .attributes()
            .and_then(|a| {
                a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut oldest = None;
        if depth > 0
            && let Ok(peek) = self
                .client
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(10)
                .visibility_timeout(0)
                .message_system_attribute_names(
                    aws_sdk_sqs::types::MessageSystemAttributeName::SentTimestamp,
                )
                .send()
                .await
        {
            oldest = peek
                .messages()
                .iter()
                .filter_map(|m| {
                    m.attributes()?
                        .get(&aws_sdk_sqs::types::MessageSystemAttributeName::SentTimestamp)?
                        .parse::<i64>()
                        .ok()
                })
                .min()
                .map(|sent| (now.unix_ms() - sent) / 1000);
        }
        Some(bridge_core::reconcile::QueueFigures {
            depth,
            oldest_age_secs: oldest,
        })
    }

    fn queue_url(&self, d: Destination) -> Result<&str, QueueError> {
        self.urls
            .get(&d)
            .map(|u| u.queue.as_str())
            .ok_or(QueueError::NotConfigured(d))
    }

    /// Sends `entries` (id, message, entry) to `url` in batches of 10; returns the failed ones.
    async fn send_batches(
        &self,
        url: &str,
        entries: Vec<(DeliveryMessage, SendMessageBatchRequestEntry)>,
    ) -> Vec<DeliveryMessage> {
        let mut failed = Vec::new();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let chunk: Vec<_> = entries.by_ref().take(SQS_BATCH).collect();
            let reqs: Vec<_> = chunk.iter().map(|(_, e)| e.clone()).collect();
            match self
                .client
                .send_message_batch()
                .queue_url(url)
                .set_entries(Some(reqs))
                .send()
                .await
            {
                Ok(out) => {
                    for f in out.failed() {
                        if let Some((m, _)) = f
                            .id()
                            .parse::<usize>()
                            .ok()
                            .and_then(|i| chunk.iter().find(|(_, e)| e.id() == i.to_string()))
                        {
                            tracing::warn!(key = %m.key, destination = %m.destination, code = f.code(), "sqs batch entry failed");
                            failed.push(m.clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), count = chunk.len(), "sqs batch send failed");
                    failed.extend(chunk.into_iter().map(|(m, _)| m));
                }
            }
        }
        failed
    }
}

#[async_trait]
impl DeliveryQueue for SqsQueue {
    async fn enqueue(&self, messages: &[DeliveryMessage]) -> Vec<DeliveryMessage> {
        let mut failed = Vec::new();
        let mut by_dest: BTreeMap<Destination, Vec<&DeliveryMessage>> = BTreeMap::new();
        for m in messages {
            by_dest.entry(m.destination).or_default().push(m);
        }
        for (d, msgs) in by_dest {
            let url = match self.queue_url(d) {
                Ok(u) => u.to_string(),
                Err(e) => {
                    tracing::error!(destination = %d, error = %e, "cannot enqueue");
                    failed.extend(msgs.into_iter().cloned());
                    continue;
                }
            };
            let entries = msgs
                .into_iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let e = SendMessageBatchRequestEntry::builder()
                        .id((i % SQS_BATCH).to_string())
                        .message_body(m.to_body())
                        .build()
                        .ok()?;
                    Some((m.clone(), e))
                })
                .collect();
            failed.extend(self.send_batches(&url, entries).await);
        }
        failed
    }

    async fn change_visibility(
        &self,
        destination: Destination,
        changes: &[(String, Duration)],
    ) -> Vec<String> {
        let Ok(url) = self.queue_url(destination) else {
            return changes.iter().map(|(r, _)| r.clone()).collect();
        };
        let mut failed = Vec::new();
        for chunk in changes.chunks(SQS_BATCH) {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .filter_map(|(i, (receipt, d))| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(receipt)
                        .visibility_timeout(d.as_secs().min(43_200) as i32)
                        .build()
                        .ok()
                })
                .collect();
            match self
                .client
                .change_message_visibility_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                Ok(out) => {
                    for f in out.failed() {
                        if let Some((r, _)) =
                            f.id().parse::<usize>().ok().and_then(|i| chunk.get(i))
                        {
                            failed.push(r.clone());
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %aws_sdk_sqs::error::DisplayErrorContext(&e), "sqs visibility change failed");
                    failed.extend(chunk.iter().map(|(r, _)| r.clone()));
                }
            }
        }
        failed
    }

    async fn dead_letter(&self, items: &[DeadLetter]) -> Vec<DeliveryMessage> {
        let mut failed = Vec::new();
        let mut by_dest: BTreeMap<Destination, Vec<&DeadLetter>> = BTreeMap::new();
        for it in items {
            by_dest.entry(it.message.destination).or_default().push(it);
        }
        for (d, dls) in by_dest {
            let Some(url) = self.urls.get(&d).and_then(|u| u.dlq.clone()) else {
                tracing::error!(destination = %d, "no dead-letter queue configured");
                failed.extend(dls.into_iter().map(|x| x.message.clone()));
                continue;
            };
            let entries = dls
                .into_iter()
                .enumerate()
                .filter_map(|(i, dl)| {
                    let e = SendMessageBatchRequestEntry::builder()
                        .id((i % SQS_BATCH).to_string())
                        .message_body(dl.dlq_message().to_body())
                        .set_message_attributes(Some(
                            [
                                ("error_code", attr(cut(dl.reason.code.as_str(), 256))),
                                ("error_message", attr(cut(&dl.reason.message, 1024))),
                                ("attempts", attr(dl.attempts.to_string())),
                                ("destination", attr(d.as_str())),
                            ]
                            .into_iter()
                            .filter_map(|(k, v)| Some((k.to_string(), v?)))
                            .collect(),
                        ))
                        .build()
                        .ok()?;
                    Some((dl.message.clone(), e))
                })
                .collect();
            failed.extend(self.send_batches(&url, entries).await);
        }
        failed
    }
}
/// The reconcile run's port for the dead-letter queues' figures.
#[async_trait]
impl bridge_core::reconcile::run::DeadLetterQueues for SqsQueue {
    async fn figures(
        &self,
        d: Destination,
        now: bridge_core::timestamp::Timestamp,
    ) -> Option<bridge_core::reconcile::QueueFigures> {
        self.dead_letter_figures(d, now).await
    }
}
