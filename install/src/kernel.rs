//! The kernel selftest, run in a child process of this very binary (the
//! hidden `selftest-probe` command) so that a probe that hangs is killed at
//! a deadline instead of hanging the agent.

use std::time::Duration;

use anyhow::Context;
use meshbypass_ebpf::selftest;

const SELFTEST_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run_selftest() -> anyhow::Result<selftest::Report> {
    let exe = std::env::current_exe().context("locating this binary for the probe process")?;
    selftest::run(&exe, SELFTEST_TIMEOUT).context("running the kernel selftest")
}
