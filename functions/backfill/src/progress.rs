//! A progress bar on stderr for the operator commands' long runs. It is drawn only when stderr
//! is a terminal, at most ten times a second, so a CI log or a redirected stderr gets the
//! summary table at the end and nothing else.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct Progress {
    label: String,
    total: u64,
    done: u64,
    draw: bool,
    started: Instant,
    drawn_at: Option<Instant>,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Progress {
        Progress {
            label: label.into(),
            total,
            done: 0,
            draw: std::io::stderr().is_terminal(),
            started: Instant::now(),
            drawn_at: None,
        }
    }

    /// Counts `n` more items done and redraws when due.
    pub fn inc(&mut self, n: u64) {
        self.done = self.done.saturating_add(n).min(self.total);
        let due = self
            .drawn_at
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(100));
        if self.draw && (due || self.done == self.total) {
            self.drawn_at = Some(Instant::now());
            let line = line(&self.label, self.done, self.total, self.started.elapsed());
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line}");
            let _ = err.flush();
        }
    }

    /// Ends the bar's line, so what follows starts on its own.
    pub fn finish(&mut self) {
        if self.draw && self.drawn_at.is_some() {
            eprintln!();
        }
    }
}

/// `label [#########...........]  450/1000  45%  3.2 s`
pub fn line(label: &str, done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 30;
    // Nothing to do is all done.
    let filled = done
        .saturating_mul(WIDTH)
        .checked_div(total)
        .unwrap_or(WIDTH);
    let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
    let bar: String = (0..WIDTH)
        .map(|i| if i < filled { '#' } else { '.' })
        .collect();
    format!(
        "{label} [{bar}] {done:>w$}/{total} {pct:>3}% {:.1} s",
        elapsed.as_secs_f64(),
        w = total.to_string().len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_work() {
        let l = line("posting", 450, 1000, Duration::from_millis(3200));
        assert_eq!(
            l,
            "posting [#############.................]  450/1000  45% 3.2 s"
        );
        assert!(line("x", 0, 0, Duration::ZERO).contains("100%"));
        assert!(line("x", 7, 7, Duration::ZERO).contains("[##############################]"));
    }
}
