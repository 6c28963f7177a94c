//! The shared loader: creates every map and program pin under the bpf root
//! once per node, or reuses them. Several processes may race (the plugin on
//! parallel ADDs, the node agent): the root's exclusive lock makes exactly one
//! of them the creator, and the layout stamp in `mb_config`, written last,
//! tells a finished layout from a crashed creator's leftovers and from a
//! layout of another version.

use std::{
    fs, io,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{Program, ProgramError},
};
use log::{debug, info};

use crate::{
    OBJECT,
    abi::{
        ADAPTIVE_CONNECTED, ADAPTIVE_FED, ADAPTIVE_LISTENER, ADAPTIVE_SEND, Config, DRAIN_RECEIVER_READ,
        DRAIN_SENDER_ACKED, LAYOUT_VERSION,
    },
    bpffs::{self, BpffsError, RootLock},
    fnv::fnv1a,
    maps::{NodeMaps, OpenError, map_err, open_map, read_stamp, update_config},
    pins::{self, Pins},
    sys::{self, SyscallError, bpf_attach_type::BPF_SK_MSG_VERDICT},
};

/// The load-time constants of the programs: `MB_DRAIN_*` and
/// `MB_ADAPTIVE_*` bits.
const DRAIN_CHECKS_GLOBAL: &str = "mb_drain_checks";
const ADAPTIVE_CHECKS_GLOBAL: &str = "mb_adaptive_checks";
const POD_SOCKET_BUDGET_GLOBAL: &str = "mb_pod_socket_budget";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Bpffs(#[from] BpffsError),
    #[error("cannot load the kernel programs into the kernel")]
    Ebpf(#[source] Box<aya::EbpfError>),
    #[error("cannot load program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("cannot pin {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("cannot rename {} to {}", from.display(), to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot attach the sk_msg program to {}", pins::MAP_SENDERS)]
    AttachSkMsg {
        #[source]
        source: SyscallError,
    },
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("cannot remove {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the object has no {0}")]
    Missing(&'static str),
}

/// What [`load`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadOutcome {
    /// This call created the maps and programs.
    Created,
    /// Everything was already there, with this binary's layout.
    Reused,
    /// The maps were there with this layout, the programs were another
    /// build's: they were replaced (new sockets and every pod's link run
    /// ours; established sockets keep the program they joined with).
    Upgraded,
}

/// FNV-1a of the embedded object: which build the pinned programs are.
pub fn object_hash() -> u64 {
    static HASH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HASH.get_or_init(|| fnv1a(OBJECT))
}

/// How the programs are loaded when this call creates or replaces them.
/// The default is the only setting for a node; the others exist for the
/// tests that prove each safety condition necessary by removing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// `MB_DRAIN_*`: the conditions a direction sent to the stack by a
    /// full receiver must meet before it returns to the bypass.
    pub drain_checks: u32,
    /// `MB_ADAPTIVE_*`: the guards of `adaptive`.
    pub adaptive_checks: u32,
    /// How many sockets the node's socket maps hold (`mb_senders`, `mb_targets`,
    /// `mb_endpoints`; `mb_pairs` twice that). Applies when the maps are
    /// created; an existing node keeps its maps (`unload` to resize).
    pub socket_capacity: u32,
    /// How many of them one pod may use; its further sockets stay on TCP
    /// (`budget_exceeded`).
    pub pod_socket_budget: u32,
}

/// The socket maps' size when nothing says otherwise.
pub const DEFAULT_SOCKET_CAPACITY: u32 = 65_536;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            drain_checks: DRAIN_SENDER_ACKED | DRAIN_RECEIVER_READ,
            adaptive_checks: ADAPTIVE_CONNECTED | ADAPTIVE_LISTENER | ADAPTIVE_SEND | ADAPTIVE_FED,
            socket_capacity: DEFAULT_SOCKET_CAPACITY,
            pod_socket_budget: DEFAULT_SOCKET_CAPACITY / 4,
        }
    }
}

impl LoadOptions {
    /// Maps of `capacity` sockets, a quarter of them per pod at most.
    pub fn with_capacity(capacity: u32) -> Self {
        Self {
            socket_capacity: capacity,
            pod_socket_budget: capacity / 4,
            ..Self::default()
        }
    }
}

/// Creates the node's pins under `root`, or reuses them. Safe to call from
/// any number of processes at once.
pub fn load(root: &Path) -> Result<(NodeMaps, LoadOutcome), LoadError> {
    load_with(root, &LoadOptions::default())
}

/// [`load`] with `options` for programs this call loads (a reused node keeps
/// its programs as they are).
pub fn load_with(root: &Path, options: &LoadOptions) -> Result<(NodeMaps, LoadOutcome), LoadError> {
    bpffs::ensure_root(root)?;
    let _lock = RootLock::acquire(root)?;
    let pins = Pins::new(root);
    let outcome = match read_stamp(&pins)? {
        Some(cfg) if cfg.layout_version == LAYOUT_VERSION && cfg.object_hash == object_hash() => {
            // Reuse. Re-attaching sk_msg to mb_senders replaces it with itself.
            attach_sk_msg(&pins)?;
            LoadOutcome::Reused
        }
        Some(cfg) if cfg.layout_version == LAYOUT_VERSION => {
            upgrade(&pins, options)?;
            LoadOutcome::Upgraded
        }
        Some(cfg) if cfg.layout_version != 0 => {
            return Err(OpenError::LayoutMismatch {
                root: root.into(),
                found: cfg.layout_version.to_string(),
            }
            .into());
        }
        // No stamp, or a creator died before writing it: start over.
        _ => {
            remove_pins(&pins)?;
            if let Err(e) = create(&pins, options) {
                // Nothing half-made stays pinned (a verifier refusal, a full
                // bpffs): the next load starts from nothing as well.
                if let Err(cleanup) = remove_pins(&pins) {
                    log::warn!("after a failed load, {cleanup}");
                }
                return Err(e);
            }
            LoadOutcome::Created
        }
    };
    let maps = NodeMaps::open_unlocked(&pins)?;
    info!("bpf root {}: {:?}", root.display(), outcome);
    Ok((maps, outcome))
}

fn create(pins: &Pins, options: &LoadOptions) -> Result<(), LoadError> {
    bpffs::mkdir_0700(&pins.progs_dir())?;
    bpffs::mkdir_0700(&pins.links_dir())?;
    load_programs(pins, Pin::Live, options)?;
    attach_sk_msg(pins)?;
    // The stamp goes last: its presence means every pin above exists.
    let mut config = open_map(pins, pins::MAP_CONFIG)?;
    update_config(&mut config, |cfg| {
        *cfg = Config {
            layout_version: LAYOUT_VERSION,
            object_hash: object_hash(),
            ..Config::default()
        };
    })
    .map_err(map_err(pins, pins::MAP_CONFIG))?;
    Ok(())
}

/// Replaces the programs of a node loaded by another build with the same
/// layout: new pins (renamed over the old ones, so a concurrent ADD sees
/// one or the other), sk_msg re-attached to `mb_senders` (sockets joining from
/// now on), every pod's link pointed at the new sockops program, then the
/// object hash recorded. A link that cannot be updated keeps the old
/// program (same layout: it still works) and is logged.
fn upgrade(pins: &Pins, options: &LoadOptions) -> Result<(), LoadError> {
    load_programs(pins, Pin::Staged, options)?;
    for name in pins::PROGS {
        let (staged, path) = (pins.staged_prog(name), pins.prog(name));
        fs::rename(&staged, &path).map_err(|source| LoadError::Rename {
            from: staged,
            to: path,
            source,
        })?;
    }
    attach_sk_msg(pins)?;
    let prog = open_pin(&pins.prog(pins::PROG_SOCKOPS))?;
    let mut updated = 0;
    for entry in fs::read_dir(pins.links_dir()).into_iter().flatten().flatten() {
        let link = entry.path();
        match sys::obj_get(&link).and_then(|l| sys::link_update(l.as_fd(), prog.as_fd())) {
            Ok(()) => updated += 1,
            Err(e) => log::warn!("{}: keeps the previous program: {e}", link.display()),
        }
    }
    let mut config = open_map(pins, pins::MAP_CONFIG)?;
    update_config(&mut config, |cfg| cfg.object_hash = object_hash())
        .map_err(map_err(pins, pins::MAP_CONFIG))?;
    info!(
        "bpf root {}: programs replaced by this build's, {updated} pod links updated",
        pins.root().display()
    );
    Ok(())
}

/// Where [`load_programs`] pins a program.
#[derive(Clone, Copy)]
enum Pin {
    /// `progs/<name>`, where the node's programs are.
    Live,
    /// `progs/<name>_new`, until an upgrade renames it in.
    Staged,
}

/// Loads both programs from the embedded object (its maps are the pinned
/// ones, created when absent) and pins them where `pin` says.
fn load_programs(pins: &Pins, pin: Pin, options: &LoadOptions) -> Result<(), LoadError> {
    let cap = options.socket_capacity.max(1);
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(pins.root())
        .map_max_entries(pins::MAP_SENDERS, cap)
        .map_max_entries(pins::MAP_TARGETS, cap)
        .map_max_entries(pins::MAP_ENDPOINTS, cap)
        .map_max_entries(pins::MAP_PAIRS, cap.saturating_mul(2))
        .override_global(DRAIN_CHECKS_GLOBAL, &options.drain_checks, true)
        .override_global(ADAPTIVE_CHECKS_GLOBAL, &options.adaptive_checks, true)
        .override_global(POD_SOCKET_BUDGET_GLOBAL, &options.pod_socket_budget, true)
        .load(OBJECT)
        .map_err(|e| LoadError::Ebpf(Box::new(e)))?;
    for name in pins::PROGS {
        let program = ebpf.program_mut(name).ok_or(LoadError::Missing(name))?;
        let loaded = match program {
            Program::SockOps(p) => p.load(),
            Program::SkMsg(p) => p.load(),
            _ => Err(ProgramError::UnexpectedProgramType),
        };
        loaded.map_err(|e| LoadError::Program {
            name,
            source: Box::new(e),
        })?;
        let path = match pin {
            Pin::Live => pins.prog(name),
            Pin::Staged => pins.staged_prog(name),
        };
        remove_pin(&path)?; // what a crashed loader may have left
        program
            .pin(&path)
            .map_err(|source| LoadError::Pin { path, source })?;
    }
    Ok(())
}

/// Removes the pin at `path`; `false` when there was none.
fn remove_pin(path: &Path) -> Result<bool, LoadError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(LoadError::Remove {
            path: path.into(),
            source,
        }),
    }
}

/// Opens the object pinned at `path`.
fn open_pin(path: &Path) -> Result<std::os::fd::OwnedFd, OpenError> {
    sys::obj_get(path).map_err(|source| OpenError::Pinned {
        path: path.into(),
        source,
    })
}

/// Attaches the sk_msg program to the senders' map (`mb_senders`).
fn attach_sk_msg(pins: &Pins) -> Result<(), LoadError> {
    let prog = open_pin(&pins.prog(pins::PROG_SK_MSG))?;
    let senders = open_pin(&pins.map(pins::MAP_SENDERS))?;
    sys::prog_attach(prog.as_fd(), senders.as_fd(), BPF_SK_MSG_VERDICT)
        .map_err(|source| LoadError::AttachSkMsg { source })
}

/// What [`unload`] removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct UnloadReport {
    pub links: usize,
    pub pins: usize,
}

/// Detaches everything and removes every pin under `root` (per-pod links
/// included), then the root itself when it is empty.
pub fn unload(root: &Path) -> Result<UnloadReport, LoadError> {
    if !root.exists() {
        return Ok(UnloadReport::default());
    }
    let lock = RootLock::acquire(root)?;
    let pins = Pins::new(root);
    let links = remove_dir_pins(&pins.links_dir())?;
    detach_sk_msg(&pins);
    // Then what a crashed upgrade may have left (`<prog>_new`).
    let removed = remove_pins(&pins)? + remove_dir_pins(&pins.progs_dir())?;
    drop(lock);
    for dir in [pins.links_dir(), pins.progs_dir()] {
        remove_dir(&dir, &[])?;
    }
    // A root we mounted ourselves stays a mount point (EBUSY); an empty
    // directory on /sys/fs/bpf is removed.
    remove_dir(root, &[libc::EBUSY, libc::ENOTEMPTY])?;
    Ok(UnloadReport { links, pins: removed })
}

/// Detaches sk_msg from the senders' map: sockets still in it go back to
/// plain TCP. Best effort: the pins are removed next either way.
fn detach_sk_msg(pins: &Pins) {
    let (Ok(prog), Ok(senders)) = (
        sys::obj_get(&pins.prog(pins::PROG_SK_MSG)),
        sys::obj_get(&pins.map(pins::MAP_SENDERS)),
    ) else {
        return;
    };
    match sys::prog_detach(prog.as_fd(), senders.as_fd(), BPF_SK_MSG_VERDICT) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => debug!("detaching sk_msg: {e}"),
    }
}

/// Removes the map and program pins (not links); returns how many.
fn remove_pins(pins: &Pins) -> Result<usize, LoadError> {
    pins.maps_and_progs()
        .map(|path| remove_pin(&path).map(usize::from))
        .sum()
}

/// Removes every pin in `dir`; returns how many.
fn remove_dir_pins(dir: &Path) -> Result<usize, LoadError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(LoadError::Remove {
                path: dir.into(),
                source,
            });
        }
    };
    entries
        .flatten()
        .map(|entry| remove_pin(&entry.path()).map(usize::from))
        .sum()
}

/// Removes the directory `dir`; a missing one, or one failing with an
/// errno of `benign`, is fine.
fn remove_dir(dir: &Path, benign: &[i32]) -> Result<(), LoadError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) if e.raw_os_error().is_some_and(|errno| benign.contains(&errno)) => Ok(()),
        Err(source) => Err(LoadError::Remove {
            path: dir.into(),
            source,
        }),
    }
}
