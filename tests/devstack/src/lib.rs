//! The local development stack around the bridge's binaries: stacks created from
//! `infra/template.yaml` in the local AWS emulator, the Lambda Runtime API emulator with the
//! SQS event source mappings, schedule, function URL and DLQ redrive (`local`), the strict fakes
//! of Meta, Google, HubSpot and Salesforce (`fakes`), and the `bridge-local` CLI that runs it all.

pub mod browser;
pub mod fakes;
pub mod local;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub fn repo_root() -> PathBuf {
    // This crate lives at tests/devstack.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// The emulator endpoint: `AWS_ENDPOINT_URL` if set, else moto's default local address.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| "http://127.0.0.1:5000".into())
}

/// AWS SDK config for the emulator, with dummy credentials when none are set. Its requests
/// say `app/bridge-devstack` in their user agent, so the emulator's cost meter tells the test
/// harness and the emulated event source mappings from the bridge's functions.
pub async fn sdk_config() -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .app_name(aws_config::AppName::new("bridge-devstack").expect("a valid app name"))
        .http_client(bridge_aws::clients::http_client(
            bridge_aws::clients::SdkTrust::Mozilla,
        ))
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

/// How a stack is deployed: its name, whether an existing stack of that name is used as it is
/// (`bridge-local up` reuses its stack across runs), its parameters, and where the local
/// runtime's plan and the stack's variables are written.
pub struct StackSpec<'a> {
    pub name: String,
    pub reuse: bool,
    pub params: &'a [(String, String)],
    pub plan: Option<&'a std::path::Path>,
    pub env_file: Option<&'a std::path::Path>,
}

impl Stack {
    /// Creates a stack named after the test, with template parameters `params`. Panics with
    /// instructions when the emulator is not running: an integration test must not pass
    /// without the thing it tests.
    pub fn create(test: &str, params: &[(&str, &str)]) -> Stack {
        Self::create_inner(test, params, None)
    }

    /// Where a test's plan is written.
    pub fn plan_path(test: &str) -> PathBuf {
        let dir = repo_root().join("target/local-plans");
        let _ = std::fs::create_dir_all(&dir);
        dir.join(format!("{test}-{}.json", std::process::id()))
    }

    /// A stack name of its own for one test in this process.
    pub fn unique_name(test: &str) -> String {
        format!(
            "it-{}-{}-{}",
            test.replace('_', "-"),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn create_inner(test: &str, params: &[(&str, &str)], plan: Option<&std::path::Path>) -> Stack {
        let params: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::deploy(&StackSpec {
            name: Self::unique_name(test),
            reuse: false,
            params: &params,
            plan,
            env_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Deploys `infra/template.yaml` into the emulator with `infra/local/deploy.py`; the error
    /// says what to run when the venv or the emulator is missing.
    pub fn deploy(spec: &StackSpec) -> Result<Stack, String> {
        let python = std::env::var("BRIDGE_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".venv/bin/python"));
        let mut cmd = Command::new(&python);
        cmd.arg(repo_root().join("infra/local/deploy.py"))
            .arg("--stack-name")
            .arg(&spec.name)
            .env("AWS_ENDPOINT_URL", endpoint());
        if spec.reuse {
            cmd.arg("--reuse");
        }
        for (k, v) in spec.params {
            cmd.arg("--param").arg(format!("{k}={v}"));
        }
        if let Some(p) = spec.plan {
            cmd.arg("--plan").arg(p);
        }
        if let Some(p) = spec.env_file {
            cmd.arg("--env-file").arg(p);
        }
        let out = cmd.output().map_err(|e| {
            format!("cannot run {}: {e}. Run through infra/local/test.sh or up.sh, which set up the venv and moto.", python.display())
        })?;
        if !out.status.success() {
            return Err(format!(
                "creating stack {} at {} failed (is moto running? infra/local/test.sh and up.sh start it):\n{}",
                spec.name,
                endpoint(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
        Ok(Stack {
            name: spec.name.clone(),
            env,
        })
    }

    pub fn var(&self, k: &str) -> String {
        self.env
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("stack {} has no output {k}", self.name))
    }
}
