//! The reconciliation report as a page a person reads: one self-contained HTML file (inline
//! CSS and SVG, no script, no external asset, and a Content-Security-Policy that forbids
//! loading any) with the period's figures, a chart per currency of the CRM's revenue against
//! each platform's per day, events by stage and final state, and the CRM check's missed and
//! changed deals. Every figure is in an element carrying a `data-figure` name, so a test, or
//! anyone scraping the page, reads it back by name.

use super::{DayRevenue, Report};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:72em;color:#222;padding:0 1em}\
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1em}\
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left}\
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}\
.bad{color:#b00020;font-weight:600}.ok{color:#1b5e20}dl{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}\
dt{font-weight:600}.legend span{display:inline-block;margin-right:1em}.sw{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:middle}\
svg{display:block;margin:.5em 0}";

/// A series' colour: the CRM grey, each platform its own brand colour, so a chart reads the
/// same whatever else the report holds.
fn series_colour(series: &str) -> &'static str {
    match series {
        "crm" => "#555555",
        "meta" => "#1877f2",
        "google" => "#34a853",
        _ => "#a142f4",
    }
}

/// A final state's colour, the same in every destination's bar.
fn state_colour(state: &str) -> &'static str {
    match state {
        "delivered" | "delivered_replay" => "#2e7d32",
        s if s.starts_with("blocked") => "#f9ab00",
        "dead_letter" => "#8e0000",
        s if s.starts_with("rejected") => "#d93025",
        "pending" | "sending" | "retry" | "waiting" => "#90a4ae",
        _ => "#a142f4",
    }
}

/// Text for HTML content and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A table cell holding one named figure.
fn fig(name: &str, value: &str) -> String {
    format!(
        "<td class=\"n\" data-figure=\"{}\">{}</td>",
        esc(name),
        esc(value)
    )
}

fn amount(s: &str) -> f64 {
    s.parse().unwrap_or(0.0)
}

impl Report {
    /// The report as one self-contained HTML page.
    pub fn to_html(&self) -> String {
        let mut h = String::with_capacity(16 * 1024);
        let title = format!(
            "Reconciliation {} ({} to {})",
            self.period, self.from, self.to
        );
        let _ = writeln!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
             <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
             <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>",
            esc(&title),
            esc(&title)
        );
        let _ = writeln!(
            h,
            "<dl><dt>Period</dt><dd data-figure=\"period\">{}</dd><dt>From</dt><dd data-figure=\"from\">{}</dd>\
             <dt>To</dt><dd data-figure=\"to\">{}</dd><dt>Generated</dt><dd data-figure=\"generated_at\">{}</dd>\
             <dt>Events</dt><dd data-figure=\"events\">{}</dd></dl>",
            esc(&self.period),
            esc(&self.from),
            esc(&self.to),
            esc(&self.generated_at),
            self.events
        );
        self.revenue_section(&mut h);
        self.daily_section(&mut h);
        self.stage_section(&mut h);
        self.delivery_section(&mut h);
        self.crm_html(&mut h);
        h.push_str("</body></html>\n");
        h
    }

    fn revenue_section(&self, h: &mut String) {
        h.push_str("<h2>Revenue: what the CRM stated against what each platform was told</h2>\n");
        h.push_str("<table><tr><th>Platform</th><th>Currency</th><th>CRM</th><th>Delivered</th><th>Difference</th><th>Explained by</th></tr>\n");
        let mut any = false;
        for (d, f) in &self.destinations {
            for (c, m) in &f.currencies {
                any = true;
                let base = format!("revenue.{d}.{c}");
                let class = if amount(&m.difference).abs() < 0.005 {
                    "ok"
                } else {
                    "bad"
                };
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td>{}{}<td class=\"n {class}\" data-figure=\"{}\">{}</td>{}</tr>",
                    esc(d),
                    esc(c),
                    fig(&format!("{base}.crm"), &m.crm_revenue),
                    fig(&format!("{base}.delivered"), &m.delivered_revenue),
                    esc(&format!("{base}.difference")),
                    esc(&m.difference),
                    fig(
                        &format!("{base}.explained"),
                        &m.explained_by.len().to_string()
                    ),
                );
            }
        }
        if !any {
            h.push_str("<tr><td colspan=\"6\">No revenue events in the period.</td></tr>\n");
        }
        h.push_str("</table>\n");
        let explained: Vec<_> = self
            .destinations
            .iter()
            .flat_map(|(d, f)| {
                f.currencies
                    .iter()
                    .flat_map(move |(c, m)| m.explained_by.iter().map(move |x| (d, c, x)))
            })
            .collect();
        if !explained.is_empty() {
            h.push_str("<h3>Revenue events not (or not fully) delivered</h3>\n<table><tr><th>Platform</th><th>Currency</th><th>Event</th><th>Order</th><th>Stage</th><th>Amount</th><th>State</th><th>Error</th></tr>\n");
            for (d, c, x) in explained {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td></tr>",
                    esc(d),
                    esc(c),
                    esc(&x.event_id),
                    esc(&x.order_id),
                    esc(&x.event_name),
                    fig(&format!("explained.{d}.{}.amount", x.event_id), &x.amount),
                    esc(&x.state),
                    esc(&x.error_code),
                );
            }
            h.push_str("</table>\n");
        }
    }

    fn daily_section(&self, h: &mut String) {
        h.push_str("<h2>Revenue per day</h2>\n");
        if self.daily.is_empty() {
            h.push_str("<p>No revenue events in the period.</p>\n");
            return;
        }
        let mut by_currency: BTreeMap<&str, Vec<&DayRevenue>> = BTreeMap::new();
        for d in &self.daily {
            by_currency.entry(&d.currency).or_default().push(d);
        }
        let platforms: Vec<&String> = self.destinations.keys().collect();
        let series: Vec<&str> = std::iter::once("crm")
            .chain(platforms.iter().map(|p| p.as_str()))
            .collect();
        for (currency, days) in by_currency {
            let _ = write!(h, "<h3>{}</h3>\n<p class=\"legend\">", esc(currency));
            for s in &series {
                let label = if *s == "crm" { "CRM" } else { s };
                let _ = write!(
                    h,
                    "<span><i class=\"sw\" style=\"background:{}\"></i>{}</span>",
                    series_colour(s),
                    esc(label)
                );
            }
            h.push_str("</p>\n");
            chart(h, currency, &days, &series);
            h.push_str("<table><tr><th>Day</th>");
            for s in &series {
                let _ = write!(h, "<th>{}</th>", if *s == "crm" { "CRM" } else { s });
            }
            h.push_str("</tr>\n");
            for d in &days {
                let _ = write!(h, "<tr><td>{}</td>", esc(&d.day));
                for s in &series {
                    let v = value_of(d, s);
                    h.push_str(&fig(&format!("daily.{}.{currency}.{s}", d.day), &v));
                }
                h.push_str("</tr>\n");
            }
            h.push_str("</table>\n");
        }
    }

    fn stage_section(&self, h: &mut String) {
        h.push_str("<h2>Events by stage and final state</h2>\n");
        for (d, f) in &self.destinations {
            let _ = writeln!(h, "<h3>{}</h3>", esc(d));
            let states: BTreeSet<&String> = f.by_stage.values().flat_map(|s| s.keys()).collect();
            if states.is_empty() {
                h.push_str("<p>No events.</p>\n");
                continue;
            }
            // One stacked bar of final states: how much of the period ended where.
            let total: u64 = f.by_state.values().sum();
            if total > 0 {
                let (width, height) = (640.0, 22.0);
                let _ = write!(
                    h,
                    "<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" role=\"img\" aria-label=\"final states\">"
                );
                let mut x = 0.0;
                for (state, n) in &f.by_state {
                    let w = width * (*n as f64) / (total as f64);
                    let _ = write!(
                        h,
                        "<rect x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"{height}\" fill=\"{}\"><title>{}: {n}</title></rect>",
                        state_colour(state),
                        esc(state)
                    );
                    x += w;
                }
                h.push_str("</svg>\n");
            }
            h.push_str("<table><tr><th>Stage</th>");
            for s in &states {
                let _ = write!(
                    h,
                    "<th><i class=\"sw\" style=\"background:{}\"></i>{}</th>",
                    state_colour(s),
                    esc(s)
                );
            }
            h.push_str("</tr>\n");
            for (stage, counts) in &f.by_stage {
                let _ = write!(h, "<tr><td>{}</td>", esc(stage));
                for s in &states {
                    let n = counts.get(*s).copied().unwrap_or(0);
                    h.push_str(&fig(&format!("stage.{d}.{stage}.{s}"), &n.to_string()));
                }
                h.push_str("</tr>\n");
            }
            h.push_str("<tr><th>all stages</th>");
            for s in &states {
                let n = f.by_state.get(*s).copied().unwrap_or(0);
                h.push_str(&fig(&format!("state.{d}.{s}"), &n.to_string()));
            }
            h.push_str("</tr></table>\n");
        }
    }

    fn delivery_section(&self, h: &mut String) {
        h.push_str("<h2>Delivery</h2>\n<table><tr><th>Platform</th><th>Retries</th><th>Duplicates prevented</th><th>Dead-letter queue</th><th>Oldest dead letter (s)</th><th>Re-enqueued by the sweep</th></tr>\n");
        for (d, f) in &self.destinations {
            let _ = writeln!(
                h,
                "<tr><td>{}</td>{}{}{}{}{}</tr>",
                esc(d),
                fig(&format!("retries.{d}"), &f.retries.to_string()),
                fig(
                    &format!("duplicates_prevented.{d}"),
                    &f.duplicates_prevented.to_string()
                ),
                fig(&format!("dlq.{d}"), &f.dead_letter_queue.depth.to_string()),
                fig(
                    &format!("dlq_oldest.{d}"),
                    &f.dead_letter_queue
                        .oldest_age_secs
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                ),
                fig(
                    &format!("re_enqueued.{d}"),
                    &f.sweep.re_enqueued.to_string()
                ),
            );
        }
        h.push_str("</table>\n");
    }

    fn crm_html(&self, h: &mut String) {
        let Some(crm) = &self.crm else {
            return;
        };
        let c = &crm.check;
        let _ = writeln!(
            h,
            "<h2>The CRM's own records ({}): won deals closed {} to {}</h2>",
            esc(c.source),
            esc(&c.from.canonical()),
            esc(&c.to.canonical())
        );
        h.push_str("<table><tr><th>Currency</th><th>Won deals</th><th>Revenue</th><th>Stored</th><th>Stored revenue</th><th>Missed by webhook</th><th>Missed revenue</th></tr>\n");
        for (cur, f) in &c.per_currency {
            let b = format!("crm.{cur}");
            let _ = writeln!(
                h,
                "<tr><td>{}</td>{}{}{}{}{}{}</tr>",
                esc(cur),
                fig(&format!("{b}.deals"), &f.crm_deals.to_string()),
                fig(&format!("{b}.revenue"), &format!("{:.2}", f.crm_revenue)),
                fig(&format!("{b}.stored"), &f.stored_wons.to_string()),
                fig(
                    &format!("{b}.stored_revenue"),
                    &format!("{:.2}", f.stored_revenue)
                ),
                fig(&format!("{b}.missed"), &f.missed.to_string()),
                fig(
                    &format!("{b}.missed_revenue"),
                    &format!("{:.2}", f.missed_revenue)
                ),
            );
        }
        h.push_str("</table>\n<h3>Missed by webhook</h3>\n");
        if c.missed.is_empty() {
            h.push_str("<p data-figure=\"crm.missed\">None: every won deal arrived.</p>\n");
        } else {
            h.push_str("<table><tr><th>Deal</th><th>Stage</th><th>Won at</th><th>Amount</th><th>Currency</th><th>Notes</th></tr>\n");
            for m in &c.missed {
                let _ = writeln!(
                    h,
                    "<tr><td data-figure=\"crm.missed.{}\">{}</td><td>{}</td><td>{}</td>{}<td>{}</td><td>{}</td></tr>",
                    esc(&m.deal_id),
                    esc(&m.deal_id),
                    esc(&m.stage),
                    esc(&m.won_at.map(|t| t.canonical()).unwrap_or_default()),
                    fig(
                        &format!("crm.missed.{}.amount", m.deal_id),
                        &m.amount.map(|a| format!("{a:.2}")).unwrap_or_default()
                    ),
                    esc(m.currency.as_deref().unwrap_or("")),
                    esc(&m.notes.join("; ")),
                );
            }
            h.push_str("</table>\n");
        }
        if !c.changed.is_empty() {
            h.push_str("<h3>Changed in the CRM since delivered</h3>\n<table><tr><th>Deal</th><th>Reason</th><th>Stored</th><th>CRM now</th></tr>\n");
            for x in &c.changed {
                let money = |v: Option<f64>, cur: &Option<String>| match v {
                    Some(v) => format!("{v:.2} {}", cur.as_deref().unwrap_or("")),
                    None => String::new(),
                };
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td><td data-figure=\"crm.changed.{}\">{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&x.deal_id),
                    esc(&x.deal_id),
                    esc(x.reason),
                    esc(money(x.stored_value, &x.stored_currency).trim()),
                    esc(money(x.crm_amount, &x.crm_currency).trim()),
                );
            }
            h.push_str("</table>\n");
        }
        if let Some(funnel) = &c.funnel {
            h.push_str("<h3>Lead funnel: stage changes in the CRM's history</h3>\n<table><tr><th>Event</th><th>CRM changes</th><th>Stored</th><th>Missed by webhook</th></tr>\n");
            for (event, f) in &funnel.per_stage {
                let b = format!("crm.funnel.{event}");
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td>{}{}{}</tr>",
                    esc(event),
                    fig(&format!("{b}.changes"), &f.crm_changes.to_string()),
                    fig(&format!("{b}.stored"), &f.stored.to_string()),
                    fig(&format!("{b}.missed"), &f.missed.to_string()),
                );
            }
            h.push_str("</table>\n");
            if !funnel.missed.is_empty() {
                h.push_str("<table><tr><th>Record</th><th>Stage</th><th>Event</th><th>Entered at</th><th>Notes</th></tr>\n");
                for m in &funnel.missed {
                    let _ = writeln!(
                        h,
                        "<tr><td data-figure=\"crm.funnel.missed.{}.{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                        esc(&m.record_id),
                        esc(m.event_name),
                        esc(&m.record_id),
                        esc(&m.stage),
                        esc(m.event_name),
                        esc(&m.entered_at.canonical()),
                        esc(&m.notes.join("; ")),
                    );
                }
                h.push_str("</table>\n");
            }
        }
        if let Some(repaired) = &crm.repaired {
            h.push_str(
                "<h3>Repaired in this run</h3>\n<table><tr><th>Result</th><th>Events</th></tr>\n",
            );
            for (status, n) in repaired {
                let _ = writeln!(
                    h,
                    "<tr><td>{}</td>{}</tr>",
                    esc(status),
                    fig(&format!("crm.repaired.{status}"), &n.to_string())
                );
            }
            h.push_str("</table>\n");
        }
    }
}

fn value_of(d: &DayRevenue, series: &str) -> String {
    if series == "crm" {
        d.crm.clone()
    } else {
        d.delivered
            .get(series)
            .cloned()
            .unwrap_or_else(|| "0.00".into())
    }
}

/// A grouped bar chart: one group per day, one bar per series; refunds can make a day
/// negative, so the baseline sits where zero is.
fn chart(h: &mut String, currency: &str, days: &[&DayRevenue], series: &[&str]) {
    let values: Vec<Vec<f64>> = days
        .iter()
        .map(|d| series.iter().map(|s| amount(&value_of(d, s))).collect())
        .collect();
    let max = values.iter().flatten().fold(0.0_f64, |m, v| m.max(*v));
    let min = values.iter().flatten().fold(0.0_f64, |m, v| m.min(*v));
    let span = if max - min > 0.0 { max - min } else { 1.0 };
    let (plot_h, top, left, label_h) = (200.0, 10.0, 70.0, 40.0);
    let bar_w = 14.0;
    let group_w = bar_w * series.len() as f64 + 16.0;
    let width = left + group_w * days.len() as f64 + 10.0;
    let height = top + plot_h + label_h;
    let y = |v: f64| top + plot_h * (max - v) / span;
    let _ = write!(
        h,
        "<svg width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" role=\"img\" aria-label=\"revenue per day in {}\">",
        esc(currency)
    );
    let zero = y(0.0);
    let _ = write!(
        h,
        "<text x=\"{:.0}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{max:.2}</text>\
         <text x=\"{:.0}\" y=\"{zero:.1}\" font-size=\"11\" text-anchor=\"end\">0</text>\
         <line x1=\"{left}\" y1=\"{zero:.1}\" x2=\"{width:.0}\" y2=\"{zero:.1}\" stroke=\"#999\"/>",
        left - 6.0,
        top + 10.0,
        left - 6.0
    );
    for (i, (d, vals)) in days.iter().zip(&values).enumerate() {
        let gx = left + group_w * i as f64 + 8.0;
        for (j, v) in vals.iter().enumerate() {
            let (y0, y1) = (y(v.max(0.0)), y(v.min(0.0)));
            let _ = write!(
                h,
                "<rect x=\"{:.1}\" y=\"{y0:.1}\" width=\"{bar_w}\" height=\"{:.1}\" fill=\"{}\"><title>{} {}: {v:.2} {}</title></rect>",
                gx + bar_w * j as f64,
                (y1 - y0).max(0.5),
                series_colour(series[j]),
                esc(&d.day),
                esc(if series[j] == "crm" { "CRM" } else { series[j] }),
                esc(currency)
            );
        }
        let _ = write!(
            h,
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{}</text>",
            gx + bar_w * series.len() as f64 / 2.0,
            top + plot_h + 16.0,
            esc(d.day.get(5..).unwrap_or(&d.day))
        );
    }
    h.push_str("</svg>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_everywhere_it_can_come_from_outside() {
        assert_eq!(
            esc("<script>\"a\" & 'b'</script>"),
            "&lt;script&gt;&quot;a&quot; &amp; &#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(
            fig("x.<y>", "1 & 2"),
            "<td class=\"n\" data-figure=\"x.&lt;y&gt;\">1 &amp; 2</td>"
        );
    }
}
