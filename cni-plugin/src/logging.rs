//! The plugin logs to `logFile` when set, else to syslog, else to stderr;
//! never to stdout, which carries the CNI result. Whatever `logLevel` says,
//! messages at `info` and above are also kept for the request's line in the
//! decision log (`journal.rs`): why a pod was or was not meshed.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use log::{LevelFilter, Log, Metadata, Record};

use crate::journal;

struct FileLog {
    path: PathBuf,
    level: LevelFilter,
    lock: Mutex<()>,
    tag: String,
}

impl Log for FileLog {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let _guard = self.lock.lock();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let line = format!("{now:.3} {} [{}] {}\n", r.level(), self.tag, r.args());
        // A log line that cannot be written must not fail the CNI command.
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(&self.path) {
            f.write_all(line.as_bytes()).ok();
        }
    }

    fn flush(&self) {}
}

struct StderrLog(LevelFilter, String);

impl Log for StderrLog {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!("meshbypass {} [{}] {}", r.level(), self.1, r.args());
        }
    }
    fn flush(&self) {}
}

/// The request's messages at `info` and above (at most
/// [`journal::MAX_MESSAGES`], each clipped).
static CAPTURED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The log target of `cmd/mod.rs`.
const DISPATCHER: &str = "meshbypass_cni::cmd";

/// Forwards to the configured logger at its level, and keeps `info` and
/// above for the decision log.
struct Capturing {
    inner: Box<dyn Log>,
    level: LevelFilter,
}

impl Log for Capturing {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= self.level.max(LevelFilter::Info)
    }

    fn log(&self, r: &Record<'_>) {
        // The dispatcher's own lines (the request's version, its error)
        // are fields of the decision log's entry already.
        if r.level() <= LevelFilter::Info && r.target() != DISPATCHER {
            let mut kept = CAPTURED.lock().unwrap_or_else(|p| p.into_inner());
            if kept.len() < journal::MAX_MESSAGES {
                kept.push(journal::clip(&r.args().to_string()));
            }
        }
        if r.level() <= self.level {
            self.inner.log(r);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// The messages kept so far (and forgets them).
pub fn take_captured() -> Vec<String> {
    std::mem::take(&mut *CAPTURED.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Installs the logger once; `tag` names the request (command, container).
pub fn init(level: LevelFilter, file: Option<&Path>, tag: &str) {
    let logger: Box<dyn Log> = match file {
        Some(path) => Box::new(FileLog {
            path: path.into(),
            level,
            lock: Mutex::new(()),
            tag: tag.into(),
        }),
        None => match syslog::unix(syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: "meshbypass".into(),
            pid: std::process::id(),
        }) {
            Ok(writer) => Box::new(syslog::BasicLogger::new(writer)),
            Err(_) => Box::new(StderrLog(level, tag.into())),
        },
    };
    if log::set_boxed_logger(Box::new(Capturing { inner: logger, level })).is_ok() {
        log::set_max_level(level.max(LevelFilter::Info));
    }
}
