//! The shop's activity on the box: tills' posts stored durably through the journal, once per
//! id, and handed to the push process in order.
//!
//! One thread owns the writes. It takes every post waiting when the previous commit ends
//! (and, with a batch window, those arriving within it) into the next commit, so under load
//! one fsync carries many sales while a lone sale waits only for its own.
//!
//! The push mark (the last event the hub has) lives in memory and is saved to the database on
//! a period and at shutdown: losing it in a power cut only repeats a push the hub deduplicates.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::oneshot;

use crate::journal::{Appended, DirStore, Journal};
use crate::storage::{BoxStore, StoredEvent};

/// Size of one journal segment file.
pub const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;

/// Whether a posted event was new or already stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New { seq: u64 },
    Duplicate { seq: u64 },
}

/// Why an event could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    #[error("the activity journal could not store the event: {0}")]
    Journal(String),
    #[error("the activity writer has stopped")]
    WriterGone,
}

/// How much activity waits for the hub.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PendingActivity {
    pub pending: u64,
    pub pushed_through: u64,
    pub oldest_pending_ms: Option<i64>,
}

/// What the journal has written, for flash accounting.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct JournalStats {
    pub bytes_written: u64,
    pub commits: u64,
    pub segments: usize,
    pub direct_io: bool,
}

struct WriteRequest {
    event: StoredEvent,
    reply: oneshot::Sender<Result<Stored, String>>,
}

/// The activity store.
pub struct Activity {
    journal: Arc<Mutex<Journal>>,
    store: Arc<BoxStore>,
    tx: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    /// Joined by [`Activity::close`], so every post already queued is committed first.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    direct_io: bool,
}

impl Activity {
    /// Opens the journal under `data_dir/journal` and starts the writer thread.
    pub fn open(
        data_dir: &Path,
        store: Arc<BoxStore>,
        batch_max: usize,
        batch_window: Duration,
    ) -> anyhow::Result<Activity> {
        let dir = data_dir.join("journal");
        let files = DirStore::new(dir.clone())
            .with_context(|| format!("opening the activity journal in {}", dir.display()))?;
        let direct_io = files.is_direct();
        let pushed = store.pushed_through()?;
        let started = Instant::now();
        let (journal, recovery) = Journal::open(Box::new(files), SEGMENT_BYTES, pushed)
            .with_context(|| format!("recovering the activity journal in {}", dir.display()))?;
        tracing::info!(
            "activity journal: {} events in {} segments recovered in {} ms, {} waiting for the hub",
            recovery.events,
            recovery.segments,
            started.elapsed().as_millis(),
            journal.pending().0
        );
        let journal = Arc::new(Mutex::new(journal));
        let (tx, rx) = mpsc::channel::<WriteRequest>();
        let writer_journal = journal.clone();
        let writer = std::thread::Builder::new()
            .name("activity-writer".into())
            .spawn(move || writer_loop(writer_journal, rx, batch_max, batch_window))
            .context("starting the activity writer thread")?;
        Ok(Activity {
            journal,
            store,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            direct_io,
        })
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        // A panic while holding the lock cannot leave the journal half-changed in memory in
        // a way that matters more than stopping would: carry on with it.
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores an event durably (synced when this returns `Ok`), once per id.
    pub async fn store(&self, event: StoredEvent) -> Result<Stored, ActivityError> {
        let (reply, answer) = oneshot::channel();
        {
            let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
            let tx = tx.as_ref().ok_or(ActivityError::WriterGone)?;
            tx.send(WriteRequest { event, reply })
                .map_err(|_| ActivityError::WriterGone)?;
        }
        match answer.await {
            Ok(Ok(stored)) => Ok(stored),
            Ok(Err(message)) => Err(ActivityError::Journal(message)),
            Err(_) => Err(ActivityError::WriterGone),
        }
    }

    /// Up to `limit` events the hub does not have yet, oldest first, with their seq.
    pub fn unpushed(&self, limit: usize) -> anyhow::Result<Vec<(u64, StoredEvent)>> {
        self.journal()
            .unpushed(limit)
            .context("reading the activity journal")
    }

    /// Records that the hub has every event up to `seq` (in memory; see [`Self::save_mark`]).
    pub fn mark_pushed(&self, seq: u64) {
        self.journal().mark_pushed(seq);
    }

    /// Saves the push mark to the database if it moved.
    pub fn save_mark(&self) -> anyhow::Result<()> {
        let seq = self.journal().pushed_through();
        self.store
            .save_pushed_through(seq)
            .context("saving the activity push mark")
    }

    pub fn pending(&self) -> PendingActivity {
        let journal = self.journal();
        let (pending, oldest_pending_ms) = journal.pending();
        PendingActivity {
            pending,
            pushed_through: journal.pushed_through(),
            oldest_pending_ms,
        }
    }

    pub fn stats(&self) -> JournalStats {
        let journal = self.journal();
        JournalStats {
            bytes_written: journal.bytes_written,
            commits: journal.commits,
            segments: journal.segment_count(),
            direct_io: self.direct_io,
        }
    }

    /// Stops taking posts; the writer commits every post already queued, then ends. Then
    /// saves the push mark.
    pub fn close(&self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        // With the only sender gone the writer drains the queue and returns.
        let writer = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(writer) = writer {
            if writer.join().is_err() {
                tracing::error!("the activity writer thread panicked");
            }
        }
        if let Err(e) = self.save_mark() {
            tracing::warn!("{e:#}");
        }
    }
}

fn writer_loop(
    journal: Arc<Mutex<Journal>>,
    rx: mpsc::Receiver<WriteRequest>,
    batch_max: usize,
    window: Duration,
) {
    loop {
        // Beats on every pass, and at least every tick while no till posts, for the watchdog.
        crate::watchdog::beat(crate::watchdog::Loop::Writer);
        let first = match rx.recv_timeout(crate::watchdog::TICK) {
            Ok(request) => request,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        let deadline = Instant::now() + window;
        while batch.len() < batch_max {
            let next = if window.is_zero() {
                rx.try_recv().ok()
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                rx.recv_timeout(left).ok()
            };
            match next {
                Some(request) => batch.push(request),
                None => break,
            }
        }
        let events: Vec<StoredEvent> = batch.iter().map(|r| r.event.clone()).collect();
        let result = journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&events);
        match result {
            Ok(outcomes) => {
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    let stored = match outcome {
                        Appended::New { seq } => Stored::New { seq },
                        Appended::Duplicate { seq } => Stored::Duplicate { seq },
                    };
                    let _ = request.reply.send(Ok(stored));
                }
            }
            Err(e) => {
                tracing::error!("activity journal commit failed: {e}");
                let message = e.to_string();
                for request in batch {
                    let _ = request.reply.send(Err(message.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ev(id: &str) -> StoredEvent {
        StoredEvent {
            id: id.into(),
            received_at_ms: 5,
            event: format!(r#"{{"id":"{id}"}}"#),
        }
    }

    #[tokio::test]
    async fn events_are_stored_once_and_pending_until_pushed_and_the_mark_survives() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(BoxStore::open(dir.path(), 4).unwrap());
        let activity =
            Activity::open(dir.path(), store.clone(), 8, Duration::from_millis(1)).unwrap();
        assert_eq!(
            activity.store(ev("x")).await.unwrap(),
            Stored::New { seq: 1 }
        );
        assert_eq!(
            activity.store(ev("y")).await.unwrap(),
            Stored::New { seq: 2 }
        );
        assert_eq!(
            activity.store(ev("x")).await.unwrap(),
            Stored::Duplicate { seq: 1 }
        );
        assert_eq!(activity.pending().pending, 2);
        assert_eq!(activity.unpushed(1).unwrap()[0].1.id, "x");
        activity.mark_pushed(1);
        let pending = activity.pending();
        assert_eq!((pending.pending, pending.pushed_through), (1, 1));
        activity.close();
        assert!(activity.store(ev("z")).await.is_err());
        drop(activity);

        let again = Activity::open(dir.path(), store, 8, Duration::ZERO).unwrap();
        let pending = again.pending();
        assert_eq!((pending.pending, pending.pushed_through), (1, 1));
        assert_eq!(again.unpushed(10).unwrap()[0].1.id, "y");
        assert_eq!(
            again.store(ev("y")).await.unwrap(),
            Stored::Duplicate { seq: 2 }
        );
    }
}
