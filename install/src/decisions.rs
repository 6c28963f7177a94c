//! Follows the plugin's decision log (`<stateDir>/log/cni.jsonl`, see
//! `meshbypass_cni::journal`) and re-emits each ADD and DEL on stdout, so
//! `kubectl logs ds/meshbypass-node` says why each pod was or was not
//! meshed; each line is also counted for `/metrics`.
//!
//! The follower starts at the end of the file (what came before was
//! re-emitted by the agent that ran then), keeps its file open across the
//! plugin's rotation (`cni.jsonl` renamed to `cni.jsonl.1`): it finishes
//! the renamed file, then opens the new one from its start.

use std::{
    fs::File,
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use meshbypass_cni::journal::{self, Decision, Entry};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::json;

use crate::{cli::LogFormat, metrics::Stats, watch::Watcher};

/// A line longer than this is not the plugin's (its lines are a few KiB):
/// it is dropped rather than buffered without end.
const MAX_LINE: usize = 256 * 1024;
/// Read again at least this often, should an inotify event be missed.
const RESCAN: Duration = Duration::from_secs(1);

/// Reads what the plugin appended since the last call.
pub struct Follower {
    path: PathBuf,
    file: Option<(File, u64)>,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows `<state_dir>/log/cni.jsonl` from its current end.
    pub fn at_end(state_dir: &Path) -> Self {
        let path = state_dir.join(journal::DIR).join(journal::FILE);
        let file = File::open(&path).ok().and_then(|mut f| {
            let ino = f.metadata().ok()?.ino();
            f.seek(SeekFrom::End(0)).ok()?;
            Some((f, ino))
        });
        Self {
            path,
            file,
            partial: Vec::new(),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// Every complete line appended since the last call, in order.
    pub fn read_new(&mut self) -> io::Result<Vec<String>> {
        let mut bytes = Vec::new();
        if let Some((f, _)) = &mut self.file {
            f.read_to_end(&mut bytes)?;
        }
        let current = match std::fs::metadata(&self.path) {
            Ok(m) => Some(m.ino()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if let Some(ino) = current
            && self.file.as_ref().is_none_or(|(_, held)| *held != ino)
        {
            // Rotated (or first created): what the plugin wrote into the
            // old file before renaming it, then the new file from its start.
            if let Some((f, _)) = &mut self.file {
                f.read_to_end(&mut bytes)?;
            }
            let mut lines = self.split(bytes);
            self.partial.clear();
            let mut f = File::open(&self.path)?;
            let ino = f.metadata()?.ino();
            let mut fresh = Vec::new();
            f.read_to_end(&mut fresh)?;
            self.file = Some((f, ino));
            lines.extend(self.split(fresh));
            return Ok(lines);
        }
        Ok(self.split(bytes))
    }

    /// Complete lines of `partial + bytes`; the rest waits for its newline.
    fn split(&mut self, bytes: Vec<u8>) -> Vec<String> {
        self.partial.extend(bytes);
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else {
            if self.partial.len() > MAX_LINE {
                log::warn!(
                    "decision log: dropped a {}-byte line without newline",
                    self.partial.len()
                );
                self.partial.clear();
            }
            return Vec::new();
        };
        let rest = self.partial.split_off(end + 1);
        let done = std::mem::replace(&mut self.partial, rest);
        done.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    }
}

/// One decision as the agent prints it: `(stdout line, entry)`, or why the
/// line is not an entry.
pub fn render(line: &str, format: LogFormat) -> Result<(String, Entry), serde_json::Error> {
    let e: Entry = serde_json::from_str(line)?;
    let text = describe(&e);
    let out = match format {
        LogFormat::Text => format!("cni: {text}\n"),
        LogFormat::Json => format!(
            "{}\n",
            json!({
                "ts": e.ts,
                "level": if e.decision == Decision::Failed { "warn" } else { "info" },
                "msg": text,
                "cni": serde_json::to_value(&e)?,
            })
        ),
    };
    Ok((out, e))
}

/// `ADD default/web [c0ffee123456] meshed (proxy-only), 17.3 ms: ...`
fn describe(e: &Entry) -> String {
    let pod = match (&e.namespace, &e.pod) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        _ => "(no pod)".to_owned(),
    };
    let id: String = e
        .container_id
        .as_deref()
        .unwrap_or("-")
        .chars()
        .take(12)
        .collect();
    let mut s = format!("{} {pod} [{id}] {}", e.command, e.decision.as_str());
    if let Some(mode) = &e.acceleration {
        s.push_str(&format!(" ({mode})"));
    }
    s.push_str(&format!(", {} ms", e.duration_ms));
    if let Some(code) = e.code {
        s.push_str(&format!(", code {code}"));
    }
    if let Some(err) = &e.error {
        s.push_str(&format!(": {err}"));
    }
    if !e.log.is_empty() {
        s.push_str(if e.error.is_some() { "; " } else { ": " });
        s.push_str(&e.log.join("; "));
    }
    s
}

/// Re-emits and counts `lines`.
pub fn emit(lines: &[String], format: LogFormat, stats: &Stats, out: &mut impl Write) {
    for line in lines {
        match render(line, format) {
            Ok((text, entry)) => {
                stats.record_cni(&entry);
                // A closed stdout has nowhere else to go.
                out.write_all(text.as_bytes()).ok();
            }
            Err(e) => log::warn!("decision log: a line that is not an entry ({e}): {line:?}"),
        }
    }
    out.flush().ok();
}

/// Follows the decision log under `state_dir` on a thread of its own for
/// the agent's life.
pub fn spawn(state_dir: &Path, format: LogFormat, stats: Arc<Stats>) -> io::Result<()> {
    let mut follower = Follower::at_end(state_dir);
    let watcher = Watcher::new(vec![follower.dir()]).map_err(io::Error::other)?;
    thread::Builder::new().name("decisions".into()).spawn(move || {
        loop {
            match follower.read_new() {
                Ok(lines) => emit(&lines, format, &stats, &mut io::stdout().lock()),
                Err(e) => log::warn!("decision log {}: {e}", follower.path.display()),
            }
            // The directory appears with the plugin's first line.
            watcher.ensure();
            let mut fds = [PollFd::new(watcher.fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(RESCAN.as_millis()).unwrap_or(u16::MAX);
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => log::warn!("decision log: poll: {e}"),
            }
            if let Err(e) = watcher.drain() {
                log::warn!("decision log: {e}");
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    fn entry(pod: &str, decision: Decision) -> Entry {
        Entry {
            ts: 1.0,
            command: "ADD".into(),
            cni_version: "0.3.1".into(),
            container_id: Some("0123456789abcdef".into()),
            namespace: Some("default".into()),
            pod: Some(pod.into()),
            decision,
            acceleration: (decision == Decision::Meshed).then(|| "proxy-only".into()),
            code: None,
            error: None,
            log: vec![format!("meshed: istio injected a sidecar into default/{pod}")],
            duration_ms: 17.25,
        }
    }

    fn pods(lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .map(|l| serde_json::from_str::<Entry>(l).unwrap().pod.unwrap())
            .collect()
    }

    #[test]
    fn follows_from_the_end_across_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join(journal::DIR);
        // Before the agent: not re-emitted.
        journal::append(&log, &entry("old", Decision::Meshed)).unwrap();
        let mut f = Follower::at_end(dir.path());
        assert!(f.read_new().unwrap().is_empty());
        journal::append(&log, &entry("a", Decision::Meshed)).unwrap();
        journal::append(&log, &entry("b", Decision::Meshed)).unwrap();
        assert_eq!(pods(&f.read_new().unwrap()), ["a", "b"]);
        assert!(f.read_new().unwrap().is_empty());
        // The plugin rotates between two reads: c went into the old file,
        // d into the new one.
        journal::append(&log, &entry("c", Decision::Meshed)).unwrap();
        fs::rename(log.join(journal::FILE), log.join(journal::ROTATED)).unwrap();
        journal::append(&log, &entry("d", Decision::Meshed)).unwrap();
        assert_eq!(pods(&f.read_new().unwrap()), ["c", "d"]);
        // A half-written line waits for its newline.
        let path = log.join(journal::FILE);
        let line = serde_json::to_string(&entry("e", Decision::Meshed)).unwrap();
        let (head, tail) = line.split_at(20);
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(head.as_bytes())
            .unwrap();
        assert!(f.read_new().unwrap().is_empty());
        fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(format!("{tail}\n").as_bytes())
            .unwrap();
        assert_eq!(pods(&f.read_new().unwrap()), ["e"]);
    }

    #[test]
    fn a_log_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = Follower::at_end(dir.path());
        assert!(f.read_new().unwrap().is_empty());
        let log = dir.path().join(journal::DIR);
        journal::append(&log, &entry("first", Decision::NotMeshed)).unwrap();
        assert_eq!(pods(&f.read_new().unwrap()), ["first"]);
    }

    #[test]
    fn lines_are_rendered_as_text_or_json_and_counted() {
        let line = serde_json::to_string(&entry("web", Decision::Meshed)).unwrap();
        let (text, _) = render(&line, LogFormat::Text).unwrap();
        assert_eq!(
            text,
            "cni: ADD default/web [0123456789ab] meshed (proxy-only), 17.25 ms: \
             meshed: istio injected a sidecar into default/web\n"
        );
        let (json_line, _) = render(&line, LogFormat::Json).unwrap();
        let v: serde_json::Value = serde_json::from_str(&json_line).unwrap();
        assert_eq!(v["level"], "info");
        assert_eq!(v["cni"]["decision"], "meshed");
        assert_eq!(v["cni"]["pod"], "web");
        assert!(v["msg"].as_str().unwrap().starts_with("ADD default/web"), "{v}");

        let mut failed = entry("db", Decision::Failed);
        failed.code = Some(11);
        failed.error = Some("the API server did not answer".into());
        failed.log.clear();
        let failed = serde_json::to_string(&failed).unwrap();
        let (text, _) = render(&failed, LogFormat::Text).unwrap();
        assert_eq!(
            text,
            "cni: ADD default/db [0123456789ab] failed, 17.25 ms, code 11: the API server did not answer\n"
        );
        let (json_line, _) = render(&failed, LogFormat::Json).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json_line).unwrap()["level"],
            "warn"
        );

        let stats = Stats::default();
        let mut out = Vec::new();
        emit(
            &[line.clone(), "not json".into(), failed, line],
            LogFormat::Text,
            &stats,
            &mut out,
        );
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 3);
        let body = crate::metrics::render(&stats, None);
        for want in [
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"meshed\"} 2\n",
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"failed\"} 1\n",
            "meshbypass_cni_requests_total{command=\"ADD\",decision=\"not-meshed\"} 0\n",
            "meshbypass_cni_requests_total{command=\"DEL\",decision=\"removed\"} 0\n",
            "meshbypass_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"0.01\"} 0\n",
            "meshbypass_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"0.025\"} 3\n",
            "meshbypass_cni_request_duration_seconds_bucket{command=\"ADD\",le=\"+Inf\"} 3\n",
            "meshbypass_cni_request_duration_seconds_count{command=\"ADD\"} 3\n",
            "meshbypass_cni_request_duration_seconds_count{command=\"DEL\"} 0\n",
        ] {
            assert!(body.contains(want), "no {want:?} in\n{body}");
        }
        let sum = body
            .lines()
            .find_map(|l| l.strip_prefix("meshbypass_cni_request_duration_seconds_sum{command=\"ADD\"} "))
            .unwrap();
        assert!((sum.parse::<f64>().unwrap() - 0.05175).abs() < 1e-9, "{sum}");
    }
}
