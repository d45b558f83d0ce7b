//! Webhook payloads from CRMs and their authentication: everything between an HTTP body and
//! the canonical event inputs, with no HTTP inside.

pub mod hubspot;
pub mod salesforce;
pub mod signature;

use crate::event::{EventInput, FieldError};

/// One item of a webhook delivery, ready for the ingest pipeline.
#[derive(Debug)]
pub enum Incoming {
    Event(Box<EventInput>),
    /// The item could not be read; the errors name each field.
    Invalid(Vec<FieldError>),
    /// A CRM stage the mapping contract does not map: accepted and recorded, not an error.
    Unmapped {
        stage: String,
    },
    /// A dependency needed to read the item (the CRM API) is down: the caller must retry.
    Unavailable(String),
    /// The CRM API throttled the read: the caller must retry, after this long when known.
    Throttled {
        retry_after_secs: Option<u64>,
    },
    /// Dropped on purpose (a foreign account, a change the CRM's own record does not show),
    /// with the reason; nothing stored, and no retry wanted.
    Ignored(FieldError),
    /// Already stored under this key: answered as a duplicate without completing it.
    Stored {
        event_id: String,
    },
    /// A privacy deletion: every identifier of this CRM record's events (and of events sharing
    /// its email or phone) is to be erased.
    Erase {
        source: String,
        entity_id: String,
    },
}

/// Splits a body that is one JSON object or an array of them into item texts, without
/// parsing the items themselves (each is parsed on its own so one bad item cannot sink the
/// others). `max` bounds the array length.
pub fn split_items(body: &str, max: usize) -> Result<(Vec<&str>, bool), FieldError> {
    let trimmed = body.trim_start();
    if trimmed.starts_with('[') {
        let items: Vec<&serde_json::value::RawValue> = serde_json::from_str(body)
            .map_err(|e| FieldError::new("$", format!("not a valid JSON array: {e}")))?;
        if items.is_empty() {
            return Err(FieldError::new("$", "the array is empty"));
        }
        if items.len() > max {
            return Err(FieldError::new(
                "$",
                format!("{} items; at most {max} per request", items.len()),
            ));
        }
        Ok((items.into_iter().map(|r| r.get()).collect(), true))
    } else if trimmed.starts_with('{') {
        Ok((vec![body], false))
    } else {
        Err(FieldError::new(
            "$",
            "the body must be a JSON object or an array of objects",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_objects_and_arrays() {
        assert_eq!(
            split_items(r#"{"a":1}"#, 5).unwrap(),
            (vec![r#"{"a":1}"#], false)
        );
        let (items, batch) = split_items(r#"[{"a":1}, {"b":[2]}, 3]"#, 5).unwrap();
        assert!(batch);
        assert_eq!(items, [r#"{"a":1}"#, r#"{"b":[2]}"#, "3"]);
        assert!(
            split_items("[1,2,3]", 2)
                .unwrap_err()
                .reason
                .contains("at most 2")
        );
        assert!(split_items("[]", 2).is_err());
        assert!(split_items("nope", 2).is_err());
        assert!(split_items("[{", 2).is_err());
    }
}
