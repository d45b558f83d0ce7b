//! The consent model and the gating decision, with the audit record of why it was made.

use crate::delivery::Destination;
use crate::timestamp::Timestamp;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsentStatus {
    Granted,
    Denied,
    #[default]
    Unknown,
}

impl ConsentStatus {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "granted" => Some(Self::Granted),
            "denied" => Some(Self::Denied),
            "unknown" => Some(Self::Unknown),
            _ => None,
        }
    }
}

/// Google's two consent signals (Consent Mode v2).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum GoogleSignal {
    Granted,
    Denied,
}

impl GoogleSignal {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "granted" => Some(Self::Granted),
            "denied" => Some(Self::Denied),
            _ => None,
        }
    }
}

/// Where the consent decision came from, kept for the audit trail.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsentOrigin {
    /// The webhook payload carried it.
    Payload,
    /// Read from the CRM record's consent properties.
    CrmRecord,
    /// Nothing was given: the source's configured default applied.
    #[default]
    SourceDefault,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Consent {
    pub status: ConsentStatus,
    /// The legal basis as the source states it (e.g. `consent`, `legitimate_interest`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basis: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_user_data: Option<GoogleSignal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ad_personalization: Option<GoogleSignal>,
    #[serde(default)]
    pub origin: ConsentOrigin,
}

/// The gate's answer for one destination, stored on the event as the audit record.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ConsentDecision {
    pub allowed: bool,
    pub reason: String,
}

impl Consent {
    /// Only `granted` consent is ever sent anywhere. For Google, an explicit
    /// `ad_user_data: denied` also blocks, because every upload carries user data or a click
    /// id tied to a person.
    pub fn decide(&self, destination: Destination) -> ConsentDecision {
        let origin = match self.origin {
            ConsentOrigin::Payload => "payload",
            ConsentOrigin::CrmRecord => "crm record",
            ConsentOrigin::SourceDefault => "source default",
        };
        let blocked = |reason: String| ConsentDecision {
            allowed: false,
            reason,
        };
        match self.status {
            ConsentStatus::Denied => return blocked(format!("consent denied ({origin})")),
            ConsentStatus::Unknown => return blocked(format!("consent unknown ({origin})")),
            ConsentStatus::Granted => {}
        }
        if destination == Destination::Google && self.ad_user_data == Some(GoogleSignal::Denied) {
            return blocked(format!("ad_user_data denied ({origin})"));
        }
        ConsentDecision {
            allowed: true,
            reason: format!("consent granted ({origin})"),
        }
    }

    /// Google's adUserData signal to send: an explicit value wins, else it follows the status.
    pub fn google_ad_user_data(&self) -> GoogleSignal {
        self.ad_user_data.unwrap_or(match self.status {
            ConsentStatus::Granted => GoogleSignal::Granted,
            _ => GoogleSignal::Denied,
        })
    }

    /// Google's adPersonalization signal to send: an explicit value wins, else it follows the
    /// status.
    pub fn google_ad_personalization(&self) -> GoogleSignal {
        self.ad_personalization.unwrap_or(match self.status {
            ConsentStatus::Granted => GoogleSignal::Granted,
            _ => GoogleSignal::Denied,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent(status: ConsentStatus) -> Consent {
        Consent {
            status,
            origin: ConsentOrigin::Payload,
            ..Default::default()
        }
    }

    #[test]
    fn only_granted_is_sent() {
        for d in [Destination::Meta, Destination::Google] {
            assert!(consent(ConsentStatus::Granted).decide(d).allowed);
            let denied = consent(ConsentStatus::Denied).decide(d);
            assert!(!denied.allowed);
            assert_eq!(denied.reason, "consent denied (payload)");
            assert!(!consent(ConsentStatus::Unknown).decide(d).allowed);
        }
        let default = Consent::default().decide(Destination::Meta);
        assert_eq!(default.reason, "consent unknown (source default)");
    }

    #[test]
    fn google_ad_user_data_denied_blocks_google_only() {
        let c = Consent {
            ad_user_data: Some(GoogleSignal::Denied),
            ..consent(ConsentStatus::Granted)
        };
        assert!(c.decide(Destination::Meta).allowed);
        assert!(!c.decide(Destination::Google).allowed);
        assert_eq!(c.google_ad_personalization(), GoogleSignal::Granted);
    }
}
