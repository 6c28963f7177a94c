//! Shared pieces of the benchmarks: timing a child process with its peak
//! RSS, and summarising samples.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

/// One run of a child: wall time, exit status, peak RSS (KiB), stdout.
pub struct Run {
    pub wall: Duration,
    pub ok: bool,
    pub max_rss_kib: i64,
    pub stdout: String,
}

/// Runs `cmd` with `stdin`, waiting with wait4(2) to read its peak RSS.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, not Child::wait
pub fn timed(cmd: &mut Command, stdin: &[u8]) -> Run {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    child.stdin.take().unwrap().write_all(stdin).expect("stdin");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 fills it for our child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child by PID.
    let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    assert!(rc > 0, "wait4: {}", std::io::Error::last_os_error());
    let stdout = reader.join().unwrap_or_default();
    Run {
        wall,
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        max_rss_kib: usage.ru_maxrss,
        stdout,
    }
}

/// Percentiles of durations, in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub n: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| {
        if ms.is_empty() {
            return 0.0;
        }
        let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
        ms[i]
    };
    Summary {
        n: ms.len(),
        p50_ms: pick(0.5),
        p90_ms: pick(0.9),
        p99_ms: pick(0.99),
        max_ms: ms.last().copied().unwrap_or(0.0),
    }
}

pub mod mesh;

use mesh::{Load, MeshMode, Sample, median};

/// Medians of several samples of one (load, mode).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cell {
    pub load: String,
    pub mode: &'static str,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_us_per_req: f64,
    pub verified: bool,
    pub problems: Vec<String>,
    pub samples: Vec<Sample>,
}

impl Cell {
    pub fn of(load: &Load, mode: &MeshMode, samples: Vec<Sample>) -> Self {
        let m = |f: fn(&Sample) -> f64| median(samples.iter().map(f).collect());
        Self {
            load: load.name.clone(),
            mode: mode.name,
            rps: m(|s| s.rps),
            p50_us: m(|s| s.p50_us),
            p99_us: m(|s| s.p99_us),
            p999_us: m(|s| s.p999_us),
            cpu_us_per_req: m(|s| s.cpu_us_per_req),
            verified: samples.iter().all(|s| s.verified),
            problems: samples.iter().filter_map(|s| s.problem.clone()).collect(),
            samples,
        }
    }
}

/// Prints one load's rows with ratios against `baseline` (the plain sidecar
/// mesh) and `direct` (no mesh).
pub fn print_table(cells: &[Cell], baseline: &str) {
    let mut loads: Vec<&str> = Vec::new();
    for c in cells {
        if !loads.contains(&c.load.as_str()) {
            loads.push(&c.load);
        }
    }
    for load in loads {
        let rows: Vec<&Cell> = cells.iter().filter(|c| c.load == load).collect();
        let base = rows.iter().find(|c| c.mode == baseline).copied();
        println!("\n{load}");
        println!(
            "  {:<30} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8}  check",
            "mode", "req/s", "p50 us", "p99 us", "p99.9 us", "cpu us/r", "rps x", "p50 x"
        );
        for c in &rows {
            let (rx, px) = match base {
                Some(b) if b.rps > 0.0 && b.p50_us > 0.0 => (c.rps / b.rps, c.p50_us / b.p50_us),
                _ => (0.0, 0.0),
            };
            println!(
                "  {:<30} {:>10.0} {:>9.0} {:>9.0} {:>9.0} {:>9.1} {:>8.2} {:>8.2}  {}",
                c.mode,
                c.rps,
                c.p50_us,
                c.p99_us,
                c.p999_us,
                c.cpu_us_per_req,
                rx,
                px,
                if c.verified {
                    "ok".to_owned()
                } else {
                    format!("FAILED: {}", c.problems.join("; "))
                }
            );
        }
    }
}
