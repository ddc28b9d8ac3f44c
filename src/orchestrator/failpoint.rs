//! Named crash points for the crash-safety tests: `JOURNEYMAN_FAILPOINT=<name>[:<n>]`
//! kills the process (SIGKILL, like a power cut: no destructors, no flush) the n-th time
//! the point is reached (default: the first).
//!
//! Compiled in debug builds and with the `failpoints` feature only; in release builds the
//! calls are empty and the environment variable is ignored.

/// The points, in the order a message meets them.
pub const POINTS: [&str; 4] = [
    "before_commit",
    "after_flush_before_ack",
    "after_ack_before_publish",
    "after_confirm_before_clear",
];

#[cfg(any(debug_assertions, feature = "failpoints"))]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Armed {
        name: String,
        at: u64,
        hits: AtomicU64,
    }

    fn armed() -> Option<&'static Armed> {
        static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
        ARMED
            .get_or_init(|| {
                let v = std::env::var("JOURNEYMAN_FAILPOINT").ok()?;
                let (name, at) = match v.split_once(':') {
                    Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
                    None => (v, 1),
                };
                Some(Armed {
                    name,
                    at,
                    hits: AtomicU64::new(0),
                })
            })
            .as_ref()
    }

    pub fn hit(name: &str) {
        if let Some(a) = armed()
            && a.name == name
            && a.hits.fetch_add(1, Ordering::SeqCst) + 1 == a.at
        {
            eprintln!("failpoint {name} reached: killing the process");
            // SAFETY: sending a signal to ourselves has no memory-safety preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
    }
}

#[cfg(not(any(debug_assertions, feature = "failpoints")))]
mod imp {
    #[inline(always)]
    pub fn hit(_name: &str) {}
}

/// Marks a crash point; see the module documentation.
#[inline]
pub fn hit(name: &str) {
    imp::hit(name)
}
