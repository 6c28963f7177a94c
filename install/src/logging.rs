//! The agent's log lines, on stderr: `level: message` or, with
//! `--log-format json`, one JSON object per line (`ts` in seconds since the
//! epoch, `level`, `msg`), as log collectors parse them.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};
use serde_json::json;

use crate::cli::LogFormat;

struct Stderr {
    level: LevelFilter,
    format: LogFormat,
}

impl Log for Stderr {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = line(self.format, r.level(), &r.args().to_string());
        // One write per line: lines of several threads do not interleave.
        // A log line that cannot be written has nowhere else to go.
        std::io::stderr().lock().write_all(line.as_bytes()).ok();
    }

    fn flush(&self) {}
}

/// Seconds since the epoch, milliseconds precise (`ts` of JSON lines).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1e3)
}

/// One log line, newline included.
fn line(format: LogFormat, level: log::Level, msg: &str) -> String {
    let level = level.as_str().to_lowercase();
    match format {
        LogFormat::Text => format!("{level}: {msg}\n"),
        LogFormat::Json => format!("{}\n", json!({"ts": now(), "level": level, "msg": msg})),
    }
}

/// Installs the logger: debug with `verbose`, info for the commands that
/// change the host or run for long (`chatty`), warnings otherwise.
pub fn init(verbose: bool, chatty: bool, format: LogFormat) {
    let level = match (verbose, chatty) {
        (true, _) => LevelFilter::Debug,
        (false, true) => LevelFilter::Info,
        (false, false) => LevelFilter::Warn,
    };
    if log::set_boxed_logger(Box::new(Stderr { level, format })).is_ok() {
        log::set_max_level(level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_lines() {
        assert_eq!(
            line(LogFormat::Text, log::Level::Warn, "disk \"full\""),
            "warn: disk \"full\"\n"
        );
        let l = line(LogFormat::Json, log::Level::Info, "a \"quoted\"\nline");
        assert!(l.ends_with('\n') && l.matches('\n').count() == 1, "{l:?}");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["msg"], "a \"quoted\"\nline");
        assert!(v["ts"].as_f64().unwrap() > 1.7e9, "{v}");
    }
}
