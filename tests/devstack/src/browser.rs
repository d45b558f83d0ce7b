//! Headless Chromium for the tests that read a page as a person's browser would: the HTML
//! reconciliation report is opened from a file, rendered (a screenshot proves it paints), and
//! its DOM as Chromium parsed it is read back, figure by figure (`data-figure` elements).
//!
//! Chromium is Debian's `chromium` package (`infra/local/setup.sh` installs it where it can);
//! `CHROMIUM` names another binary. Without one the test panics with instructions: a test of
//! a page must not pass without a browser.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Chromium binary: `CHROMIUM`, else the first of the usual names on `PATH`.
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome", "chrome"] {
        for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "no Chromium found: install Debian's package (`apt-get install chromium`, which \
         infra/local/setup.sh does as root) or set CHROMIUM to a Chrome or Chromium binary"
    );
}

/// A page as headless Chromium rendered it.
pub struct Rendered {
    /// The DOM after parsing, serialized by Chromium (`--dump-dom`).
    pub dom: String,
    /// The PNG screenshot's size in bytes.
    pub screenshot_bytes: u64,
}

fn run(args: &[String]) -> std::process::Output {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .args(args)
        .output()
        .expect("run Chromium");
    assert!(
        out.status.success(),
        "Chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Opens `html` (a file) in headless Chromium: its DOM as parsed, and a screenshot.
pub fn render(html: &Path) -> Rendered {
    let dir = html.parent().map(Path::to_path_buf).unwrap_or_default();
    let url = format!("file://{}", html.display());
    let profile = dir.join("chromium-profile");
    let profile = format!("--user-data-dir={}", profile.display());
    let dom = run(&[profile.clone(), "--dump-dom".into(), url.clone()]);
    let png = dir.join("page.png");
    run(&[
        profile,
        format!("--screenshot={}", png.display()),
        "--window-size=1280,2400".into(),
        url,
    ]);
    Rendered {
        dom: String::from_utf8_lossy(&dom.stdout).to_string(),
        screenshot_bytes: std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0),
    }
}

/// Every `data-figure` element's name and text, from a DOM Chromium serialized (attributes
/// in double quotes, text with its entities).
pub fn figures(dom: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = dom;
    while let Some(i) = rest.find("data-figure=\"") {
        rest = &rest[i + "data-figure=\"".len()..];
        let Some(end) = rest.find('"') else { break };
        let name = unescape(&rest[..end]);
        let Some(open_end) = rest.find('>') else {
            break;
        };
        let text_start = &rest[open_end + 1..];
        let text = text_start.split('<').next().unwrap_or("");
        out.insert(name, unescape(text).trim().to_string());
        rest = text_start;
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}
