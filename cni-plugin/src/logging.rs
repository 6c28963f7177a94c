//! The plugin logs to `logFile` when set, else to syslog, else to stderr;
//! never to stdout, which carries the CNI result.

use std::{
    fs::OpenOptions,
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use log::{LevelFilter, Log, Metadata, Record};

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
    if log::set_boxed_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}
