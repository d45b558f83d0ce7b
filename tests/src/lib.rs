//! Test helpers: isolated stacks from infra/template.yaml in the local emulator, AWS clients
//! pointed at it, and sample events.

pub mod fakes;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use shared::consent::ConsentStatus;
use shared::destination::{DeliveryStatus, Destination, DestinationState};
use shared::event::{CanonicalEvent, ValidationContext, parse_event, validate};
use shared::timestamp::Timestamp;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The emulator endpoint: `AWS_ENDPOINT_URL` if set, else moto's default local address.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// AWS SDK config for the emulator, with dummy credentials when none are set.
pub async fn sdk_config() -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .endpoint_url(endpoint())
        .region(Region::new(
            std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
        ));
    if std::env::var("AWS_ACCESS_KEY_ID").is_err() {
        loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "tests",
        ));
    }
    loader.load().await
}

/// One CloudFormation stack created from the real template, so each test has its own table
/// and queues with exactly the template's keys, indexes and redrive settings.
pub struct Stack {
    pub name: String,
    pub env: HashMap<String, String>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Stack {
    /// Creates a stack named after the test, with template parameters `params`. Panics with
    /// instructions when the emulator is not running: an integration test must not pass
    /// without the thing it tests.
    pub fn create(test: &str, params: &[(&str, &str)]) -> Stack {
        Self::create_inner(test, params, None)
    }

    /// Like `create`, and also writes the local runtime's plan (functions, mappings,
    /// schedules) resolved from the same template; returns its path.
    pub fn create_with_plan(test: &str, params: &[(&str, &str)]) -> (Stack, PathBuf) {
        let dir = repo_root().join("target/local-plans");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{test}-{}.json", std::process::id()));
        (Self::create_inner(test, params, Some(&path)), path)
    }

    fn create_inner(test: &str, params: &[(&str, &str)], plan: Option<&std::path::Path>) -> Stack {
        let name = format!(
            "it-{}-{}-{}",
            test.replace('_', "-"),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let python = std::env::var("BRIDGE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".venv/bin/python"));
        let mut cmd = Command::new(&python);
        cmd.arg(repo_root().join("infra/local/deploy.py"))
            .arg("--stack-name")
            .arg(&name)
            .env("AWS_ENDPOINT_URL", endpoint());
        for (k, v) in params {
            cmd.arg("--param").arg(format!("{k}={v}"));
        }
        if let Some(p) = plan {
            cmd.arg("--plan").arg(p);
        }
        let out = cmd.output().unwrap_or_else(|e| {
            panic!("cannot run {}: {e}. Run the tests through infra/local/test.sh, which sets up the venv and moto.", python.display())
        });
        assert!(
            out.status.success(),
            "creating stack {name} at {} failed (is moto running? infra/local/test.sh starts it):\n{}",
            endpoint(),
            String::from_utf8_lossy(&out.stderr)
        );
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Stack { name, env }
    }

    pub fn var(&self, k: &str) -> String {
        self.env
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("stack {} has no output {k}", self.name))
    }
}

/// A valid event built through the real validation path, with every destination pending.
pub fn sample_event(
    entity: &str,
    event_name: &str,
    order_id: Option<&str>,
    value: Option<f64>,
    at: &str,
) -> CanonicalEvent {
    let mut v = serde_json::json!({
        "source": "hubspot", "event_name": event_name, "occurred_at": at,
        "entity_type": if order_id.is_some() { "opportunity" } else { "contact" },
        "entity_id": entity,
        "identity": {"email": format!("{entity}@example.com"), "phone": "+1 650 555 1234", "first_name": "Ada", "gclid": "Cj0-test"},
        "consent": {"status": "granted", "basis": "consent"}
    });
    if let Some(o) = order_id {
        v["order_id"] = o.into();
        v["currency"] = "USD".into();
    }
    if let Some(x) = value {
        v["value"] = x.into();
    }
    let ctx = ValidationContext {
        now: Timestamp::now(),
        max_future_skew_secs: 300,
        default_region: phonenumber_us(),
        mapping_version: "it-1".into(),
        default_consent: ConsentStatus::Unknown,
    };
    let mut e = validate(&parse_event(&v).expect("sample parses"), &ctx).expect("sample validates");
    for d in Destination::ALL {
        e.destinations.insert(
            d,
            DestinationState::new(DeliveryStatus::Pending, e.received_at),
        );
    }
    e
}

fn phonenumber_us() -> shared::identity::Region {
    shared::identity::parse_region("US").expect("US is a region")
}
pub mod local;
