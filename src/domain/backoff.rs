//! Retry delays for failed tasks: the [`BackoffPolicy`] a playbook declares per task and the
//! pure [`retry_delay`] function that turns "attempt N just failed" into "wait this long".
//!
//! This module owns only arithmetic. It must not read the clock, draw random numbers, sleep
//! or arm timers: the orchestrator draws the jitter sample, persists the resulting delay with
//! the task, and arms the timer itself, so a restarted orchestrator resumes the same schedule.
//!
//! We deliberately do not use `backon` here. Its backoff iterators draw their own randomness
//! and keep their position in memory, so the schedule can be neither reproduced in a test nor
//! stored and resumed after a crash. `backon` remains the right tool for in-process reconnect
//! loops (broker connections), where nothing needs to survive a restart.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long to wait between attempts of one task.
///
/// Deserialising fills missing fields from [`BackoffPolicy::default`], so a playbook can
/// override just `initial` or `max`; [`BackoffPolicy::validate`] then checks the combination.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackoffPolicy {
    /// Delay after the first failure; the base every later delay grows from.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Ceiling for any delay, jitter included, so a long outage never parks a task for hours.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per failed attempt; 1.0 means a constant delay.
    pub multiplier: f64,
    /// Fraction 0..=1 of the delay that is randomised, so that tasks failing together (one
    /// agent down) do not all retry in the same instant.
    pub jitter: f64,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl BackoffPolicy {
    /// Checks the policy at load time, so a bad playbook is rejected before any journey uses
    /// it. [`retry_delay`] still copes with invalid policies (it saturates) because a stored
    /// policy may predate a tightening of these rules.
    pub fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("backoff initial must be greater than zero".to_owned());
        }
        if self.max < self.initial {
            return Err(format!(
                "backoff max ({}) must be at least initial ({})",
                humantime_serde::re::humantime::format_duration(self.max),
                humantime_serde::re::humantime::format_duration(self.initial),
            ));
        }
        // Written as negated `>=` / `contains` so that NaN fails the check.
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(format!(
                "backoff multiplier must be a finite number >= 1, got {}",
                self.multiplier
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!(
                "backoff jitter must be between 0 and 1, got {}",
                self.jitter
            ));
        }
        Ok(())
    }
}

/// The delay before retrying after attempt number `attempt` (1-based) failed.
///
/// The undithered delay is `min(max, initial * multiplier^(attempt - 1))`; it is then scaled by
/// `1 - jitter + 2 * jitter * jitter_sample`, i.e. spread uniformly over
/// `delay * (1 ± jitter)`, and capped at `max` again. The caller supplies `jitter_sample`
/// (uniform in `[0, 1)`) so the result can be tested and persisted; out-of-range samples are
/// clamped and NaN counts as 0.
///
/// Total for every input: huge attempts saturate at `max`, and an odd policy (multiplier
/// below 1 or NaN, jitter outside 0..=1) is read as the nearest sane one rather than
/// producing a negative, NaN or overflowing delay.
pub fn retry_delay(policy: &BackoffPolicy, attempt: u32, jitter_sample: f64) -> Duration {
    let multiplier = if policy.multiplier >= 1.0 {
        policy.multiplier // may be +inf: the product saturates and is capped below
    } else {
        1.0 // also catches NaN
    };
    let jitter = if policy.jitter.is_nan() {
        0.0
    } else {
        policy.jitter.clamp(0.0, 1.0)
    };
    let sample = if jitter_sample.is_nan() {
        0.0
    } else {
        jitter_sample.clamp(0.0, 1.0)
    };

    // Nanoseconds as f64: exact for any realistic policy, and the float saturates to +inf
    // instead of overflowing. `powf` with a base >= 1 is non-decreasing in the exponent.
    let max_ns = policy.max.as_nanos() as f64;
    let exponent = f64::from(attempt.saturating_sub(1));
    let grown = policy.initial.as_nanos() as f64 * multiplier.powf(exponent);
    let capped = if grown.is_nan() {
        max_ns
    } else {
        grown.min(max_ns)
    };
    let jittered = (capped * (1.0 - jitter + 2.0 * jitter * sample)).min(max_ns);

    // `as u64` saturates (and maps NaN to 0); the final `min` keeps us at or below `max` even
    // when `max` exceeds what u64 nanoseconds can hold or rounding went up.
    let delay = Duration::from_nanos(jittered.max(0.0).round() as u64);
    delay.min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn policy(initial: u64, max: u64, multiplier: f64, jitter: f64) -> BackoffPolicy {
        BackoffPolicy {
            initial: ms(initial),
            max: ms(max),
            multiplier,
            jitter,
        }
    }

    #[test]
    fn default_policy_is_valid() {
        let p = BackoffPolicy::default();
        assert_eq!(p.initial, Duration::from_secs(1));
        assert_eq!(p.max, Duration::from_secs(60));
        assert_eq!(p.multiplier, 2.0);
        assert_eq!(p.jitter, 0.2);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn delay_table() {
        let demo = policy(200, 5_000, 2.0, 0.0);
        let jittery = policy(1_000, 60_000, 2.0, 0.2);
        let cases: &[(&str, BackoffPolicy, u32, f64, Duration)] = &[
            ("first failure waits initial", demo, 1, 0.5, ms(200)),
            ("attempt 0 is treated as 1", demo, 0, 0.5, ms(200)),
            ("doubles", demo, 2, 0.5, ms(400)),
            ("doubles again", demo, 3, 0.5, ms(800)),
            ("capped at max", demo, 6, 0.5, ms(5_000)),
            ("huge attempt saturates", demo, u32::MAX, 0.5, ms(5_000)),
            ("sample 0.5 is the centre", jittery, 1, 0.5, ms(1_000)),
            ("sample 0 is the low edge", jittery, 1, 0.0, ms(800)),
            ("sample 1 is the high edge", jittery, 2, 1.0, ms(2_400)),
            ("sample above 1 is clamped", jittery, 1, 7.0, ms(1_200)),
            ("negative sample is clamped", jittery, 1, -3.0, ms(800)),
            ("NaN sample counts as 0", jittery, 1, f64::NAN, ms(800)),
            ("jitter never exceeds max", jittery, 100, 1.0, ms(60_000)),
            ("jitter may go below max", jittery, 100, 0.0, ms(48_000)),
            (
                "multiplier 1 is constant",
                policy(300, 5_000, 1.0, 0.0),
                9,
                0.5,
                ms(300),
            ),
            (
                "multiplier below 1 read as 1",
                policy(300, 5_000, 0.1, 0.0),
                9,
                0.5,
                ms(300),
            ),
            (
                "NaN multiplier read as 1",
                policy(300, 5_000, f64::NAN, 0.0),
                9,
                0.5,
                ms(300),
            ),
            (
                "infinite multiplier saturates",
                policy(300, 5_000, f64::INFINITY, 0.0),
                2,
                0.5,
                ms(5_000),
            ),
            (
                "jitter above 1 clamped",
                policy(1_000, 5_000, 1.0, 9.0),
                1,
                0.0,
                ms(0),
            ),
            (
                "negative jitter clamped",
                policy(1_000, 5_000, 1.0, -1.0),
                1,
                0.0,
                ms(1_000),
            ),
            (
                "NaN jitter read as 0",
                policy(1_000, 5_000, 1.0, f64::NAN),
                1,
                0.0,
                ms(1_000),
            ),
            (
                "max below initial wins",
                policy(1_000, 10, 2.0, 0.0),
                1,
                0.5,
                ms(10),
            ),
        ];
        for (label, p, attempt, sample, want) in cases {
            assert_eq!(retry_delay(p, *attempt, *sample), *want, "{label}");
        }
    }

    #[test]
    fn extreme_durations_do_not_panic() {
        let p = BackoffPolicy {
            initial: Duration::MAX,
            max: Duration::MAX,
            multiplier: f64::MAX,
            jitter: 1.0,
        };
        for attempt in [0, 1, 2, 1_000, u32::MAX] {
            for sample in [0.0, 0.5, 1.0] {
                assert!(retry_delay(&p, attempt, sample) <= Duration::MAX);
            }
        }
        let zero = BackoffPolicy {
            initial: Duration::ZERO,
            max: Duration::ZERO,
            ..BackoffPolicy::default()
        };
        assert_eq!(retry_delay(&zero, u32::MAX, 1.0), Duration::ZERO);
    }

    #[test]
    fn validate_rejects_bad_policies() {
        let cases: &[(BackoffPolicy, &str)] = &[
            (
                policy(0, 5_000, 2.0, 0.2),
                "initial must be greater than zero",
            ),
            (
                policy(1_000, 500, 2.0, 0.2),
                "max (500ms) must be at least initial (1s)",
            ),
            (
                policy(100, 500, 0.5, 0.2),
                "multiplier must be a finite number >= 1, got 0.5",
            ),
            (
                policy(100, 500, f64::NAN, 0.2),
                "multiplier must be a finite number >= 1",
            ),
            (
                policy(100, 500, f64::INFINITY, 0.2),
                "multiplier must be a finite number >= 1",
            ),
            (
                policy(100, 500, 2.0, 1.5),
                "jitter must be between 0 and 1, got 1.5",
            ),
            (
                policy(100, 500, 2.0, -0.1),
                "jitter must be between 0 and 1",
            ),
            (
                policy(100, 500, 2.0, f64::NAN),
                "jitter must be between 0 and 1",
            ),
        ];
        for (p, want) in cases {
            let err = p.validate().expect_err(want);
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
        assert_eq!(policy(100, 100, 1.0, 0.0).validate(), Ok(()));
        assert_eq!(policy(100, 500, 3.0, 1.0).validate(), Ok(()));
    }

    #[test]
    fn serde_uses_human_durations_and_defaults_missing_fields() {
        let p: BackoffPolicy = serde_norway::from_str("{ initial: 200ms, max: 5s }").unwrap();
        assert_eq!(p, policy(200, 5_000, 2.0, 0.2));
        let json = serde_json::to_value(p).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"initial": "200ms", "max": "5s", "multiplier": 2.0, "jitter": 0.2})
        );
        let back: BackoffPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        assert!(serde_norway::from_str::<BackoffPolicy>("{ initail: 1s }").is_err());
    }

    fn valid_policy() -> impl Strategy<Value = BackoffPolicy> {
        (
            1u64..10_000_000,
            0u64..1_000_000_000,
            1.0f64..10.0,
            0.0f64..=1.0,
        )
            .prop_map(|(initial_us, extra_us, multiplier, jitter)| BackoffPolicy {
                initial: Duration::from_micros(initial_us),
                max: Duration::from_micros(initial_us + extra_us),
                multiplier,
                jitter,
            })
    }

    proptest! {
        #[test]
        fn without_jitter_delays_never_shrink(p in valid_policy(), attempt in 0u32..200) {
            let p = BackoffPolicy { jitter: 0.0, ..p };
            let now = retry_delay(&p, attempt, 0.5);
            let next = retry_delay(&p, attempt + 1, 0.5);
            prop_assert!(now <= next, "{now:?} > {next:?}");
            prop_assert!(now >= p.initial.min(p.max));
        }

        #[test]
        fn delays_stay_within_max_and_jitter_band(
            p in valid_policy(),
            attempt in prop_oneof![0u32..100, Just(u32::MAX)],
            sample in 0.0f64..1.0,
        ) {
            let delay = retry_delay(&p, attempt, sample);
            prop_assert!(delay <= p.max);
            let centre = retry_delay(&BackoffPolicy { jitter: 0.0, ..p }, attempt, sample);
            let low = centre.as_secs_f64() * (1.0 - p.jitter);
            let high = (centre.as_secs_f64() * (1.0 + p.jitter)).min(p.max.as_secs_f64());
            let d = delay.as_secs_f64();
            // One nanosecond of slack for rounding to whole nanoseconds.
            prop_assert!(d >= low - 1e-9 && d <= high + 1e-9, "{d} not in [{low}, {high}]");
        }
    }
}
