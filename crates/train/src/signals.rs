//! Stop requests from a scheduler or a person: the first SIGTERM or SIGINT sets
//! a flag that the training loop reads between steps (it then finishes the step,
//! writes a checkpoint and returns, and the binary exits with 128 + the signal
//! number); a second one ends the process at once with that status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

use crate::{Error, Result};

/// Whether, and by which signal, the run was asked to stop.
#[derive(Debug, Clone, Default)]
pub struct StopSignal {
    signo: Arc<AtomicUsize>,
}

impl StopSignal {
    /// A stop that only [`StopSignal::request`] triggers (no handlers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the SIGTERM and SIGINT handlers for this process.
    pub fn install() -> Result<Self> {
        let stop = Self::new();
        let armed = Arc::new(AtomicBool::new(false));
        for sig in [SIGTERM, SIGINT] {
            let io = |err| Error::Io { path: format!("installing the {} handler", signal_name(sig)), err };
            // The order matters: the exit checks the flag that the first signal sets.
            flag::register_conditional_shutdown(sig, 128 + sig, Arc::clone(&armed)).map_err(io)?;
            flag::register_usize(sig, Arc::clone(&stop.signo), sig as usize).map_err(io)?;
            flag::register(sig, Arc::clone(&armed)).map_err(io)?;
        }
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
}

pub fn signal_name(signo: i32) -> String {
    match signo {
        SIGTERM => "SIGTERM".into(),
        SIGINT => "SIGINT".into(),
        s => format!("signal {s}"),
    }
}
