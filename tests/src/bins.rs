//! The workspace binaries a test runs (`meshbypass`, `meshbypass-node`,
//! `mb-peer`), from the build profile of the running executable. A test never
//! runs a missing or stale one: under cargo (`cargo test`, `cargo run`,
//! which set `CARGO`) it builds it; run otherwise, it fails at once with the
//! command that builds it.
//!
//! "Stale" is a binary older than a source file of a crate it is built from.
//! Cargo itself is not asked on every call: `cargo build -p <package>`
//! resolves features for that package alone, so after a workspace build it
//! relinks the binary (and the next workspace build relinks it back).

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::SystemTime,
};

/// Each binary, the package and flags that build it, and the directories (relative to the
/// workspace root) of the sources it is built from.
const BINARIES: [(&str, &str, &str, &[&str]); 3] = [
    (
        "meshbypass",
        "meshbypass-cni",
        "",
        &["cni-plugin/src", "ebpf/src", "ebpf/bpf"],
    ),
    (
        "meshbypass-node",
        "meshbypass-node",
        "",
        &["install/src", "cni-plugin/src", "ebpf/src", "ebpf/bpf"],
    ),
    // Without the CRI client, which mb-peer does not use (as scripts/demo.sh builds it).
    (
        "mb-peer",
        "meshbypass-tests",
        " --no-default-features",
        &["tests/src", "ebpf/src", "ebpf/bpf"],
    ),
];

/// The path of workspace binary `name`, beside the running test executable (or beside the demo
/// and benchmarks, which use this kit), built first when it is missing or stale.
pub fn sibling_bin(name: &str) -> PathBuf {
    let (_, package, flags, sources) = BINARIES
        .iter()
        .find(|(bin, ..)| *bin == name)
        .unwrap_or_else(|| panic!("{name} is not a workspace binary this kit knows"));
    let exe = std::env::current_exe().expect("current exe");
    // Test executables live in `target/<profile>/deps`, binaries in `target/<profile>`.
    let dir = exe.parent().expect("exe dir");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir)
    } else {
        dir
    };
    let path = profile_dir.join(name);
    let build = Build::new(profile_dir, package, name, flags);
    let why = match built_at(&path) {
        None => "missing",
        Some(at) if newest_source(sources) > Some(at) => "older than its sources",
        Some(_) => return path,
    };
    // One build at a time in this process; cargo's lock orders it with others.
    static BUILDING: Mutex<()> = Mutex::new(());
    let _turn = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| {
        panic!(
            "{} is {why}: build it first ({}; scripts/test.sh and scripts/demo.sh build everything \
             they run)",
            path.display(),
            build.command()
        )
    });
    // Another thread may have built it while this one waited.
    if built_at(&path).is_some_and(|at| newest_source(sources) <= Some(at)) {
        return path;
    }
    // On the terminal (libtest captures eprint!, not the handle): why the test pauses.
    let line = format!("{} is {why}: {}\n", path.display(), build.command());
    std::io::stderr()
        .lock()
        .write_all(line.as_bytes())
        .expect("write to stderr");
    let status = Command::new(cargo)
        .args(build.args())
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build {name}: {e}"));
    assert!(
        status.success() && path.is_file(),
        "{} failed ({status}); its output is above",
        build.command()
    );
    path
}

/// `cargo build` of one binary into the target directory and profile the running executable
/// came from.
struct Build {
    workspace: PathBuf,
    target_dir: PathBuf,
    /// `--release`, `--profile <name>`, and `--target <triple>` when the build was for one.
    profile: Vec<String>,
    package: &'static str,
    bin: String,
    flags: &'static str,
}

impl Build {
    fn new(profile_dir: &Path, package: &'static str, bin: &str, flags: &'static str) -> Self {
        let workspace = crate::node::repo();
        let mut target_dir = profile_dir.parent().unwrap_or(profile_dir).to_path_buf();
        let mut profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => Vec::new(),
            Some("release") => vec!["--release".to_owned()],
            Some(other) => vec!["--profile".to_owned(), other.to_owned()],
        };
        // `target/<triple>/<profile>` when built with --target: cargo tags the target dir itself.
        if !target_dir.join("CACHEDIR.TAG").exists()
            && let Some(parent) = target_dir.parent()
            && parent.join("CACHEDIR.TAG").exists()
        {
            let triple = target_dir
                .file_name()
                .expect("a triple")
                .to_string_lossy()
                .into_owned();
            profile.extend(["--target".to_owned(), triple]);
            target_dir = parent.to_path_buf();
        }
        Self {
            workspace,
            target_dir,
            profile,
            package,
            bin: bin.to_owned(),
            flags,
        }
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec!["build".to_owned(), "--manifest-path".to_owned()];
        args.push(self.workspace.join("Cargo.toml").display().to_string());
        args.extend(["--target-dir".to_owned(), self.target_dir.display().to_string()]);
        args.extend(self.profile.iter().cloned());
        args.extend([
            "-p".to_owned(),
            self.package.to_owned(),
            "--bin".to_owned(),
            self.bin.clone(),
        ]);
        args.extend(self.flags.split_whitespace().map(str::to_owned));
        args
    }

    /// The command, as typed in the workspace root.
    fn command(&self) -> String {
        let mut cmd = String::from("cargo build");
        for a in &self.profile {
            cmd.push(' ');
            cmd.push_str(a);
        }
        if self.target_dir != self.workspace.join("target") {
            cmd.push_str(&format!(" --target-dir {}", self.target_dir.display()));
        }
        format!("{cmd} -p {} --bin {}{}", self.package, self.bin, self.flags)
    }
}

fn built_at(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file under `dirs` (relative to the workspace root).
fn newest_source(dirs: &[&str]) -> Option<SystemTime> {
    let root = crate::node::repo();
    let mut newest = None;
    let mut todo: Vec<PathBuf> = dirs.iter().map(|d| root.join(d)).collect();
    while let Some(dir) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                todo.push(entry.path());
            } else if let Ok(at) = meta.modified() {
                newest = newest.max(Some(at));
            }
        }
    }
    newest
}
