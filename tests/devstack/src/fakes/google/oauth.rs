//! The fake Google OAuth token endpoint (refresh-token grant) and the bearer-token check both
//! Google APIs share: a token carries the scopes its refresh token was granted and expires on
//! the fake's clock.

use super::FakeGoogle;
use super::shared::{lock, rpc_error};
use crate::fakes::Reply;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bridge_core::timestamp::Timestamp;
use serde::Deserialize;
use serde_json::json;

// source: research google-ads.md Q4 (conversion_upload_service.proto oauth_scopes)
pub const ADWORDS_SCOPE: &str = "https://www.googleapis.com/auth/adwords";
// source: research google-ads.md Q4 (datamanager/v1/ingestion_service.proto oauth_scopes)
pub const DATAMANAGER_SCOPE: &str = "https://www.googleapis.com/auth/datamanager";

/// An access token the fake issued.
#[derive(Clone, Debug)]
pub struct Token {
    pub scopes: Vec<String>,
    pub expires_at: Timestamp,
    /// Invalidated before its time (`expire_tokens`).
    pub revoked: bool,
}

#[derive(Deserialize)]
pub(super) struct TokenForm {
    grant_type: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    refresh_token: Option<String>,
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Reply {
    // source: RFC 6749 §5.2 (error, error_description)
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
}

pub(super) async fn token(State(s): State<FakeGoogle>, body: Bytes) -> Reply {
    // source: RFC 6749 §4.1.3/§6 (form-encoded body), §5.2 (invalid_request)
    let Ok(f) = serde_urlencoded::from_bytes::<TokenForm>(&body) else {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The request body is not a form.",
        );
    };
    // source: RFC 6749 §5.2 (unsupported_grant_type); google-ads-api.md (refresh_token grant)
    if f.grant_type.as_deref() != Some("refresh_token") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "Invalid grant_type",
        );
    }
    // source: RFC 6749 §5.2 (invalid_client, 401)
    if f.client_id.as_deref() != Some(&s.client_id)
        || f.client_secret.as_deref() != Some(&s.client_secret)
    {
        return oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "The OAuth client was not found.",
        );
    }
    // source: RFC 6749 §5.2 (invalid_grant)
    if f.refresh_token.as_deref() != Some(&s.refresh_token) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "Token has been expired or revoked.",
        );
    }
    let mut d = lock(&s.data);
    d.token_grants += 1;
    let t = format!("ya29.fake-{}", d.token_grants);
    let lifetime = if d.token_lifetime_secs == 0 {
        3599
    } else {
        d.token_lifetime_secs
    };
    let scopes = d.refresh_token_scopes.clone();
    let expires_at = d.controls.clock.now().plus_secs(lifetime as i64);
    d.tokens.insert(
        t.clone(),
        Token {
            scopes: scopes.clone(),
            expires_at,
            revoked: false,
        },
    );
    // The scope answered is what the refresh token was granted (RFC 6749 §5.1 `scope`).
    (
        StatusCode::OK,
        Json(
            json!({"access_token": t, "expires_in": lifetime, "token_type": "Bearer", "scope": scopes.join(" ")}),
        ),
    )
}

/// The bearer token check both APIs share: a live token the fake issued, with `scope`.
pub(super) fn authorized(s: &FakeGoogle, headers: &HeaderMap, scope: &str) -> Result<(), Reply> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let mut d = lock(&s.data);
    let now = d.controls.clock.now();
    let token = bearer.and_then(|t| d.tokens.get(t)).cloned();
    match token {
        Some(t) if !t.revoked && now < t.expires_at => {
            if t.scopes.iter().any(|x| x == scope) {
                return Ok(());
            }
            d.scope_denied += 1;
            // Google's answer to a token without the method's scope; the ErrorInfo reason
            // ACCESS_TOKEN_SCOPE_INSUFFICIENT is UNCONFIRMED (fakes-audit §2).
            Err(rpc_error(
                StatusCode::FORBIDDEN,
                "PERMISSION_DENIED",
                "Request had insufficient authentication scopes.",
                vec![json!({"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "ACCESS_TOKEN_SCOPE_INSUFFICIENT", "domain": "googleapis.com",
                    "metadata": {"method": scope}})],
            ))
        }
        _ => {
            d.unauthenticated += 1;
            // source: google-ads-api.md ("refresh once on a 401 UNAUTHENTICATED")
            Err(rpc_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "Request had invalid authentication credentials. Expected OAuth 2 access token.",
                vec![],
            ))
        }
    }
}
