//! Problems that last (a modem unplugged overnight, a broker unreachable, a webhook endpoint
//! down) in the log: one clear line when the problem starts or its reason changes, the
//! repeats quiet (debug), a reminder every while it lasts, and one line when it is over. So
//! the log of a healthy system stays quiet and a broken one says what is wrong without
//! burying it.

use std::time::{Duration, Instant};

/// How long a lasting problem stays quiet before it is logged again.
pub const REMIND_EVERY: Duration = Duration::from_secs(15 * 60);

/// How loud to log an occurrence of a problem (see [`Problem::occurred`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// It started, or its reason changed: warn, with what to check.
    Start,
    /// It still lasts: warn, saying since when and how often it recurred.
    Remind {
        /// Since it started.
        since: Duration,
        /// Occurrences so far.
        count: u64,
    },
    /// A repeat: debug.
    Quiet,
}

impl Say {
    /// Whether this occurrence is worth a warning.
    pub fn loud(&self) -> bool {
        !matches!(self, Say::Quiet)
    }
}

/// One problem that may last and recur.
#[derive(Debug, Clone)]
pub struct Problem {
    remind: Duration,
    ongoing: Option<Ongoing>,
}

#[derive(Debug, Clone)]
struct Ongoing {
    reason: String,
    since: Instant,
    count: u64,
    last_loud: Instant,
}

/// A problem that is over: how long it lasted, how often it occurred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    /// From its first occurrence to now.
    pub lasted: Duration,
    /// Occurrences.
    pub count: u64,
}

impl Default for Problem {
    fn default() -> Self {
        Problem::new(REMIND_EVERY)
    }
}

impl Problem {
    /// A problem reminded of every `remind` while it lasts.
    pub fn new(remind: Duration) -> Problem {
        Problem {
            remind,
            ongoing: None,
        }
    }

    /// It occurred (again) for `reason`: how loud to say so.
    pub fn occurred(&mut self, reason: &str) -> Say {
        let now = Instant::now();
        match &mut self.ongoing {
            Some(o) if o.reason == reason => {
                o.count += 1;
                if now.duration_since(o.last_loud) >= self.remind {
                    o.last_loud = now;
                    Say::Remind {
                        since: now.duration_since(o.since),
                        count: o.count,
                    }
                } else {
                    Say::Quiet
                }
            }
            Some(o) => {
                o.reason = reason.to_owned();
                o.count += 1;
                o.last_loud = now;
                Say::Start
            }
            None => {
                self.ongoing = Some(Ongoing {
                    reason: reason.to_owned(),
                    since: now,
                    count: 1,
                    last_loud: now,
                });
                Say::Start
            }
        }
    }

    /// It is over: `Some` when it had occurred (log that it is over), `None` when all was well.
    pub fn cleared(&mut self) -> Option<Over> {
        self.ongoing.take().map(|o| Over {
            lasted: o.since.elapsed(),
            count: o.count,
        })
    }

    /// Whether it is going on.
    pub fn ongoing(&self) -> bool {
        self.ongoing.is_some()
    }
}

/// `d` for a person: `45 s`, `12 min`, `3 h 5 min`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loud_at_start_on_change_and_reminder_quiet_otherwise() {
        let mut p = Problem::new(Duration::from_millis(50));
        assert_eq!(p.occurred("refused"), Say::Start);
        for _ in 0..10 {
            assert_eq!(p.occurred("refused"), Say::Quiet);
        }
        assert_eq!(p.occurred("timed out"), Say::Start, "a new reason is news");
        std::thread::sleep(Duration::from_millis(60));
        assert!(matches!(
            p.occurred("timed out"),
            Say::Remind { count: 13, .. }
        ));
        assert_eq!(p.occurred("timed out"), Say::Quiet);
        let over = p.cleared().expect("was ongoing");
        assert_eq!(over.count, 14);
        assert_eq!(p.cleared(), None);
        assert_eq!(p.occurred("refused"), Say::Start);
        assert_eq!(human(Duration::from_secs(3 * 3600 + 300)), "3 h 5 min");
    }
}
