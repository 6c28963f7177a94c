//! The plugin binary against malformed input, property style: many generated
//! inputs (random bytes, truncated and type-mutated configurations, pathological
//! JSON, garbage environments, identifiers that try to leave their directory),
//! each run with a deadline. Whatever comes in, the plugin answers within the
//! deadline with nothing on stdout but one CNI error JSON (or a success), and
//! never panics or dies by a signal. Plus: without its capabilities the plugin
//! refuses to run and names them.
//!
//! Deterministic: the generator is seeded (MESHBYPASS_ROBUSTNESS_SEED to vary
//! it, MESHBYPASS_ROBUSTNESS_CASES to run more).

use std::{
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);
/// Codes the plugin may answer with (CNI spec 1.1 section 5, and ours from 100).
const CODES: &[i64] = &[1, 2, 4, 6, 7, 11, 50, 100, 101, 102, 103];

/// xorshift64*: enough for test inputs, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn seed() -> u64 {
    std::env::var("MESHBYPASS_ROBUSTNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d65_7368_6279_7061)
}

fn cases(default: usize) -> usize {
    std::env::var("MESHBYPASS_ROBUSTNESS_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

/// Runs the plugin with exactly `env` and `stdin`, killing it at the deadline.
fn run_with(prefix: &[&str], env: &[(String, String)], stdin: &[u8]) -> Out {
    let (program, args) = match prefix.split_first() {
        Some((p, rest)) => (*p, [rest, &[env!("CARGO_BIN_EXE_meshbypass")]].concat()),
        None => (env!("CARGO_BIN_EXE_meshbypass"), Vec::new()),
    };
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // A plugin that stops reading early must not deadlock the test.
    let writer = thread::spawn(move || input.write_all(&data));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = thread::spawn(move || {
        let mut s = Vec::new();
        stdout.read_to_end(&mut s).map(|_| s)
    });
    let err_reader = thread::spawn(move || {
        let mut s = Vec::new();
        stderr.read_to_end(&mut s).map(|_| s)
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the plugin") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            child.kill().expect("kill the hung plugin");
            child.wait().expect("reap the hung plugin");
            panic!(
                "the plugin hung (> {DEADLINE:?}) on env {env:?} and {} bytes of stdin starting {:?}",
                stdin.len(),
                String::from_utf8_lossy(&stdin[..stdin.len().min(200)])
            );
        }
        thread::sleep(Duration::from_millis(2));
    };
    if let Err(e) = writer.join().expect("writer thread") {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    let stdout = out_reader.join().unwrap().expect("read stdout");
    let stderr = err_reader.join().unwrap().expect("read stderr");
    Out {
        code: status.code(),
        stdout: String::from_utf8(stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

fn run(env: &[(String, String)], stdin: &[u8]) -> Out {
    run_with(&[], env, stdin)
}

/// The property: a success, or exactly one CNI error JSON; never a panic or a signal.
fn assert_answered(out: &Out, what: &str) -> Option<i64> {
    let code = out
        .code
        .unwrap_or_else(|| panic!("{what}: the plugin died by a signal; stderr {:?}", out.stderr));
    assert!(
        !out.stderr.contains("panicked"),
        "{what}: the plugin panicked: {}",
        out.stderr
    );
    if code == 0 {
        let s = out.stdout.trim();
        assert!(
            s.is_empty() || serde_json::from_str::<Value>(s).is_ok_and(|v| v.is_object()),
            "{what}: success with stdout {s:?}"
        );
        return None;
    }
    assert_eq!(code, 1, "{what}: exit code {code}; stdout {:?}", out.stdout);
    let v: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|_| panic!("{what}: stdout is not one JSON object: {:?}", out.stdout));
    let c = v["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("{what}: no code in {v}"));
    assert!(CODES.contains(&c), "{what}: code {c} in {v}");
    assert!(v["cniVersion"].is_string(), "{what}: {v}");
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: no msg in {v}"
    );
    Some(c)
}

struct Dirs {
    dir: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A complete ADD configuration whose paths all point into the temp dir.
    fn config(&self) -> Value {
        let d = self.dir.path();
        json!({
            "cniVersion": "1.1.0",
            "name": "robust",
            "type": "meshbypass",
            "bpfRoot": d.join("bpf"),
            "cgroupRoot": d.join("cgroup"),
            "stateDir": d.join("state"),
            "logFile": d.join("log"),
            "mesh": "istio",
            "acceleration": "auto",
            "logLevel": "debug",
            "redirect": {
                "outboundPort": 15001, "inboundPort": 15006, "proxyUid": 1337, "proxyGid": 1337,
                "excludeOutboundPorts": [15020], "excludeInboundPorts": [22],
                "excludeOutboundCidrs": ["169.254.169.254/32"], "includeOutboundCidrs": "*",
                "includeInboundPorts": "*"
            },
            "kubernetes": {"excludeNamespaces": ["kube-system"]},
            "runtimeConfig": {"portMappings": []},
            "prevResult": {
                "cniVersion": "1.1.0",
                "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
                "ips": [{"address": "10.222.0.9/24", "interface": 0}]
            }
        })
    }

    /// Files under the temp dir other than the log.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.dir.path(), &mut out);
        // The plugin's own log, and its decision log (a line per ADD/DEL,
        // refused ones included): not pod state.
        out.retain(|p| !p.ends_with("/log") && !p.contains("/state/log"));
        out
    }
}

fn walk(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        }
        out.push(p.display().to_string());
    }
}

fn env_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// An attachment whose netns does not exist: ADD/CHECK stop before touching the node.
fn attachment(command: &str) -> Vec<(String, String)> {
    env_of(&[
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/run/netns/meshbypass-robustness-absent"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_UID=0b7e8a4c-1d2f-4e5a-9b3c-123456789abc",
        ),
    ])
}

const COMMANDS: &[&str] = &["ADD", "CHECK", "DEL", "VERSION", "STATUS", "GC"];

/// A replacement of another type (or an odd value of the same).
fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(70000),
        4 => json!(1.5),
        5 => json!(u64::MAX),
        6 => json!(""),
        7 => json!("../../etc"),
        8 => json!("\u{0}"),
        9 => json!("x".repeat(rng.below(5000))),
        10 => json!([]),
        11 => json!([null, "*", -5, {"a": 1}]),
        12 => json!({}),
        _ => json!({"outboundPort": "x", "nested": [[[]]]}),
    }
}

/// Every path to a value in `v` (object keys and array indexes).
fn paths(v: &Value, prefix: &mut Vec<Value>, out: &mut Vec<Vec<Value>>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(json!(k));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(json!(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// The value at `path`, if an earlier replacement left it there.
fn at<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match k {
        Value::String(s) => v.get_mut(s.as_str()),
        Value::Number(n) => v.get_mut(n.as_u64()? as usize),
        _ => None,
    })
}

#[test]
fn random_bytes_are_a_cni_error() {
    let dirs = Dirs::new();
    let mut rng = Rng(seed());
    let mut codes = std::collections::BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for i in 0..cases(150) {
        let len = match rng.below(4) {
            0 => rng.below(8),
            1 => rng.below(200),
            _ => rng.below(4000),
        };
        let mut input = rng.bytes(len);
        // Half the time, something that starts like JSON.
        if rng.below(2) == 0 {
            input.insert(0, b'{');
        }
        let command = *rng.pick(COMMANDS);
        let out = run(&attachment(command), &input);
        let code = assert_answered(&out, &format!("case {i}: {command} with {len} random bytes"));
        *codes.entry(code).or_insert(0u32) += 1;
        slowest = slowest.max(out.elapsed);
    }
    eprintln!("random bytes: codes {codes:?}, slowest {slowest:?}");
    assert!(dirs.leftovers().is_empty(), "{:?}", dirs.leftovers());
}

#[test]
fn truncated_configurations_are_a_cni_error() {
    let dirs = Dirs::new();
    let full = dirs.config().to_string();
    let mut rng = Rng(seed() ^ 1);
    let mut slowest = Duration::ZERO;
    for i in 0..cases(120) {
        let cut = rng.below(full.len());
        let command = *rng.pick(&["ADD", "CHECK", "DEL", "GC"]);
        let out = run(&attachment(command), &full.as_bytes()[..cut]);
        let code = assert_answered(&out, &format!("case {i}: {command} cut at {cut}"));
        // A prefix of one JSON object is never a valid object.
        assert_eq!(code, Some(6), "case {i}: cut at {cut}: {}", out.stdout);
        slowest = slowest.max(out.elapsed);
    }
    eprintln!("truncated: slowest {slowest:?}");
}

#[test]
fn wrong_types_anywhere_are_a_cni_error() {
    let dirs = Dirs::new();
    let base = dirs.config();
    let mut all = Vec::new();
    paths(&base, &mut Vec::new(), &mut all);
    let mut rng = Rng(seed() ^ 2);
    let mut codes = std::collections::BTreeMap::new();
    for i in 0..cases(200) {
        let mut conf = base.clone();
        // One to three values replaced, anywhere in the tree.
        let mut what = Vec::new();
        for _ in 0..=rng.below(3) {
            let path = rng.pick(&all).clone();
            let value = odd_value(&mut rng);
            let shown = value.to_string().chars().take(40).collect::<String>();
            if let Some(slot) = at(&mut conf, &path) {
                what.push(format!("{path:?} = {shown}"));
                *slot = value;
            }
        }
        let command = *rng.pick(COMMANDS);
        let out = run(&attachment(command), conf.to_string().as_bytes());
        let code = assert_answered(&out, &format!("case {i}: {command} with {what:?}"));
        *codes.entry(code).or_insert(0u32) += 1;
    }
    eprintln!("wrong types: codes {codes:?}");
    // Nothing outside the configured directories, and no pod record from a refused ADD.
    assert!(
        !dirs.leftovers().iter().any(|p| p.contains("/state/")),
        "{:?}",
        dirs.leftovers()
    );
}

#[test]
fn pathological_json_is_a_cni_error() {
    let dirs = Dirs::new();
    let mut conf = dirs.config();
    let valid = conf.to_string();
    let mut inputs: Vec<(&str, Vec<u8>)> = vec![
        ("deep arrays", "[".repeat(200_000).into_bytes()),
        ("deep objects", "{\"a\":".repeat(100_000).into_bytes()),
        (
            "deep inside a valid key",
            format!("{}\"x\":{}}}", &valid[..valid.len() - 1], "[".repeat(50_000)).into_bytes(),
        ),
        ("huge number", b"{\"cniVersion\":1e999999}".to_vec()),
        (
            "invalid UTF-8",
            b"{\"cniVersion\":\"1.1.0\",\"name\":\"\xff\xfe\"}".to_vec(),
        ),
        ("NUL bytes", b"\0\0\0\0{}".to_vec()),
        ("BOM", [b"\xef\xbb\xbf".as_slice(), valid.as_bytes()].concat()),
        ("two objects", format!("{valid}{valid}").into_bytes()),
        ("a string", b"\"meshbypass\"".to_vec()),
        ("null", b"null".to_vec()),
        ("exactly 4 MiB", {
            let mut v = valid.clone().into_bytes();
            v.resize(4 << 20, b' ');
            v
        }),
        ("4 MiB + 1", vec![b' '; (4 << 20) + 1]),
        ("32 MiB", vec![b'{'; 32 << 20]),
    ];
    conf["name"] = json!("n".repeat(3 << 20));
    inputs.push(("a 3 MiB name", conf.to_string().into_bytes()));
    conf["name"] = json!("robust");
    conf["redirect"]["excludeOutboundPorts"] = json!(vec![1; 300_000]);
    inputs.push(("300k ports", conf.to_string().into_bytes()));
    let dup = valid.replacen("\"name\":\"robust\"", "\"name\":\"robust\",\"name\":\"again\"", 1);
    inputs.push(("duplicate key", dup.into_bytes()));
    for (what, input) in &inputs {
        for command in ["ADD", "DEL", "VERSION"] {
            let out = run(&attachment(command), input);
            assert_answered(&out, &format!("{what} ({command})"));
            eprintln!("{what} ({command}): {:?} in {:?}", out.code, out.elapsed);
        }
    }
}

#[test]
fn garbage_environments_are_code_4() {
    let dirs = Dirs::new();
    let body = dirs.config().to_string();
    let mut rng = Rng(seed() ^ 3);
    const ALPHABET: &[u8] = b"abcXYZ019=;/.-_ \t\n\\\"%$*K8S_POD_UID=IgnoreUnknown=1";
    let garbage = |rng: &mut Rng, max: usize| -> String {
        let len = rng.below(max);
        (0..len).map(|_| *rng.pick(ALPHABET) as char).collect()
    };
    for i in 0..cases(150) {
        let command: &str = rng.pick::<&str>(&["ADD", "CHECK", "DEL"]);
        let mut env = attachment(command);
        let slot = rng.below(5);
        let value = match rng.below(4) {
            0 => garbage(&mut rng, 30),
            1 => garbage(&mut rng, 300),
            2 => "x".repeat(rng.below(100_000)),
            _ => format!("../{}", garbage(&mut rng, 20)),
        };
        env[slot].1 = value;
        let out = run(&env, body.as_bytes());
        let what = format!(
            "case {i}: {}={:?}",
            env[slot].0,
            &env[slot].1[..env[slot].1.len().min(60)]
        );
        match assert_answered(&out, &what) {
            // Some garbage is valid (a long container ID, an odd CNI_ARGS value).
            None => {}
            Some(c) => assert!(
                matches!(c, 4 | 50 | 101 | 103),
                "{what}: code {c}: {}",
                out.stdout
            ),
        }
    }
    // No environment at all, and an environment of nothing but noise.
    assert_answered(&run(&[], body.as_bytes()), "no environment");
    let noise: Vec<(String, String)> = (0..50)
        .map(|i| (format!("CNI_{i}"), garbage(&mut rng, 50).replace('\0', "")))
        .collect();
    assert_eq!(assert_answered(&run(&noise, body.as_bytes()), "noise"), Some(4));
    assert!(!dirs.leftovers().iter().any(|p| p.contains("/state/")));
}

/// Identifiers that try to leave their directory, through every variable
/// that reaches a path (state file, link pin, cgroup lookup), for every
/// command: refused with code 4 (7 inside GC's list), and nothing written.
#[test]
fn identifiers_cannot_traverse_end_to_end() {
    let dirs = Dirs::new();
    let body = dirs.config().to_string();
    let escapes = [
        "../../../../tmp/meshbypass-escape",
        "..",
        "a/../../b",
        "/abs",
        ".hidden",
        "a\0b",
        "a%2F..",
    ];
    // Legal interface names (Linux refuses only ".", "..", '/', ':' and whitespace); the
    // interface name reaches no path of ours, only the pod's record.
    let legal_ifnames = [".hidden", "a%2F.."];
    for command in ["ADD", "CHECK", "DEL"] {
        for bad in escapes {
            let cases = [
                ("CNI_CONTAINERID", bad.to_owned(), "CNI_CONTAINERID"),
                ("CNI_IFNAME", bad.to_owned(), "CNI_IFNAME"),
                (
                    "CNI_ARGS",
                    format!("IgnoreUnknown=1;K8S_POD_UID={bad}"),
                    "K8S_POD_UID",
                ),
                (
                    "CNI_ARGS",
                    format!("IgnoreUnknown=1;K8S_POD_INFRA_CONTAINER_ID={bad}"),
                    "K8S_POD_INFRA_CONTAINER_ID",
                ),
            ];
            for (var, value, named) in cases {
                if value.contains('\0') {
                    continue; // the OS refuses NUL in the environment before we could
                }
                let mut env = attachment(command);
                env.retain(|(k, _)| k != var);
                env.push((var.to_owned(), value.clone()));
                let out = run(&env, body.as_bytes());
                let what = format!("{command} {var}={value:?}");
                if var == "CNI_IFNAME" && legal_ifnames.contains(&bad) {
                    assert_answered(&out, &what);
                    continue;
                }
                assert_eq!(assert_answered(&out, &what), Some(4), "{what}: {}", out.stdout);
                let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
                assert!(v["msg"].as_str().unwrap().contains(named), "{what}: {v}");
            }
        }
    }
    // GC's list of attachments to keep is validated the same way.
    let mut conf = dirs.config();
    for bad in escapes {
        conf["cni.dev/valid-attachments"] = json!([{"containerID": bad, "ifname": "eth0"}]);
        let out = run(&env_of(&[("CNI_COMMAND", "GC")]), conf.to_string().as_bytes());
        assert_eq!(
            assert_answered(&out, &format!("GC {bad:?}")),
            Some(7),
            "{}",
            out.stdout
        );
    }
    assert!(!Path::new("/tmp/meshbypass-escape").exists());
    assert!(!Path::new("/tmp/meshbypass-escape.json").exists());
    assert!(
        !dirs.leftovers().iter().any(|p| p.contains("/state/")),
        "{:?}",
        dirs.leftovers()
    );
}

/// Run as root but without capabilities (`setpriv` clears the bounding set,
/// so the exec'd plugin gets none): ADD, DEL and CHECK refuse with code 50
/// naming exactly what is missing; VERSION still answers.
#[test]
fn refuses_to_run_without_its_capabilities() {
    // It drops capabilities from root.
    if !meshbypass_tests::privileged() {
        return;
    }
    let dirs = Dirs::new();
    let body = dirs.config().to_string();
    let drops: [(&str, &[&str], &[&str]); 3] = [
        ("-all", &["CAP_NET_ADMIN", "CAP_SYS_ADMIN"], &[]),
        ("-sys_admin", &["CAP_SYS_ADMIN"], &["CAP_NET_ADMIN"]),
        ("-net_admin", &["CAP_NET_ADMIN"], &["CAP_SYS_ADMIN"]),
    ];
    for (bounding, named, not_named) in drops {
        let prefix = [
            "setpriv",
            "--inh-caps=-all",
            "--ambient-caps=-all",
            &format!("--bounding-set={bounding}"),
        ]
        .map(str::to_owned);
        let prefix: Vec<&str> = prefix.iter().map(String::as_str).collect();
        for command in ["ADD", "DEL", "CHECK"] {
            let out = run_with(&prefix, &attachment(command), body.as_bytes());
            let what = format!("{command} with --bounding-set={bounding}");
            assert_eq!(assert_answered(&out, &what), Some(50), "{what}: {}", out.stdout);
            let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
            let msg = v["msg"].as_str().unwrap();
            for cap in named {
                assert!(msg.contains(cap), "{what}: {msg}");
            }
            for cap in not_named {
                assert!(!msg.contains(cap), "{what}: {msg}");
            }
            assert!(
                v["details"]
                    .as_str()
                    .is_some_and(|d| d.contains("run it as root")),
                "{what}: {v}"
            );
        }
        let out = run_with(
            &prefix,
            &env_of(&[("CNI_COMMAND", "VERSION")]),
            br#"{"cniVersion":"1.1.0"}"#,
        );
        assert_eq!(assert_answered(&out, "VERSION without capabilities"), None);
    }
    // With them, the same ADD gets past the check (to the absent netns).
    let out = run(&attachment("ADD"), body.as_bytes());
    assert_eq!(assert_answered(&out, "ADD as root"), Some(101), "{}", out.stdout);
}

/// The spec allows container IDs of any length and `ContainerId` accepts up to
/// 256 bytes, but `<stateDir>/<id>.json` would be longer than NAME_MAX (255)
/// from 251 bytes on, and DEL would fail with code 103 ("File name too long")
/// on every retry. Records (and link pins) are named by `ContainerId::stem`, a
/// short prefix and a hash for such IDs, so DEL of any valid ID succeeds.
#[test]
fn del_of_a_long_but_valid_container_id_succeeds() {
    // ADD, CHECK and DEL need CAP_NET_ADMIN and CAP_SYS_ADMIN (code 50 without).
    if !meshbypass_tests::privileged() {
        return;
    }
    let dirs = Dirs::new();
    std::fs::create_dir_all(dirs.dir.path().join("state")).unwrap();
    let body = dirs.config().to_string();
    for len in [250, 251, 256] {
        let id = "a".repeat(len);
        let env = env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", &id),
            ("CNI_IFNAME", "eth0"),
        ]);
        let out = run(&env, body.as_bytes());
        assert_eq!(
            assert_answered(&out, &format!("DEL of a {len}-byte ID")),
            None,
            "DEL of a {len}-byte container ID: {}",
            out.stdout
        );
    }
}
