//! Why an attempt did not deliver, as one type: the bridge's own reasons are named once here
//! (with what each means), and a platform's code is kept in the platform's own words. Stored,
//! logged and put on DLQ messages as its text, so the delivery log of an older release reads
//! back unchanged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The longest code kept: a platform's code is its answer, and an answer is not trusted to be
/// short.
pub const MAX_CODE_CHARS: usize = 128;

/// Declares the bridge's own codes once: the variant, its text, and what it means.
macro_rules! bridge_codes {
    ($($(#[$doc:meta])+ $variant:ident = $text:literal,)+) => {
        /// Why an attempt did not deliver. The bridge's own reasons are variants; what a
        /// platform answered is [`ErrorCode::Platform`], built by [`ErrorCode::platform`],
        /// [`ErrorCode::meta`], [`ErrorCode::http`] or [`ErrorCode::oauth`].
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum ErrorCode {
            $($(#[$doc])+ $variant,)+
            /// What the platform answered, in its words: Meta's `meta_<code>[_<subcode>]`, a
            /// Google error enum value (`CLICK_NOT_FOUND`), `http_<status>` when the answer
            /// carried no code, `oauth_<error>` from Google's token endpoint.
            Platform(String),
        }

        impl ErrorCode {
            /// Every code the bridge itself gives, as text (for documentation and tests).
            pub const BRIDGE: &'static [&'static str] = &[$($text,)+];

            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)+
                    Self::Platform(s) => s,
                }
            }

            /// Reads a code: one of the bridge's own, else the platform's (bounded to
            /// [`MAX_CODE_CHARS`]), so the same text is always the same code.
            pub fn parse(text: &str) -> ErrorCode {
                match text {
                    $($text => Self::$variant,)+
                    other => Self::Platform(other.chars().take(MAX_CODE_CHARS).collect()),
                }
            }
        }
    };
}

bridge_codes! {
    // The pipeline's own decisions.
    /// The store could not be read or written; nothing was sent.
    StoreUnavailable = "store_unavailable",
    /// The attempt budget is spent; the pair goes to the DLQ.
    AttemptsExhausted = "attempts_exhausted",
    /// The platform's answer had no outcome for this row.
    NoOutcome = "no_outcome",
    /// The event can never be valid for the platform (isolated from a request that failed
    /// because of it).
    Invalid = "invalid",
    /// The platform refused the whole request without naming a row.
    RequestRejected = "request_rejected",
    /// The invocation's request or time limit was reached before this row was sent; it waits
    /// for the next invocation.
    IsolationLimit = "isolation_limit",
    /// Another row of the same order is already in this request (Google refuses the order
    /// repeated in one request), so this one waits for the next.
    OrderInRequest = "order_in_request",
    /// The invocation ran out of time before this row's turn.
    OutOfTime = "out_of_time",
    /// The order is already counted at this destination by another won.
    DuplicateOrder = "duplicate_order",
    /// The order's hold moved to another won while this one was in flight.
    OrderHoldMoved = "order_hold_moved",
    /// A correction of this order is still being applied.
    CorrectionInProgress = "correction_in_progress",
    /// An earlier step of a correction ended undelivered, so the next step is not sent.
    CorrectionStepFailed = "correction_step_failed",
    /// An earlier step of a correction is not delivered yet.
    CorrectionStepPending = "correction_step_pending",
    /// A refund or adjustment whose won was never sent to this destination.
    OriginalNotSent = "original_not_sent",
    /// A refund or adjustment whose won is not delivered (yet, or ever).
    OriginalNotDelivered = "original_not_delivered",
    /// Data Manager has not confirmed the won's request yet.
    OriginalProcessing = "original_processing",
    /// Data Manager has not confirmed the won's request.
    OriginalUnconfirmed = "original_unconfirmed",

    // Building a platform's row from the event and the mapping.
    /// The mapping does not send this event to the platform.
    NotMapped = "not_mapped",
    /// The event's time is in the future.
    EventInFuture = "event_in_future",
    /// The event is older than the platform accepts.
    EventTooOld = "event_too_old",
    /// A conversion older than Google accepts for its action.
    ConversionTooOld = "conversion_too_old",
    /// A website event without the fields Meta requires for it.
    WebsiteFieldsMissing = "website_fields_missing",
    /// No identifier Meta can match on.
    NoCustomerInformation = "no_customer_information",
    /// A Purchase without value and currency.
    PurchaseWithoutValue = "purchase_without_value",
    /// No click id for an action that needs one.
    NoClickId = "no_click_id",
    /// No identifier Google can match on.
    NoIdentifier = "no_identifier",
    /// A revenue event without its value.
    MissingValue = "missing_value",
    /// An adjustment in another currency than its won.
    CurrencyMismatch = "currency_mismatch",
    /// A correction retracted the won's conversion and its upload under the new action was
    /// not delivered: nothing at Google is left to adjust.
    ConversionRetracted = "conversion_retracted",
    /// The mapping names something that is not a conversion action.
    InvalidAction = "invalid_action",
    /// Google would refuse the upload as it stands (held back instead of sent).
    UploadWouldFail = "upload_would_fail",
    /// The conversion went through an API that cannot retract it (Data Manager, unless the
    /// policy is to retract through the Ads API).
    RetractionUnsupported = "retraction_unsupported",
    /// A correction's restatement would go to another action than the one planned.
    CorrectionNotUploaded = "correction_not_uploaded",
    /// The mapping now sends the won to another action than the correction planned.
    MappingChanged = "mapping_changed",

    // Talking to a platform.
    /// The platform's credentials could not be read (from SSM, at the first send after a
    /// cold start); nothing was sent.
    CredentialsUnavailable = "credentials_unavailable",
    /// No answer within the request timeout.
    Timeout = "timeout",
    /// The request did not reach the platform, or its connection broke.
    Network = "network",
    /// The answer's body could not be read.
    ResponseRead = "response_read",
    /// Google answered a failed row without an error that could be placed on it.
    NoResult = "no_result",
    /// A request status Data Manager answered could not be read.
    UnreadableStatus = "unreadable_status",
    /// Google's token endpoint could not be reached or answered an error status.
    OauthUnavailable = "oauth_unavailable",
    /// Meta said it received a different number of events than were sent.
    EventsReceivedMismatch = "events_received_mismatch",

    // Backfill.
    /// A backfill's dry run could not prepare the row for the platform.
    NotValidated = "not_validated",
}

impl ErrorCode {
    /// A platform's code as it answered, bounded to [`MAX_CODE_CHARS`] (text that is one of
    /// the bridge's own names reads as that code).
    pub fn platform(text: &str) -> ErrorCode {
        ErrorCode::parse(text)
    }

    /// Meta's error `code` and `error_subcode`.
    pub fn meta(code: i64, subcode: Option<i64>) -> ErrorCode {
        match subcode {
            Some(s) => ErrorCode::platform(&format!("meta_{code}_{s}")),
            None => ErrorCode::platform(&format!("meta_{code}")),
        }
    }

    /// An HTTP status from an answer that carried no code of its own.
    pub fn http(status: u16) -> ErrorCode {
        ErrorCode::platform(&format!("http_{status}"))
    }

    /// An OAuth 2.0 `error` (RFC 6749 §5.2) from a token endpoint.
    pub fn oauth(error: &str) -> ErrorCode {
        ErrorCode::platform(&format!("oauth_{error}"))
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for ErrorCode {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(ErrorCode::parse(&text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bridge_code_reads_back_as_itself() {
        let mut seen = std::collections::BTreeSet::new();
        for text in ErrorCode::BRIDGE {
            assert!(seen.insert(*text), "{text} is declared twice");
            let code = ErrorCode::parse(text);
            assert!(!matches!(code, ErrorCode::Platform(_)), "{text}");
            assert_eq!(code.as_str(), *text);
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }

    #[test]
    fn platform_codes_keep_the_platforms_words() {
        assert_eq!(ErrorCode::meta(100, Some(2804003)), "meta_100_2804003");
        assert_eq!(ErrorCode::meta(190, None), "meta_190");
        assert_eq!(ErrorCode::http(503), "http_503");
        assert_eq!(ErrorCode::oauth("invalid_grant"), "oauth_invalid_grant");
        let google: ErrorCode = serde_json::from_str("\"CLICK_NOT_FOUND\"").unwrap();
        assert_eq!(google, ErrorCode::platform("CLICK_NOT_FOUND"));
        assert_eq!(
            ErrorCode::platform(&"X".repeat(1000)).as_str().len(),
            MAX_CODE_CHARS
        );
        // The same text is the same code, however it was built.
        assert_eq!(ErrorCode::platform("timeout"), ErrorCode::Timeout);
        assert_eq!(ErrorCode::oauth("unavailable"), ErrorCode::OauthUnavailable);
    }
}
