//! Logs captured in memory, for tests that read what the broker or the agent logged (each in a
//! test binary of its own: [`Captured::install`] sets the process-wide subscriber).

use std::sync::{Arc, Mutex, PoisonError};

/// Everything logged since [`Captured::install`].
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Captures every line at `level` and above from now on, without colours.
    pub fn install(level: tracing::Level) -> Captured {
        let logs = Captured::default();
        let sink = logs.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .init();
        logs
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}
