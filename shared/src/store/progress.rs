//! How a pull reports itself: a live bar per layer on a terminal, a few concise lines
//! otherwise (job output must not fill with bars), or nothing. Owns stderr output
//! during a pull; never decides anything about the pull itself.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// The caller's choice of progress output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// A live bar per layer on stderr.
    Bars,
    /// One line when a pull starts and one when it ends, on stderr.
    Lines,
    /// Nothing.
    Silent,
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn auto() -> Progress {
        if std::io::stderr().is_terminal() {
            Progress::Bars
        } else {
            Progress::Lines
        }
    }
}

/// One pull's reporter, shared by the layer threads.
pub(crate) struct Reporter {
    mode: Progress,
    multi: Option<MultiProgress>,
    started: Instant,
    reference: String,
}

/// One layer's bar (or nothing).
pub(crate) struct LayerBar {
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub(crate) fn new(mode: Progress, reference: &str) -> Reporter {
        let multi = (mode == Progress::Bars).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Reporter { mode, multi, started: Instant::now(), reference: reference.to_string() }
    }

    pub(crate) fn start(&self, layers_to_fetch: usize, layers: usize, bytes: u64) {
        if self.mode == Progress::Lines {
            line(&format!(
                "pulling {}: {layers_to_fetch} of {layers} layers to fetch, {}",
                self.reference,
                human_bytes(bytes)
            ));
        }
    }

    pub(crate) fn layer(&self, digest: &str, size: u64) -> LayerBar {
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.add(ProgressBar::new(size));
            let style = ProgressStyle::with_template("{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(short(digest).to_string());
            bar
        });
        LayerBar { bar }
    }

    pub(crate) fn finish(&self, manifest_digest: &str) {
        if self.mode == Progress::Lines {
            line(&format!(
                "pulled {} ({}) in {:.1}s",
                self.reference,
                short(manifest_digest),
                self.started.elapsed().as_secs_f64()
            ));
        }
    }
}

impl LayerBar {
    pub(crate) fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub(crate) fn phase(&self, what: &'static str) {
        if let Some(b) = &self.bar {
            b.set_message(what);
        }
    }

    pub(crate) fn restart(&self) {
        if let Some(b) = &self.bar {
            b.set_position(0);
        }
    }

    pub(crate) fn done(&self, what: &'static str) {
        if let Some(b) = &self.bar {
            b.finish_with_message(what);
        }
    }
}

fn line(text: &str) {
    let _ = writeln!(std::io::stderr(), "berth: {text}");
}

/// `sha256:0123456789ab` (the first 12 hex digits).
pub fn short(digest: &str) -> &str {
    let end = "sha256:".len() + 12;
    digest.get(..end).unwrap_or(digest)
}

/// Sizes as people read them (`12.3 MiB`).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_digests_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 + 100), "3.0 MiB");
        assert_eq!(short("sha256:0123456789abcdef0123"), "sha256:0123456789ab");
        assert_eq!(short("x"), "x");
    }
}
