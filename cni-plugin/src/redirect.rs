//! The pod's iptables redirect, applied inside its network namespace: a
//! thread enters the netns (setns), runs `iptables-save -t nat`, and feeds
//! `iptables-restore --noflush` the generated rules, one atomic commit per
//! family. Removal reads what is there and deletes exactly our jumps and
//! chains.

use std::{
    io::{self, Write},
    path::Path,
    process::{Command, Stdio},
};

use meshbypass_ebpf::netns;

use crate::{
    cidr::Family,
    config::{Mesh, RedirectSpec},
    error::CniError,
    iptables::{self, Installed},
};

fn netns_err(netns: &Path, e: impl std::error::Error + Send + Sync + 'static) -> CniError {
    CniError::Netns {
        netns: netns.into(),
        source: Box::new(e),
    }
}

/// Runs `program args` with `input` on stdin; stdout on success.
fn run(program: &str, args: &[&str], input: Option<&str>) -> io::Result<String> {
    let mut cmd = Command::new(program);
    // A runtime that kills the plugin (its CNI deadline) must take the
    // restore with it: an orphan could commit the rules after DEL read them.
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )))
    }
}

fn ipt_err(action: &'static str, family: Family, e: io::Error) -> CniError {
    CniError::Iptables {
        action,
        family,
        source: Box::new(e),
    }
}

/// Installs (or replaces) the redirect for each family. `fresh`: the netns
/// cannot hold rules of ours yet (first ADD of this sandbox), so the rules go
/// in with one `iptables-restore` and no `iptables-save` first (the save
/// costs a process and 3-4 ms on every pod start).
///
/// Returns the netns cookie, read on the way (the bypass keys the pod by it).
pub fn apply(
    netns_path: &Path,
    spec: &RedirectSpec,
    families: &[Family],
    fresh: bool,
) -> Result<u64, CniError> {
    netns::in_netns(netns_path, || {
        for &family in families {
            let rules = if fresh {
                iptables::ruleset(spec, family)
            } else {
                let saved = run(family.save_program(), &["-t", "nat"], None)
                    .map_err(|e| ipt_err("read", family, e))?;
                iptables::reapply(&saved, spec, family)
            };
            run(family.restore_program(), &["--noflush", "--wait"], Some(&rules))
                .map_err(|e| ipt_err("write", family, e))?;
            if family == Family::V6 && spec.mesh == Mesh::Istio {
                // Istio's inbound passthrough source for IPv6, as istio-cni adds it.
                run("ip", &["-6", "addr", "replace", "::6/128", "dev", "lo"], None)
                    .map_err(|e| ipt_err("add ::6 on lo for", family, e))?;
            }
        }
        netns::current_cookie().map_err(|e| netns_err(netns_path, e))
    })
    .map_err(|e| netns_err(netns_path, e))?
}

/// Removes our jumps and chains, whatever is there; nothing of ours is fine.
/// A family whose tools are missing has nothing of ours either.
pub fn remove(netns_path: &Path) -> Result<(), CniError> {
    netns::in_netns(netns_path, || {
        for family in [Family::V4, Family::V6] {
            let saved = match run(family.save_program(), &["-t", "nat"], None) {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ipt_err("read", family, e)),
            };
            if let Some(cleanup) = iptables::cleanup(&saved) {
                run(family.restore_program(), &["--noflush", "--wait"], Some(&cleanup))
                    .map_err(|e| ipt_err("remove", family, e))?;
            }
        }
        Ok(())
    })
    .map_err(|e| netns_err(netns_path, e))?
}

/// What of ours is installed, per family.
pub fn installed(netns_path: &Path, family: Family) -> Result<Installed, CniError> {
    netns::in_netns(netns_path, || {
        run(family.save_program(), &["-t", "nat"], None)
            .map(|saved| iptables::inspect(&saved))
            .map_err(|e| ipt_err("read", family, e))
    })
    .map_err(|e| netns_err(netns_path, e))?
}

/// The families the pod's addresses need.
pub fn families(ips: &[std::net::IpAddr]) -> Vec<Family> {
    let mut out = Vec::new();
    for ip in ips {
        let f = Family::of(*ip);
        if !out.contains(&f) {
            out.push(f);
        }
    }
    if out.is_empty() {
        out.push(Family::V4);
    }
    out
}
