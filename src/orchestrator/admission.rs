//! Admission of new journeys: at most `limit` journeys have work running at once.
//!
//! Why: task deadlines start at dispatch. When far more journeys start at once than the
//! agents can serve (100,000 `journey.start` in one burst), requests wait in the agents'
//! queues longer than their deadline, every attempt times out, the retries add load, and
//! the system stalls. Holding back `journey.start` deliveries instead leaves the backlog
//! where it is safe and costs nothing: in the broker's durable queue. The consumer of
//! that queue stops pulling (its prefetch fills) until running journeys finish.
//!
//! Only new journeys are held: commands and replies for journeys already admitted always
//! flow, so an admitted journey can always finish and free its place.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Admission {
    /// 0: no limit.
    limit: usize,
    /// Journeys whose unit of work is running (kept by the core).
    active: AtomicUsize,
    /// `journey.start` deliveries let through but not yet handled by the core.
    reserved: AtomicUsize,
    /// Set while the session stops: waiting consumers give up their delivery.
    closed: AtomicBool,
    changed: Notify,
}

impl Admission {
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            ..Default::default()
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Journeys waiting to be handled after being let through.
    pub fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    /// The core's count of running journeys changed.
    pub fn set_active(&self, n: usize) {
        let before = self.active.swap(n, Ordering::AcqRel);
        if n < before {
            self.changed.notify_waiters();
        }
    }

    /// A let-through start was handled (applied or refused).
    pub fn settle(&self) {
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1));
        self.changed.notify_waiters();
    }

    /// Takes a place for one new journey without waiting.
    pub fn try_reserve(&self) -> bool {
        if self.limit == 0 {
            self.reserved.fetch_add(1, Ordering::AcqRel);
            return true;
        }
        let active = self.active.load(Ordering::Acquire);
        self.reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (active + r < self.limit).then_some(r + 1)
            })
            .is_ok()
    }

    /// Waits for a place for one new journey. `false` when the session is stopping: the
    /// caller drops its delivery unacked and the broker requeues it.
    pub async fn reserve(&self) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                return false;
            }
            if self.try_reserve() {
                return true;
            }
            changed.await;
        }
    }

    /// Stops letting starts through (the session is draining).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// A new broker session: nothing is let through yet, and nothing is closed.
    pub fn reopen(&self) {
        self.reserved.store(0, Ordering::Release);
        self.closed.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn places_are_counted_across_active_and_reserved() {
        let a = Admission::new(3);
        a.set_active(1);
        assert!(a.try_reserve());
        assert!(a.try_reserve());
        assert!(!a.try_reserve(), "1 active + 2 reserved fill 3 places");
        a.settle(); // one start handled: it is now active
        a.set_active(2);
        assert!(!a.try_reserve());
        a.set_active(1);
        assert!(a.try_reserve());
    }

    #[test]
    fn no_limit_lets_everything_through() {
        let a = Admission::new(0);
        a.set_active(1_000_000);
        assert!((0..1000).all(|_| a.try_reserve()));
    }

    #[tokio::test]
    async fn a_waiting_start_is_let_through_when_a_journey_finishes() {
        let a = Arc::new(Admission::new(1));
        a.set_active(1);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.reserve().await }
        });
        // Not through while the one place is taken.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished(), "let through while full");
        a.set_active(0);
        let through = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("let through once a place frees")
            .unwrap();
        assert!(through);
        assert_eq!(a.reserved(), 1);
    }

    #[tokio::test]
    async fn closing_releases_a_waiting_consumer() {
        let a = Arc::new(Admission::new(1));
        a.set_active(1);
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.reserve().await }
        });
        tokio::task::yield_now().await;
        a.close();
        let through = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
        assert!(!through);
        a.reopen();
        a.set_active(0);
        assert!(a.try_reserve());
    }
}
