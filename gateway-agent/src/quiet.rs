//! Quiet hours (`agent.quiet_hours`): a daily window of the agent's local time in which jobs
//! outside the OTP lane wait. A one-time code never waits for the morning; a newsletter does.
//!
//! The window is `HH:MM-HH:MM` in the time zone of the machine (`TZ`, else `/etc/localtime`);
//! it may cross midnight (`21:00-07:00`). Its end is found again each time, so a change of
//! daylight saving time moves it with the clock.

use chrono::{DateTime, Duration as Span, NaiveTime, TimeZone};

/// A daily window, as minutes after midnight; `start != end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

fn minutes(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

impl Window {
    /// Reads `"21:00-07:00"`; `""` is no window. The error says what is wrong.
    pub fn parse(s: &str) -> Result<Option<Window>, String> {
        if s.trim().is_empty() {
            return Ok(None);
        }
        let bad = |why: &str| {
            format!(
                "agent.quiet_hours = {s:?}: {why}; write \"HH:MM-HH:MM\" in the machine's local \
                 time, e.g. \"21:00-07:00\", or \"\" for none"
            )
        };
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| bad("no '-' between start and end"))?;
        let start = minutes(a).ok_or_else(|| bad("the start is not a time from 00:00 to 23:59"))?;
        let end = minutes(b).ok_or_else(|| bad("the end is not a time from 00:00 to 23:59"))?;
        if start == end {
            return Err(bad("the start and the end are the same"));
        }
        Ok(Some(Window { start, end }))
    }

    fn contains(&self, minute: u32) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// When the window that holds `now` ends; `None` when `now` is outside it.
    pub fn until<Tz: TimeZone>(&self, now: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let local = now.naive_local();
        let minute = local
            .time()
            .signed_duration_since(NaiveTime::MIN)
            .num_minutes() as u32;
        if !self.contains(minute) {
            return None;
        }
        let end = NaiveTime::from_num_seconds_from_midnight_opt(self.end * 60, 0)?;
        let mut day = local.date();
        if minute >= self.end {
            day = day.succ_opt()?;
        }
        // The end's wall-clock time; when daylight saving skips it, the first minute after.
        let mut at = day.and_time(end);
        for _ in 0..180 {
            if let Some(t) = now.timezone().from_local_datetime(&at).earliest() {
                return Some(t);
            }
            at += Span::minutes(1);
        }
        None
    }

    /// How long jobs outside the OTP lane wait from `now` (local clock), if they do, and the
    /// words for the `held` event.
    pub fn hold(&self, text: &str) -> Option<(i64, String)> {
        let now = chrono::Local::now();
        let until = self.until(&now)?;
        let wait_ms = (until - now).num_milliseconds().max(0);
        Some((
            wait_ms,
            format!(
                "quiet hours (agent.quiet_hours = {text:?}): sent from {} (only the OTP lane, \
                 priority 100 and above, goes now)",
                until.format("%H:%M")
            ),
        ))
    }
}

/// How `agent.quiet_hours` (`text`) reads on this machine now, for `check-config`: the local
/// time and offset (a Pi left on UTC shows here), and whether the window holds now.
pub fn describe(window: &Window, text: &str) -> String {
    let now = chrono::Local::now();
    let state = match window.until(&now) {
        Some(u) => format!("in it now, until {}", u.format("%H:%M")),
        None => "not in it now".to_owned(),
    };
    format!(
        "quiet hours: {text} local time (now {} UTC{}; {state}); only the OTP lane (priority \
         100 and above) is sent in it",
        now.format("%H:%M"),
        now.format("%:z")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::FixedOffset;

    fn at(tz: &FixedOffset, s: &str) -> DateTime<FixedOffset> {
        tz.from_local_datetime(
            &chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").expect("time"),
        )
        .single()
        .expect("local")
    }

    #[test]
    fn parses_and_refuses_with_the_rule() {
        assert_eq!(Window::parse(""), Ok(None));
        assert_eq!(
            Window::parse("21:00-07:30"),
            Ok(Some(Window {
                start: 21 * 60,
                end: 7 * 60 + 30
            }))
        );
        assert!(Window::parse(" 9:05 - 17:00 ").is_ok_and(|w| w.is_some()));
        for (bad, why) in [
            ("21:00", "no '-'"),
            ("24:00-07:00", "the start is not"),
            ("21:00-7", "the end is not"),
            ("21:60-07:00", "the start is not"),
            ("08:00-08:00", "the same"),
        ] {
            let e = Window::parse(bad).expect_err(bad);
            assert!(
                e.contains(why) && e.contains("\"21:00-07:00\""),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn ends_today_tomorrow_or_not_at_all() {
        let tz = FixedOffset::east_opt(7 * 3600).expect("offset");
        let night = Window::parse("21:00-07:00").expect("ok").expect("some");
        // before midnight: ends tomorrow morning
        assert_eq!(
            night.until(&at(&tz, "2026-12-06 22:15")),
            Some(at(&tz, "2026-12-07 07:00"))
        );
        // after midnight: ends this morning
        assert_eq!(
            night.until(&at(&tz, "2026-12-07 06:59")),
            Some(at(&tz, "2026-12-07 07:00"))
        );
        assert_eq!(night.until(&at(&tz, "2026-12-07 07:00")), None);
        assert_eq!(night.until(&at(&tz, "2026-12-07 20:59")), None);
        assert_eq!(
            night.until(&at(&tz, "2026-12-07 21:00")),
            Some(at(&tz, "2026-12-08 07:00"))
        );
        let lunch = Window::parse("12:00-13:00").expect("ok").expect("some");
        assert_eq!(
            lunch.until(&at(&tz, "2026-12-07 12:30")),
            Some(at(&tz, "2026-12-07 13:00"))
        );
        assert_eq!(lunch.until(&at(&tz, "2026-12-07 13:30")), None);
        assert_eq!(lunch.until(&at(&tz, "2026-12-07 11:59")), None);
    }
}
