//! The host side of the `progress` import (0.4.0): a plugin's reports of how far its `apply`
//! is, filtered so that no plugin can flood whoever watches the run.
//!
//! A guest may call `progress.report` in a tight loop or with a message of many megabytes. The
//! import must stay cheap and bounded whatever it does: [`ProgressGate::offer`] keeps the first
//! report, the first that reaches its total, and otherwise at most one report per
//! [`INTERVAL`], [`MAX_REPORTS`] in all per call; only a kept report's message is looked at
//! (its first [`MESSAGE_MAX`] characters, escaped by [`crate::display_safe`]). Kept reports go
//! into a bounded channel without blocking (a full channel drops the report): the guest never
//! waits for the front end. The runtime drains the channel on a helper thread while the guest
//! runs, because the run's event sink is borrowed by the caller and cannot enter the Store.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

/// Shortest time between two kept reports (after the first).
pub const INTERVAL: Duration = Duration::from_millis(200);
/// Most reports kept from one plugin call: a day-long call at one report per [`INTERVAL`]
/// would otherwise store 400,000 events in the daemon.
pub const MAX_REPORTS: usize = 2_000;
/// Most characters of a message kept (a bar's label, not a log).
pub const MESSAGE_MAX: usize = 160;
/// Reports waiting for the front end at most; more are dropped, never waited for.
const CHANNEL: usize = 64;

/// One progress report, as the host passes it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Units of work finished, at most `total` when `total` is known.
    pub done: u64,
    /// Units of work in all; 0 = unknown.
    pub total: u64,
    /// What the plugin is doing, terminal-safe and at most [`MESSAGE_MAX`] characters.
    pub message: String,
}

/// Filters one call's reports and hands the kept ones to the channel.
pub struct ProgressGate {
    tx: SyncSender<Progress>,
    last: Option<Instant>,
    kept: usize,
    reached_total: bool,
}

impl ProgressGate {
    /// A gate and the receiving end of its channel.
    pub fn new() -> (Self, Receiver<Progress>) {
        let (tx, rx) = sync_channel(CHANNEL);
        (
            ProgressGate {
                tx,
                last: None,
                kept: 0,
                reached_total: false,
            },
            rx,
        )
    }

    /// A report from the guest: kept (and sent) or dropped, in constant time apart from the
    /// kept message's first [`MESSAGE_MAX`] characters.
    pub fn offer(&mut self, done: u64, total: u64, message: &str) {
        let done = if total > 0 { done.min(total) } else { done };
        let now = Instant::now();
        let finishes = total > 0 && done == total && !self.reached_total;
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= INTERVAL);
        if !(finishes || (due && self.kept < MAX_REPORTS)) {
            return;
        }
        self.reached_total |= finishes;
        self.last = Some(now);
        self.kept += 1;
        let report = Progress {
            done,
            total,
            message: crate::display_safe::line(message, MESSAGE_MAX),
        };
        match self.tx.try_send(report) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tight_loop_keeps_the_first_report_and_the_one_that_finishes() {
        let (mut gate, rx) = ProgressGate::new();
        for i in 0..=1_000_000u64 {
            gate.offer(i, 1_000_000, "step");
        }
        drop(gate);
        let kept: Vec<Progress> = rx.iter().collect();
        // A million calls take far less than 200 ms each: the first and the last remain (a
        // slow machine may keep a few in between).
        assert!(kept.len() >= 2 && kept.len() < 50, "{}", kept.len());
        assert_eq!(kept[0].done, 0);
        assert_eq!(kept.last().map(|p| p.done), Some(1_000_000));
    }

    #[test]
    fn messages_are_capped_and_escaped_and_done_never_exceeds_total() {
        let (mut gate, rx) = ProgressGate::new();
        let huge = format!("\u{1b}[2J{}", "x".repeat(16 << 20));
        gate.offer(7, 3, &huge);
        drop(gate);
        let p = rx.recv().unwrap();
        assert_eq!((p.done, p.total), (3, 3));
        assert!(!p.message.contains('\u{1b}'), "{:.40}", p.message);
        assert!(
            p.message.len() < 2 * MESSAGE_MAX + 64,
            "{}",
            p.message.len()
        );
    }

    #[test]
    fn unknown_totals_pass_done_through_and_a_full_channel_never_blocks() {
        let (mut gate, rx) = ProgressGate::new();
        gate.offer(5, 0, "warming up");
        assert_eq!(rx.recv().unwrap().done, 5);
        // Nobody reads: reports past the channel's capacity are dropped, the guest goes on.
        for i in 0..(CHANNEL as u64 * 4) {
            gate.last = None;
            gate.offer(i, 0, "");
        }
        assert_eq!(rx.try_iter().count(), CHANNEL);
    }
}
