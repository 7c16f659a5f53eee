//! The pod log: `env_logger` output on stderr, plus an in-memory copy of the last 32 KiB of
//! lines that `GET /log` returns.
//!
//! The filter comes from `RUST_LOG` (default `info`). The copy is one ring per process: when
//! an application runs several pods in one process, every pod's `/log` shows the lines of all of
//! them (each line names its cluster, so they can be distinguished).

use std::collections::VecDeque;
use std::sync::{Mutex, Once};
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Log, Metadata, Record};

/// Bytes of log text the ring keeps, counting one newline per line.
pub const RING_CAPACITY: usize = 32 * 1024;

/// The last lines of a log, holding at most `capacity` bytes. Pushing a line drops the oldest
/// whole lines until the new one fits; a line longer than the capacity is cut to it.
#[derive(Debug)]
pub struct LogRing {
    lines: VecDeque<String>,
    /// Bytes kept, each line counted with its newline.
    bytes: usize,
    capacity: usize,
}

impl LogRing {
    pub const fn new(capacity: usize) -> Self {
        LogRing {
            lines: VecDeque::new(),
            bytes: 0,
            capacity,
        }
    }

    pub fn push(&mut self, mut line: String) {
        if line.len() + 1 > self.capacity {
            let mut end = self.capacity.saturating_sub(1);
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }

        while self.bytes + line.len() + 1 > self.capacity {
            match self.lines.pop_front() {
                Some(oldest) => self.bytes -= oldest.len() + 1,
                None => break,
            }
        }
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
    }

    /// Returns a copy of the lines, oldest first.
    pub fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }

    /// Returns the bytes kept, each line counted with its newline.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

static RING: Mutex<LogRing> = Mutex::new(LogRing::new(RING_CAPACITY));
static INIT: Once = Once::new();

/// Installs the process logger. Later calls do nothing, and so does the first one when another
/// logger is already installed (then the ring stays empty).
pub fn init() {
    init_with_default(AGENT_FILTER);
}

/// Log filter of the agent when `RUST_LOG` is not set: its own transitions at info, and only
/// warnings from the ZooKeeper client, whose info lines repeat on every connection.
pub const AGENT_FILTER: &str = "info,zookeeper_client=warn";

/// Installs the process logger like [`init`], with `filter` as the default when `RUST_LOG` is
/// not set (operator commands use `warn` so their output stays readable).
pub fn init_with_default(filter: &str) {
    INIT.call_once(|| {
        // Under `cargo test`, lines go through the test harness's capture instead of stderr.
        let inner =
            env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(filter))
                .is_test(cfg!(test))
                .build();
        let max_level = inner.filter();
        if log::set_boxed_logger(Box::new(RingLogger { inner })).is_ok() {
            log::set_max_level(max_level);
        }
    });
}

/// Returns the last lines logged in this process, oldest first, at most `RING_CAPACITY` bytes.
pub fn recent_lines() -> Vec<String> {
    RING.lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .lines()
}

/// Writes through `env_logger` and keeps a copy of each line in `RING`.
struct RingLogger {
    inner: env_logger::Logger,
}

impl Log for RingLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.inner.matches(record) {
            return;
        }
        self.inner.log(record);

        let header = format!(
            "{} {:<5} {}:",
            utc_timestamp(SystemTime::now()),
            record.level(),
            record.target()
        );
        let message = record.args().to_string();
        let mut ring = RING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for line in message.lines() {
            ring.push(format!("{header} {line}"));
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Formats `time` as an RFC 3339 UTC timestamp with milliseconds, `2024-05-01T12:00:00.000Z`.
pub fn utc_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_date(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// Converts days since 1970-01-01 into a proleptic Gregorian (year, month, day), counting in
/// 400-year eras that start on March 1st so that the leap day ends each year.
fn civil_date(days: i64) -> (i64, u32, u32) {
    let shifted = days + 719_468;
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ring_drops_oldest_whole_lines() {
        let mut ring = LogRing::new(32);
        ring.push("0123456789".to_string());
        ring.push("abcdefghij".to_string());
        assert_eq!(ring.bytes(), 22);

        ring.push("ABCDEFGHIJ".to_string());
        assert_eq!(ring.lines(), vec!["abcdefghij", "ABCDEFGHIJ"]);
        assert_eq!(ring.bytes(), 22);
    }

    #[test]
    fn ring_never_exceeds_capacity() {
        let mut ring = LogRing::new(RING_CAPACITY);
        for index in 0..5000 {
            ring.push(format!("line {index} {}", "x".repeat(index % 97)));
            assert!(ring.bytes() <= RING_CAPACITY);
        }
        let lines = ring.lines();
        assert_eq!(
            lines.last().unwrap(),
            &format!("line 4999 {}", "x".repeat(4999 % 97))
        );
        let kept_bytes: usize = lines.iter().map(|line| line.len() + 1).sum();
        assert_eq!(kept_bytes, ring.bytes());
        assert!(
            kept_bytes > RING_CAPACITY - 200,
            "the ring should be nearly full, has {kept_bytes} bytes"
        );
    }

    #[test]
    fn ring_cuts_line_longer_than_capacity() {
        let mut ring = LogRing::new(16);
        ring.push("short".to_string());
        ring.push("é".repeat(20));
        let lines = ring.lines();
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0], "é".repeat(7));
        assert!(ring.bytes() <= 16);
    }

    #[test]
    fn init_twice_keeps_lines() {
        init();
        init();
        log::warn!("ring test line {}", 42);
        log::warn!("first half\nsecond half");
        let lines = recent_lines();
        assert!(
            lines
                .iter()
                .any(|line| line.ends_with("ring test line 42") && line.contains("WARN")),
            "{lines:?}"
        );
        assert!(
            lines.iter().any(|line| line.ends_with(": second half")),
            "{lines:?}"
        );
    }

    #[test]
    fn timestamps_in_utc() {
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(utc_timestamp(leap_day), "2000-02-29T00:00:00.123Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_timestamp(later), "2023-11-14T22:13:20.000Z");
    }
}
