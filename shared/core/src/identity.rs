//! Identity normalization and hashing per platform: raw identifiers come in, only hashes leave.
//!
//! Meta and Google disagree on email (Google folds gmail addresses) and phone (Google keeps the
//! `+`), so ingest computes both forms while the raw values are still in memory; the store and
//! the logs only ever see the results. Invalid values are dropped with a warning that names the
//! field and the reason, never the value, and never fail the event.

use crate::hashing::sha256_hex;
pub use phonenumber::country::Id as Region;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

crate::event::fields::string_fields! {
    /// Identifiers as a CRM sends them. Deliberately not `Serialize` and with a redacting
    /// `Debug`, so a raw value cannot reach a log line or the store by accident.
    IdentityInput / FastIdentity, IDENTITY_FIELDS, read_identity {
        email,
        phone,
        first_name,
        last_name,
        city,
        state,
        zip,
        country,
        external_id,
        client_ip_address,
        client_user_agent,
        gclid,
        gbraid,
        wbraid,
        fbp,
        fbc,
        fbclid,
        // When the fbclid was first seen (RFC 3339), as the CRM recorded it; ingest fills it
        // from the first event that carried the click id when the CRM does not say.
        fbclid_at,
        lead_id,
        // The CRM's own id of the person (a HubSpot contact id): what a privacy deletion
        // names. Kept with the identity, and erased with it.
        crm_contact_id,
    }
}

impl fmt::Debug for IdentityInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdentityInput(<redacted>)")
    }
}

/// Meta `user_data` keys that must be hashed, in Meta's normalized form.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct MetaHashes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub em: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ph: Option<String>,
    #[serde(rename = "fn", skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ln: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub st: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
}

/// Google identifiers: hashed email, phone and names; region and postal code stay plain, as
/// Google's address matching requires.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct GoogleHashes {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postal_code: Option<String>,
}

/// Identifiers that the platforms require unhashed: click ids, browser ids, IP and user agent.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct ClickIds {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gclid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gbraid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wbraid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbp: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fbc: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lead_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ip_address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_user_agent: Option<String>,
}

/// Everything the bridge keeps about a person: per-platform hashes and click ids.
#[derive(Serialize, Deserialize, Default, Clone, Debug, PartialEq, Eq)]
pub struct HashedIdentity {
    #[serde(default)]
    pub meta: MetaHashes,
    #[serde(default)]
    pub google: GoogleHashes,
    #[serde(default)]
    pub click: ClickIds,
    /// The CRM's id of the person the event is about, for erasure requests that name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crm_contact_id: Option<String>,
}

impl HashedIdentity {
    /// True when nothing could identify the person on either platform.
    pub fn is_empty(&self) -> bool {
        self == &HashedIdentity::default()
    }
}

/// A dropped identifier: the field and why, never the value.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct IdentityWarning {
    pub field: String,
    pub reason: String,
}

impl IdentityWarning {
    fn new(field: &str, reason: &str) -> Self {
        IdentityWarning {
            field: format!("identity.{field}"),
            reason: reason.to_string(),
        }
    }
}

/// What normalization needs besides the identifiers themselves.
#[derive(Clone, Copy, Debug)]
pub struct IdentityContext {
    /// Region for national phone numbers when the event names no country.
    pub default_region: Region,
    /// The event's business time in Unix milliseconds: the `fbc` creation time when `fbc` is
    /// built from an `fbclid` and nothing says when the click id was first seen.
    pub occurred_at_ms: i64,
}

/// Parses a configured default region such as `US`.
pub fn parse_region(code: &str) -> Option<Region> {
    Region::from_str(&code.trim().to_ascii_uppercase()).ok()
}

/// Pays the `phonenumber` crate's lazy metadata load now (it costs 60-90 ms), so the first
/// request after a cold start does not.
pub fn warm_up() {
    let _ = phonenumber::parse(Some(Region::US), "+1 650 555 1234");
}

/// Normalizes and hashes every identifier for both platforms.
pub fn normalize(
    input: &IdentityInput,
    ctx: &IdentityContext,
) -> (HashedIdentity, Vec<IdentityWarning>) {
    let mut out = HashedIdentity::default();
    let mut warnings = Vec::new();
    let mut warn = |f: &str, r: &str| warnings.push(IdentityWarning::new(f, r));

    if let Some(raw) = present(&input.email) {
        match normalize_email(raw) {
            Some(meta_form) => {
                let google_form = google_email(&meta_form);
                let meta_hash = sha256_hex(&meta_form);
                out.google.email = Some(if google_form == meta_form {
                    meta_hash.clone()
                } else {
                    sha256_hex(&google_form)
                });
                out.meta.em = Some(meta_hash);
            }
            None => warn("email", "not a valid email address"),
        }
    }

    let country = match present(&input.country) {
        Some(raw) => match normalize_country(raw) {
            Some(c) => Some(c),
            None => {
                warn("country", "not an ISO 3166-1 alpha-2 country code");
                None
            }
        },
        None => None,
    };

    if let Some(raw) = present(&input.phone) {
        let region = country
            .as_deref()
            .and_then(parse_region)
            .unwrap_or(ctx.default_region);
        match normalize_phone_e164(raw, region) {
            Some(e164) => {
                out.meta.ph = Some(sha256_hex(&e164[1..]));
                out.google.phone = Some(sha256_hex(&e164));
            }
            None => warn("phone", "not a valid phone number for its country"),
        }
    }

    for (field, raw, meta_slot, google_slot) in [
        (
            "first_name",
            &input.first_name,
            &mut out.meta.first_name,
            &mut out.google.given_name,
        ),
        (
            "last_name",
            &input.last_name,
            &mut out.meta.ln,
            &mut out.google.family_name,
        ),
    ] {
        if let Some(raw) = present(raw) {
            let meta_form = normalize_name(raw);
            let google_form = google_name(&meta_form);
            if meta_form.is_empty() {
                warn(field, "no letters left after normalization");
                continue;
            }
            let meta_hash = sha256_hex(&meta_form);
            if !google_form.is_empty() {
                *google_slot = Some(if google_form == meta_form {
                    meta_hash.clone()
                } else {
                    sha256_hex(&google_form)
                });
            }
            *meta_slot = Some(meta_hash);
        }
    }

    if let Some(raw) = present(&input.city) {
        let c: String = raw
            .chars()
            .filter(|c| c.is_alphabetic())
            .flat_map(char::to_lowercase)
            .collect();
        if c.is_empty() {
            warn("city", "no letters left after normalization");
        } else {
            out.meta.ct = Some(sha256_hex(&c));
        }
    }

    if let Some(raw) = present(&input.state) {
        match normalize_state(raw, country.as_deref()) {
            Some(s) => out.meta.st = Some(sha256_hex(&s)),
            None => warn("state", "not a recognisable state or region"),
        }
    }

    if let Some(raw) = present(&input.zip) {
        match normalize_zip(raw, country.as_deref()) {
            Some((meta, google)) => {
                out.meta.zp = Some(sha256_hex(&meta));
                out.google.postal_code = Some(google);
            }
            None => warn("zip", "not a valid postal code"),
        }
    }

    if let Some(c) = &country {
        out.meta.country = Some(sha256_hex(c));
        out.google.region_code = Some(c.to_ascii_uppercase());
    }

    if let Some(raw) = present(&input.external_id) {
        out.meta.external_id = Some(sha256_hex(raw));
    }

    normalize_clicks(input, ctx, &mut out.click, &mut warn);
    if let Some(id) = present(&input.crm_contact_id) {
        if id.len() <= 128 && !id.chars().any(char::is_control) {
            out.crm_contact_id = Some(id.to_string());
        } else {
            warn(
                "crm_contact_id",
                "longer than 128 characters or with control characters",
            );
        }
    }
    (out, warnings)
}

fn present(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// Meta's form: trimmed, lowercased, shaped like `x@y.z`.
pub fn normalize_email(raw: &str) -> Option<String> {
    let e = raw.trim().to_lowercase();
    let (local, domain) = e.split_once('@')?;
    let valid = !local.is_empty()
        && !domain.contains('@')
        && !e.chars().any(char::is_whitespace)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..");
    valid.then_some(e)
}

/// Google's form of an already normalized email: for gmail.com and googlemail.com only, drop
/// everything from the first `+` in the local part and every `.` in it.
pub fn google_email(normalized: &str) -> String {
    match normalized.split_once('@') {
        Some((local, domain)) if domain == "gmail.com" || domain == "googlemail.com" => {
            let local = local.split('+').next().unwrap_or_default();
            let local: String = local.chars().filter(|&c| c != '.').collect();
            format!("{local}@{domain}")
        }
        _ => normalized.to_string(),
    }
}

/// E.164 with the `+`, using the number's own country code when it has one, else `region`.
pub fn normalize_phone_e164(raw: &str, region: Region) -> Option<String> {
    nanp_fast_path(raw, region).or_else(|| phone_e164_full(raw, region))
}

/// The general path: libphonenumber's parse (about 4 µs: its regex-driven extraction of the
/// number, country code and national prefix) and validity test.
fn phone_e164_full(raw: &str, region: Region) -> Option<String> {
    let number = phonenumber::parse(Some(region), raw).ok()?;
    let national = number.national().to_string();
    let valid = phonenumber::metadata::DATABASE
        .by_id(region.as_ref())
        .is_some_and(|m| m.country_code() == number.code().value() && valid_national(m, &national))
        || phonenumber::is_valid(&number);
    // E.164 is `+`, the country code and the national number with any leading zeros, which is
    // what phonenumber's E164 formatter writes after a format lookup this does not need.
    valid.then(|| format!("+{}{national}", number.code().value()))
}

/// Most CRM phone numbers are North American numbers written with the usual punctuation:
/// `(650) 555-1234`, `650.555.1234`, `+1 650 555 1234`, `1-650-555-1234`. For those the
/// national number is simply the ten digits, so libphonenumber's extraction can be skipped and
/// only its validity test run. Anything else (letters, an extension, another length, a `+`
/// not followed by 1, a national number libphonenumber would reject for this region) returns
/// `None` and takes the general path, so the answer is always the general path's: the test
/// `nanp_fast_path_agrees_with_libphonenumber` holds it to that.
fn nanp_fast_path(raw: &str, region: Region) -> Option<String> {
    let meta = phonenumber::metadata::DATABASE.by_id(region.as_ref())?;
    if meta.country_code() != 1 {
        return None;
    }
    let raw = raw.trim();
    let (plus, rest) = match raw.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, raw),
    };
    let mut digits = [0u8; 11];
    let mut n = 0usize;
    for b in rest.bytes() {
        match b {
            b'0'..=b'9' => {
                *digits.get_mut(n)? = b;
                n += 1;
            }
            b' ' | b'-' | b'.' | b'(' | b')' => {}
            _ => return None,
        }
    }
    let national = match (plus, n) {
        (false, 10) => digits.get(..10)?,
        (_, 11) if digits[0] == b'1' => digits.get(1..11)?,
        _ => return None,
    };
    // NANP area codes and exchanges never start with 0 or 1; leave such input to the parser.
    if matches!(national.first(), Some(b'0' | b'1')) {
        return None;
    }
    let national = std::str::from_utf8(national).ok()?;
    valid_national(meta, national).then(|| format!("+1{national}"))
}

/// libphonenumber's validity test against one region's metadata. `phonenumber::is_valid`
/// first works out which region a number belongs to by testing every region that shares its
/// country code (about 25 for +1), which costs 4 µs; a number valid for the region it was
/// parsed against is valid whatever that search would find, so that region is tried first
/// and the full test only runs when this one says no.
fn valid_national(meta: &phonenumber::metadata::Metadata, national: &str) -> bool {
    let d = meta.descriptors();
    d.general().is_match(national)
        // Validity only asks whether any type matches, so the common types go first.
        && [
            d.fixed_line(),
            d.mobile(),
            d.toll_free(),
            d.voip(),
            d.premium_rate(),
            d.shared_cost(),
            d.personal_number(),
            d.pager(),
            d.uan(),
            d.voicemail(),
        ]
        .into_iter()
        .flatten()
        .any(|x| x.is_match(national))
}

/// Lowercase with punctuation removed; letters, digits and single inner spaces kept.
fn normalize_name(raw: &str) -> String {
    let mut s = String::with_capacity(raw.len());
    for word in raw.split_whitespace() {
        let w: String = word
            .chars()
            .filter(|c| c.is_alphanumeric())
            .flat_map(char::to_lowercase)
            .collect();
        if !w.is_empty() {
            if !s.is_empty() {
                s.push(' ');
            }
            s.push_str(&w);
        }
    }
    s
}

const TITLES: &[&str] = &[
    "mr", "mrs", "ms", "miss", "mx", "dr", "prof", "sir", "madam",
];
const SUFFIXES: &[&str] = &["jr", "sr", "ii", "iii", "iv", "phd", "md", "esq"];

/// Google's name form: Meta's, minus leading titles and trailing suffixes.
fn google_name(meta_form: &str) -> String {
    let mut words: Vec<&str> = meta_form.split(' ').filter(|w| !w.is_empty()).collect();
    while words.len() > 1 && TITLES.contains(&words[0]) {
        words.remove(0);
    }
    while words.len() > 1 && words.last().is_some_and(|w| SUFFIXES.contains(w)) {
        words.pop();
    }
    words.join(" ")
}

fn normalize_country(raw: &str) -> Option<String> {
    let c = raw.trim();
    (c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()) && parse_region(c).is_some())
        .then(|| c.to_ascii_lowercase())
}

const US_STATES: &[(&str, &str)] = &[
    ("alabama", "al"),
    ("alaska", "ak"),
    ("arizona", "az"),
    ("arkansas", "ar"),
    ("california", "ca"),
    ("colorado", "co"),
    ("connecticut", "ct"),
    ("delaware", "de"),
    ("districtofcolumbia", "dc"),
    ("florida", "fl"),
    ("georgia", "ga"),
    ("hawaii", "hi"),
    ("idaho", "id"),
    ("illinois", "il"),
    ("indiana", "in"),
    ("iowa", "ia"),
    ("kansas", "ks"),
    ("kentucky", "ky"),
    ("louisiana", "la"),
    ("maine", "me"),
    ("maryland", "md"),
    ("massachusetts", "ma"),
    ("michigan", "mi"),
    ("minnesota", "mn"),
    ("mississippi", "ms"),
    ("missouri", "mo"),
    ("montana", "mt"),
    ("nebraska", "ne"),
    ("nevada", "nv"),
    ("newhampshire", "nh"),
    ("newjersey", "nj"),
    ("newmexico", "nm"),
    ("newyork", "ny"),
    ("northcarolina", "nc"),
    ("northdakota", "nd"),
    ("ohio", "oh"),
    ("oklahoma", "ok"),
    ("oregon", "or"),
    ("pennsylvania", "pa"),
    ("rhodeisland", "ri"),
    ("southcarolina", "sc"),
    ("southdakota", "sd"),
    ("tennessee", "tn"),
    ("texas", "tx"),
    ("utah", "ut"),
    ("vermont", "vt"),
    ("virginia", "va"),
    ("washington", "wa"),
    ("westvirginia", "wv"),
    ("wisconsin", "wi"),
    ("wyoming", "wy"),
    ("puertorico", "pr"),
];

/// Meta's state form: letters only, lowercase; US state names become their 2-letter codes.
fn normalize_state(raw: &str, country: Option<&str>) -> Option<String> {
    let s: String = raw
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    if s.is_empty() {
        return None;
    }
    let us = matches!(country, None | Some("us"));
    if us {
        if let Some((_, code)) = US_STATES
            .iter()
            .find(|(name, code)| *name == s || *code == s)
        {
            return Some((*code).to_string());
        }
        if country == Some("us") {
            return None;
        }
    }
    Some(s)
}

/// The postal code in Meta's form and in Google's. Meta: lowercase without spaces or dashes,
/// US codes cut to their first five digits. Google: not hashed, US codes as 5 digits or ZIP+4
/// when given ("using a 4-digit extension may improve your match rate"), other countries as
/// written (trimmed, upper case).
/// source: Meta customer-information-parameters (zp); Data Manager concepts/formatting
/// (postal_code) and google-ads-datamanager-util format.py (only trims).
fn normalize_zip(raw: &str, country: Option<&str>) -> Option<(String, String)> {
    let z: String = raw
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect();
    let all_digits = z.bytes().all(|b| b.is_ascii_digit());
    let us = |z: &str| match z.len() {
        5 => Some((z.to_string(), z.to_string())),
        9 => Some((z[..5].to_string(), format!("{}-{}", &z[..5], &z[5..]))),
        _ => None,
    };
    match country {
        Some("us") if all_digits => us(&z),
        Some("us") => None,
        None if all_digits && z.len() == 9 => us(&z),
        _ if z.is_empty() || z.len() > 12 => None,
        _ => Some((z, raw.trim().to_uppercase())),
    }
}

fn click_id_ok(s: &str) -> bool {
    s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn fb_cookie_ok(s: &str) -> bool {
    let mut parts = s.splitn(4, '.');
    parts.next() == Some("fb")
        && parts.next().is_some_and(|p| p.parse::<u8>().is_ok())
        && parts
            .next()
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && parts
            .next()
            .is_some_and(|p| !p.is_empty() && p.len() <= 512 && !p.contains(char::is_whitespace))
}

fn normalize_clicks(
    input: &IdentityInput,
    ctx: &IdentityContext,
    out: &mut ClickIds,
    warn: &mut impl FnMut(&str, &str),
) {
    for (field, raw, slot) in [
        ("gclid", &input.gclid, &mut out.gclid),
        ("gbraid", &input.gbraid, &mut out.gbraid),
        ("wbraid", &input.wbraid, &mut out.wbraid),
    ] {
        if let Some(v) = present(raw) {
            if click_id_ok(v) {
                *slot = Some(v.to_string());
            } else {
                warn(field, "contains characters a click id cannot have");
            }
        }
    }
    for (field, raw, slot) in [
        ("fbp", &input.fbp, &mut out.fbp),
        ("fbc", &input.fbc, &mut out.fbc),
    ] {
        if let Some(v) = present(raw) {
            if fb_cookie_ok(v) {
                *slot = Some(v.to_string());
            } else {
                warn(field, "not of the form fb.<n>.<unix ms>.<value>");
            }
        }
    }
    if out.fbc.is_none()
        && let Some(v) = present(&input.fbclid)
    {
        // The creation time is when the click id was first seen, not this stage's own time, so
        // every stage of one lead sends the same fbc.
        // source: https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/fbp-and-fbc
        // ("the time when you first observed or received this fbclid value")
        let seen = present(&input.fbclid_at).map(crate::timestamp::Timestamp::parse_rfc3339);
        let created_ms = match seen {
            Some(Ok(t)) => t.unix_ms(),
            Some(Err(_)) => {
                warn(
                    "fbclid_at",
                    "not an RFC 3339 date-time; the event's own time is used",
                );
                ctx.occurred_at_ms
            }
            None => ctx.occurred_at_ms,
        };
        if v.len() <= 500 && !v.contains(char::is_whitespace) {
            out.fbc = Some(format!("fb.1.{created_ms}.{v}"));
        } else {
            warn("fbclid", "not a valid click id");
        }
    }
    if let Some(v) = present(&input.lead_id) {
        if v.len() <= 32 && v.bytes().all(|b| b.is_ascii_digit()) {
            out.lead_id = Some(v.to_string());
        } else {
            warn("lead_id", "a Meta lead id is digits only");
        }
    }
    if let Some(v) = present(&input.client_ip_address) {
        match v.parse::<std::net::IpAddr>() {
            Ok(ip) => out.client_ip_address = Some(ip.to_string()),
            Err(_) => warn("client_ip_address", "not an IPv4 or IPv6 address"),
        }
    }
    if let Some(v) = present(&input.client_user_agent) {
        if v.len() <= 1024 {
            out.client_user_agent = Some(v.to_string());
        } else {
            warn("client_user_agent", "longer than 1024 bytes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// phonenumber's patterns are built through the vendored regex-cache, which no longer
    /// parses them at load (shared/regex-cache/README.md): compile every one of them here,
    /// with the options phonenumber gives them, so an invalid pattern fails CI, not a request.
    #[test]
    fn every_phone_metadata_pattern_compiles() {
        use phonenumber::metadata::{DATABASE, Descriptor, Format};
        let mut patterns: Vec<(String, String)> = Vec::new();
        for m in DATABASE.iter() {
            let mut add = |what: &str, src: &str| {
                patterns.push((format!("{} {what}", m.id()), src.to_string()))
            };
            let d = m.descriptors();
            let descriptors: Vec<(&str, Option<&Descriptor>)> = vec![
                ("general", Some(d.general())),
                ("fixed_line", d.fixed_line()),
                ("mobile", d.mobile()),
                ("toll_free", d.toll_free()),
                ("premium_rate", d.premium_rate()),
                ("shared_cost", d.shared_cost()),
                ("personal_number", d.personal_number()),
                ("voip", d.voip()),
                ("pager", d.pager()),
                ("uan", d.uan()),
                ("emergency", d.emergency()),
                ("voicemail", d.voicemail()),
                ("short_code", d.short_code()),
                ("standard_rate", d.standard_rate()),
                ("carrier", d.carrier()),
                ("no_international", d.no_international()),
            ];
            for (name, desc) in descriptors {
                if let Some(desc) = desc {
                    add(name, desc.national_number().as_str());
                }
            }
            let formats: Vec<&Format> = m
                .formats()
                .iter()
                .chain(m.international_formats())
                .collect();
            for f in formats {
                add("format", f.pattern().as_str());
                for l in f.leading_digits() {
                    add("format leading digits", l.as_str());
                }
            }
            if let Some(r) = m.international_prefix() {
                add("international prefix", r.as_str());
            }
            if let Some(r) = m.national_prefix_for_parsing() {
                add("national prefix for parsing", r.as_str());
            }
            if let Some(r) = m.leading_digits() {
                add("leading digits", r.as_str());
            }
        }
        assert!(patterns.len() > 4_000, "{} patterns", patterns.len());
        for (what, src) in &patterns {
            if let Err(e) = regex::RegexBuilder::new(src)
                .ignore_whitespace(true)
                .build()
            {
                panic!("{what}: {e}");
            }
        }
    }

    fn ctx(region: &str) -> IdentityContext {
        IdentityContext {
            default_region: parse_region(region).unwrap(),
            occurred_at_ms: 1_700_000_000_000,
        }
    }

    /// Every case of the shared reference vectors, both platforms, normalized form and hash.
    #[test]
    fn reference_vectors() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/identity.jsonl");
        let text = std::fs::read_to_string(path).expect("vectors file");
        let mut cases = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let case: Value = serde_json::from_str(line).unwrap();
            let field = case["field"].as_str().unwrap();
            let input = case["input"].as_str().unwrap();
            let region = case["default_region"].as_str().unwrap_or("US");
            let mut id = IdentityInput::default();
            let (meta_norm, google_norm) = match field {
                "email" => {
                    id.email = Some(input.into());
                    let m = normalize_email(input).unwrap();
                    (m.clone(), google_email(&m))
                }
                "phone" => {
                    id.phone = Some(input.into());
                    let g = normalize_phone_e164(input, parse_region(region).unwrap()).unwrap();
                    (g[1..].to_string(), g)
                }
                other => panic!("unexpected field {other}"),
            };
            assert_eq!(
                meta_norm,
                case["meta"]["normalized"].as_str().unwrap(),
                "meta form of {input:?}"
            );
            assert_eq!(
                google_norm,
                case["google"]["normalized"].as_str().unwrap(),
                "google form of {input:?}"
            );
            let (h, warnings) = normalize(&id, &ctx(region));
            assert!(warnings.is_empty(), "{input:?}: {warnings:?}");
            let (meta_hash, google_hash) = match field {
                "email" => (h.meta.em, h.google.email),
                _ => (h.meta.ph, h.google.phone),
            };
            assert_eq!(
                meta_hash.as_deref(),
                case["meta"]["sha256"].as_str(),
                "meta hash of {input:?}"
            );
            assert_eq!(
                google_hash.as_deref(),
                case["google"]["sha256"].as_str(),
                "google hash of {input:?}"
            );
            cases += 1;
        }
        assert_eq!(cases, 18, "every vector must run");
    }

    #[test]
    fn invalid_values_are_dropped_with_a_warning_naming_the_field() {
        let id = IdentityInput {
            email: Some("not-an-email".into()),
            phone: Some("12".into()),
            country: Some("Narnia".into()),
            client_ip_address: Some("999.1.1.1".into()),
            fbc: Some("garbage".into()),
            gclid: Some("bad gclid!".into()),
            ..Default::default()
        };
        let (h, w) = normalize(&id, &ctx("US"));
        assert!(h.is_empty());
        let fields: Vec<&str> = w.iter().map(|w| w.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "identity.email",
                "identity.country",
                "identity.phone",
                "identity.gclid",
                "identity.fbc",
                "identity.client_ip_address"
            ]
        );
        let text = serde_json::to_string(&w).unwrap();
        assert!(
            !text.contains("not-an-email") && !text.contains("Narnia"),
            "warnings never carry values"
        );
    }

    #[test]
    fn phone_uses_event_country_before_default_region() {
        let id = IdentityInput {
            phone: Some("020 7946 0958".into()),
            country: Some("GB".into()),
            ..Default::default()
        };
        let (h, w) = normalize(&id, &ctx("US"));
        assert!(w.is_empty());
        assert_eq!(h.google.phone, Some(sha256_hex("+442079460958")));
        assert_eq!(h.meta.ph, Some(sha256_hex("442079460958")));
        assert_eq!(h.google.region_code.as_deref(), Some("GB"));
        assert_eq!(h.meta.country, Some(sha256_hex("gb")));
    }

    #[test]
    fn names_and_address() {
        let id = IdentityInput {
            first_name: Some("  Dr. Mary-Ann ".into()),
            last_name: Some("O'Brien Jr.".into()),
            city: Some("San Francisco 2".into()),
            state: Some("California".into()),
            zip: Some("94105-1234".into()),
            country: Some("us".into()),
            ..Default::default()
        };
        let (h, w) = normalize(&id, &ctx("US"));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(h.meta.first_name, Some(sha256_hex("dr maryann")));
        assert_eq!(h.google.given_name, Some(sha256_hex("maryann")));
        assert_eq!(h.meta.ln, Some(sha256_hex("obrien jr")));
        assert_eq!(h.google.family_name, Some(sha256_hex("obrien")));
        assert_eq!(h.meta.ct, Some(sha256_hex("sanfrancisco")));
        assert_eq!(h.meta.st, Some(sha256_hex("ca")));
        assert_eq!(h.meta.zp, Some(sha256_hex("94105")), "Meta: five digits");
        assert_eq!(
            h.google.postal_code.as_deref(),
            Some("94105-1234"),
            "Google keeps ZIP+4 (it may improve matching)"
        );
    }

    #[test]
    fn fbc_creation_time_is_when_the_click_id_was_first_seen() {
        let input = IdentityInput {
            fbclid: Some("IwAR2xyz".into()),
            fbclid_at: Some("2023-11-14T22:13:20Z".into()),
            ..Default::default()
        };
        let (h, w) = normalize(&input, &ctx("US"));
        assert!(w.is_empty());
        assert_eq!(h.click.fbc.as_deref(), Some("fb.1.1700000000000.IwAR2xyz"));
    }

    #[test]
    fn fbc_is_built_from_fbclid_deterministically() {
        let id = IdentityInput {
            fbclid: Some("IwAR2xyz".into()),
            ..Default::default()
        };
        let (a, _) = normalize(&id, &ctx("US"));
        let (b, _) = normalize(&id, &ctx("US"));
        assert_eq!(a.click.fbc.as_deref(), Some("fb.1.1700000000000.IwAR2xyz"));
        assert_eq!(a, b);
        let given = IdentityInput {
            fbclid: Some("IwAR2xyz".into()),
            fbc: Some("fb.1.1600000000000.other".into()),
            ..Default::default()
        };
        let (c, _) = normalize(&given, &ctx("US"));
        assert_eq!(
            c.click.fbc.as_deref(),
            Some("fb.1.1600000000000.other"),
            "an explicit fbc wins"
        );
    }

    #[test]
    fn click_ids_and_browser_fields_stay_unhashed() {
        let id = IdentityInput {
            gclid: Some("Cj0KCQ_abc-1".into()),
            wbraid: Some("wb1".into()),
            client_ip_address: Some("2001:db8::1".into()),
            client_user_agent: Some("Mozilla/5.0".into()),
            lead_id: Some("1234567890".into()),
            ..Default::default()
        };
        let (h, w) = normalize(&id, &ctx("US"));
        assert!(w.is_empty());
        assert_eq!(h.click.gclid.as_deref(), Some("Cj0KCQ_abc-1"));
        assert_eq!(h.click.wbraid.as_deref(), Some("wb1"));
        assert_eq!(h.click.client_ip_address.as_deref(), Some("2001:db8::1"));
        assert_eq!(h.click.lead_id.as_deref(), Some("1234567890"));
    }

    #[test]
    fn region_fast_path_agrees_with_full_validation() {
        let numbers = [
            "(650) 555-1234",
            "+1 650 555 1234",
            "650-253-0000",
            "+1 2530000",
            "+1 800 555 0100",
            "+1 (212) 555-0199",
            "911",
            "+1 999 555 1234",
            "+44 20 7946 0958",
            "020 7946 0958",
            "07911 123456",
            "+44 7911 123456",
            "+49 30 901820",
            "030 901820",
            "+33 1 42 68 53 00",
            "06 12 34 56 78",
            "+61 2 9374 4000",
            "+81 3-1234-5678",
            "+1 876 555 1234",
            "+1 441 295 1234",
            "+1 204 555 0100",
            "+1 268 464 1234",
            "12",
            "+999 1234",
            "+1 000 000 0000",
        ];
        for region in ["US", "GB", "DE", "FR", "CA", "JM", "AU"] {
            let r = parse_region(region).unwrap();
            for raw in numbers {
                assert_eq!(
                    normalize_phone_e164(raw, r),
                    libphonenumber_e164(raw, r),
                    "{raw} in {region}"
                );
            }
        }
    }

    /// The oracle: phonenumber's own parse, `is_valid` and E.164 formatter, no shortcut.
    fn libphonenumber_e164(raw: &str, region: Region) -> Option<String> {
        let n = phonenumber::parse(Some(region), raw).ok()?;
        phonenumber::is_valid(&n).then(|| n.format().mode(phonenumber::Mode::E164).to_string())
    }

    /// The NANP shortcut gives libphonenumber's answer for every area code and exchange
    /// (valid, unassigned and reserved ones alike), written in every usual way, in every
    /// region it applies to and in some it does not.
    #[test]
    fn nanp_fast_path_agrees_with_libphonenumber() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut fast_hits = 0;
        for region in ["US", "CA", "JM", "PR", "BS", "GB", "MX"] {
            let r = parse_region(region).unwrap();
            for _ in 0..400 {
                let npa = rng.u32(0..1000);
                let nxx = rng.u32(0..1000);
                let line = rng.u32(0..10000);
                let forms = [
                    format!("({npa:03}) {nxx:03}-{line:04}"),
                    format!("{npa:03}.{nxx:03}.{line:04}"),
                    format!("+1 {npa:03} {nxx:03} {line:04}"),
                    format!("1-{npa:03}-{nxx:03}-{line:04}"),
                    format!(" {npa:03}{nxx:03}{line:04} "),
                    format!("+{npa:03}{nxx:03}{line:04}"),
                    format!("+1{npa:03}{nxx:03}{line:04}"),
                    format!("2{npa:03}{nxx:03}{line:04}"),
                    format!("({npa:03}) {nxx:03}-{line:04} x12"),
                    format!("{npa:03} {nxx:03} {line:03}"),
                ];
                for raw in &forms {
                    let expected = libphonenumber_e164(raw, r);
                    assert_eq!(
                        normalize_phone_e164(raw, r),
                        expected,
                        "{raw:?} in {region}"
                    );
                    if let Some(fast) = nanp_fast_path(raw, r) {
                        assert_eq!(Some(fast), expected, "{raw:?} in {region}");
                        fast_hits += 1;
                    }
                }
            }
        }
        assert!(fast_hits > 1000, "the shortcut was exercised: {fast_hits}");
    }

    #[test]
    fn debug_never_prints_raw_values() {
        let id = IdentityInput {
            email: Some("secret@example.com".into()),
            ..Default::default()
        };
        assert!(!format!("{id:?}").contains("secret"));
    }
}
