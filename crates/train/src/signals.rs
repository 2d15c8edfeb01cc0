//! Stop requests from a scheduler or a person: the first SIGTERM or SIGINT sets
//! a flag that the training loop reads between steps (it then finishes the step,
//! writes a checkpoint and returns, and the binary exits with 128 + the signal
//! number); a second one ends the process at once with that status, after one
//! line saying that no checkpoint of the current step was written and which
//! checkpoint a restart resumes from (the trainer keeps that up to date).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::{Error, Result};

/// Whether, and by which signal, the run was asked to stop.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    signo: Arc<AtomicUsize>,
    /// What a restart would continue from, in words, for the second signal's line.
    restart: Arc<Mutex<String>>,
}

impl StopSignal {
    /// A stop that only [`StopSignal::request`] triggers (no handlers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the SIGTERM and SIGINT handlers for this process. They only
    /// queue the signal; a thread of their own acts on it, so that the
    /// second signal's line is printed by ordinary code, not in a handler.
    pub fn install() -> Result<Self> {
        let stop = Self::new();
        let io = |err| Error::Io { path: "installing the SIGTERM and SIGINT handlers".into(), err };
        let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(io)?;
        let seen = stop.clone();
        std::thread::Builder::new()
            .name("stop-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if seen.requested().is_none() {
                        seen.request(sig);
                        continue;
                    }
                    let restart = seen.restart.lock().map(|r| r.clone()).unwrap_or_default();
                    let restart =
                        if restart.is_empty() { "a restart starts from the beginning".into() } else { restart };
                    println!(
                        "stopped at once by a second {}, without a checkpoint of the current step; {restart}",
                        signal_name(sig)
                    );
                    // Without running exit handlers: other threads may be inside the GPU runtime.
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                    signal_hook::low_level::exit(128 + sig);
                }
            })
            .map_err(io)?;
        Ok(stop)
    }

    /// The number of the signal that asked for a stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        match self.signo.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s as i32),
        }
    }

    pub fn request(&self, signo: i32) {
        self.signo.store(signo as usize, Ordering::SeqCst);
    }

    /// Records what a restart would continue from (e.g. "a restart resumes
    /// from checkpoint runs/x/checkpoints/step_00000100"), for the line of a second signal.
    pub fn set_restart_point(&self, words: String) {
        if let Ok(mut r) = self.restart.lock() {
            *r = words;
        }
    }
}

pub fn signal_name(signo: i32) -> String {
    match signo {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        s => format!("signal {s}"),
    }
}
