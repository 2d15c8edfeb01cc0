//! Where the run's lines go. On an interactive terminal a progress bar with the
//! ETA sits at the bottom and the metric lines scroll above it; otherwise (a
//! pipe, a file, a scheduler's log) only the plain lines, exactly as they were.
//! Ranks other than 0 print nothing.

use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Debug, Clone)]
pub struct Console {
    enabled: bool,
    bar: Option<ProgressBar>,
}

impl Console {
    pub fn plain() -> Self {
        Console { enabled: true, bar: None }
    }

    pub fn silent() -> Self {
        Console { enabled: false, bar: None }
    }

    /// Adds a bar over steps `start..=total` when stdout is a terminal.
    pub fn start_progress(&mut self, start: u64, total: u64) {
        if !self.enabled || !std::io::stdout().is_terminal() || std::env::var("TERM").is_ok_and(|t| t == "dumb") {
            return;
        }
        let style = ProgressStyle::with_template(
            "{spinner} step {pos}/{len} [{bar:30}] {percent}% {elapsed_precise} eta {eta_precise} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout())
            .with_style(style.progress_chars("=> "))
            .with_position(start);
        // Steps done before a resume are not this process's speed.
        bar.reset_eta();
        self.bar = Some(bar);
    }

    /// Moves the bar; `msg` is shown beside it.
    pub fn progress(&self, step: u64, msg: String) {
        if let Some(bar) = &self.bar {
            bar.set_position(step);
            bar.set_message(msg);
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// A line on stdout, flushed (above the bar if there is one).
    pub fn line(&self, line: &str) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(line),
            None => {
                let mut out = std::io::stdout().lock();
                // A closed stdout (a pipe whose reader left) must not kill the run.
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// A `warning: ...` line on stderr.
    pub fn warn(&self, msg: &str) {
        if !self.enabled {
            return;
        }
        let print = || eprintln!("warning: {msg}");
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }
}
