//! Webhook authentication: the bridge's own `X-Bridge-Signature` and HubSpot's v3 signature.

use base64::Engine;
use hmac::{KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = hmac::Hmac<Sha256>;

/// How far a signature's timestamp may be from now: replayed or badly delayed requests fail.
pub const MAX_SKEW_SECS: i64 = 300;

/// Most `v1=` values one header may carry: enough to rotate a secret, too few to make an
/// unauthenticated caller's header expensive to check.
pub const MAX_SIGNATURES: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing {0} header")]
    Missing(&'static str),
    #[error("malformed {0} header")]
    Malformed(&'static str),
    #[error("signature timestamp is more than 5 minutes from now")]
    Stale,
    #[error("signature does not match")]
    Mismatch,
    #[error("no signing secret is configured for source {0}")]
    NoSecret(String),
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail; an empty key is refused earlier.
    <HmacSha256 as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
}

/// Signs a body the way callers must: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn bridge_sign(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut m = mac(secret);
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    format!(
        "t={t},v1={}",
        crate::hashing::hex(&m.finalize().into_bytes())
    )
}

/// Whether `t` is within [`MAX_SKEW_SECS`] of now, with no arithmetic a caller's value can
/// overflow.
fn fresh(now_secs: i64, t: i64) -> bool {
    now_secs
        .checked_sub(t)
        .and_then(i64::checked_abs)
        .is_some_and(|d| d <= MAX_SKEW_SECS)
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Verifies `X-Bridge-Signature` over the raw body: the MAC is computed once, then compared
/// in constant time with each of at most [`MAX_SIGNATURES`] `v1=` values.
pub fn verify_bridge(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
    now_secs: i64,
) -> Result<(), SignatureError> {
    const H: &str = "X-Bridge-Signature";
    let header = header.ok_or(SignatureError::Missing(H))?;
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => {
                if sigs.len() == MAX_SIGNATURES {
                    return Err(SignatureError::Malformed(H));
                }
                sigs.push(crate::hashing::unhex(v).ok_or(SignatureError::Malformed(H))?)
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed(H))?;
    if sigs.is_empty() {
        return Err(SignatureError::Malformed(H));
    }
    if !fresh(now_secs, t) {
        return Err(SignatureError::Stale);
    }
    let mut m = mac(secret);
    m.update(t.to_string().as_bytes());
    m.update(b".");
    m.update(body);
    let tag = m.finalize().into_bytes();
    // Several v1 values are allowed so a secret can be rotated without downtime.
    if sigs.iter().any(|sig| constant_time_eq(sig, &tag)) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

/// HubSpot's v3 `requestUri`: the URL as called, with only these encodings decoded (and the
/// `?` that opens the query left as it is); everything else (`%20`, `%26`, `%3D`...) stays
/// encoded. source: HS-VAL (developers.hubspot.com/docs/api/webhooks/validating-requests)
pub fn hubspot_uri(uri: &str) -> String {
    const TABLE: [(&str, char); 12] = [
        ("3A", ':'),
        ("2F", '/'),
        ("3F", '?'),
        ("40", '@'),
        ("21", '!'),
        ("24", '$'),
        ("27", '\''),
        ("28", '('),
        ("29", ')'),
        ("2A", '*'),
        ("2C", ','),
        ("3B", ';'),
    ];
    let mut out = String::with_capacity(uri.len());
    let mut rest = uri;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3).map(str::to_ascii_uppercase);
        match code.and_then(|c| TABLE.iter().find(|(k, _)| *k == c)) {
            Some((_, ch)) => {
                out.push(*ch);
                rest = &rest[at + 3..];
            }
            None => {
                out.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// HubSpot's v3 signature: base64 HMAC-SHA256 of method + full URI + body + timestamp (ms).
pub fn hubspot_sign(
    secret: &[u8],
    method: &str,
    uri: &str,
    body: &[u8],
    timestamp_ms: &str,
) -> String {
    let mut m = mac(secret);
    m.update(method.as_bytes());
    m.update(uri.as_bytes());
    m.update(body);
    m.update(timestamp_ms.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
}

/// Verifies `X-HubSpot-Signature-v3` with `X-HubSpot-Request-Timestamp` (milliseconds).
pub fn verify_hubspot(
    secret: &[u8],
    method: &str,
    uri: &str,
    body: &[u8],
    signature: Option<&str>,
    timestamp_ms: Option<&str>,
    now_secs: i64,
) -> Result<(), SignatureError> {
    let sig = signature.ok_or(SignatureError::Missing("X-HubSpot-Signature-v3"))?;
    let ts = timestamp_ms.ok_or(SignatureError::Missing("X-HubSpot-Request-Timestamp"))?;
    let ms: i64 = ts
        .trim()
        .parse()
        .map_err(|_| SignatureError::Malformed("X-HubSpot-Request-Timestamp"))?;
    if !fresh(now_secs, ms / 1000) {
        return Err(SignatureError::Stale);
    }
    let expected = base64::engine::general_purpose::STANDARD
        .decode(sig.trim())
        .map_err(|_| SignatureError::Malformed("X-HubSpot-Signature-v3"))?;
    let uri = hubspot_uri(uri);
    let mut m = mac(secret);
    m.update(method.as_bytes());
    m.update(uri.as_bytes());
    m.update(body);
    m.update(ts.trim().as_bytes());
    m.verify_slice(&expected)
        .map_err(|_| SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn bridge_signature_valid_wrong_stale() {
        let body = br#"{"event_name":"lead"}"#;
        let h = bridge_sign(b"s3cret", NOW, body);
        assert_eq!(verify_bridge(b"s3cret", Some(&h), body, NOW + 10), Ok(()));
        assert_eq!(
            verify_bridge(b"other", Some(&h), body, NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_bridge(b"s3cret", Some(&h), b"{}", NOW),
            Err(SignatureError::Mismatch),
            "body tampered"
        );
        assert_eq!(
            verify_bridge(b"s3cret", Some(&h), body, NOW + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_bridge(b"s3cret", Some(&h), body, NOW - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_bridge(b"s3cret", None, body, NOW),
            Err(SignatureError::Missing("X-Bridge-Signature"))
        );
        assert_eq!(
            verify_bridge(b"s3cret", Some("t=abc,v1=zz"), body, NOW),
            Err(SignatureError::Malformed("X-Bridge-Signature"))
        );
    }

    #[test]
    fn bridge_signature_matches_an_independent_hmac() {
        // Computed with: printf '%s' '1800000000.{}' | openssl dgst -sha256 -hmac key
        let h = bridge_sign(b"key", NOW, b"{}");
        assert_eq!(
            h,
            "t=1800000000,v1=7321475872b03ff21bdc2dfd86ea2d99ec29c479fbe4a77aa6acf4509505493f"
        );
    }

    #[test]
    fn rotation_accepts_either_signature() {
        let body = b"x";
        let new = bridge_sign(b"new", NOW, body);
        let old = bridge_sign(b"old", NOW, body);
        let both = format!("{new},v1={}", old.split("v1=").nth(1).unwrap());
        assert_eq!(verify_bridge(b"old", Some(&both), body, NOW), Ok(()));
    }

    #[test]
    fn hubspot_v3() {
        let uri = "https://hooks.example.com/webhooks/hubspot?x=1";
        let ts = (NOW * 1000).to_string();
        let sig = hubspot_sign(b"app-secret", "POST", uri, b"[]", &ts);
        // The signed request, received at `now` on `at_uri`.
        let received = |at_uri: &str, now: i64| {
            verify_hubspot(
                b"app-secret",
                "POST",
                at_uri,
                b"[]",
                Some(&sig),
                Some(&ts),
                now,
            )
        };
        assert_eq!(received(uri, NOW + 5), Ok(()));
        assert_eq!(
            received("https://other/webhooks/hubspot", NOW),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(received(uri, NOW + 400), Err(SignatureError::Stale));
        let missing = verify_hubspot(b"app-secret", "POST", uri, b"[]", None, Some(&ts), NOW);
        assert_eq!(
            missing,
            Err(SignatureError::Missing("X-HubSpot-Signature-v3"))
        );
    }

    #[test]
    fn the_header_is_bounded_and_the_window_cannot_overflow() {
        let body = b"{}";
        let good = bridge_sign(b"k", NOW, body);
        let v1 = good.split_once(",v1=").unwrap().1;
        let many = format!("t={NOW},v1=00,v1=00,v1=00,v1=00,v1={v1}");
        assert_eq!(
            verify_bridge(b"k", Some(&many), body, NOW),
            Err(SignatureError::Malformed("X-Bridge-Signature")),
            "at most four values"
        );
        let rotated = format!("t={NOW},v1=00,v1={v1}");
        assert_eq!(verify_bridge(b"k", Some(&rotated), body, NOW), Ok(()));
        let ancient = format!("t={},v1={v1}", i64::MIN);
        assert_eq!(
            verify_bridge(b"k", Some(&ancient), body, NOW),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify_hubspot(
                b"k",
                "POST",
                "https://x/",
                body,
                Some("AAAA"),
                Some("-9223372036854775808"),
                NOW
            ),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn hubspot_decodes_only_its_table() {
        assert_eq!(
            hubspot_uri("https://bridge.example/webhooks/hubspot?a=b%3Ac%2Fd%20e%26f%3Dg%3f"),
            "https://bridge.example/webhooks/hubspot?a=b:c/d%20e%26f%3Dg?"
        );
        // Signed over the decoded form, verified from the encoded one the server sees.
        let uri_called = "https://bridge.example/webhooks/hubspot?portal=1%3A2&x=%40y";
        let decoded = "https://bridge.example/webhooks/hubspot?portal=1:2&x=@y";
        let ts = (NOW * 1000).to_string();
        let sig = hubspot_sign(b"app", "POST", decoded, b"[]", &ts);
        assert_eq!(
            verify_hubspot(
                b"app",
                "POST",
                uri_called,
                b"[]",
                Some(&sig),
                Some(&ts),
                NOW
            ),
            Ok(())
        );
    }
}
