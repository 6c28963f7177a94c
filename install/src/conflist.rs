//! Chaining our entry into a CNI network configuration: pure functions on
//! file names and JSON documents (the file I/O is in `confdir.rs`).
//!
//! * The runtime's network is the **lexicographically first** file named
//!   `*.conf`, `*.conflist` or `*.json` in the conf dir (libcni's `ConfFiles`
//!   then `sort.Strings`, as containerd and CRI-O do). Only `.conflist` is a
//!   list; `.conf` / `.json` hold a single plugin.
//! * Injecting drops any `"type": "meshbypass"` entry and appends ours; every
//!   other key and plugin is kept as it is (the owner's `cniVersion` too).
//! * A single `X.conf` (or `X.json`) becomes `X.conflist`:
//!   `{cniVersion, name, plugins: [original, ours], meshbypassConvertedFrom: "X.conf"}`
//!   (the original object kept whole as the first plugin, as libcni's
//!   `ConfListFromConf` does). The top-level marker is how removal knows to
//!   restore `X.conf`: it travels with the file, survives our restarts and
//!   node reboots, and runtimes ignore unknown top-level keys of a conflist
//!   (libcni reads only its known fields; plugins never see them).
//! * Removing drops our entries; a converted file becomes its original
//!   single config again, JSON-equal to what the owner wrote.
//!
//! The documents are `serde_json::Value`s because they belong to someone
//! else (Calico, Flannel, ...) and must pass through untouched; keys come
//! out sorted (serde_json's map), which is JSON-equal to the original.

use serde_json::{Map, Value};

/// Our plugin's `type`.
pub const PLUGIN_TYPE: &str = "meshbypass";

/// Top-level key of a conflist we made from a single config: its file name.
pub const CONVERTED_FROM: &str = "meshbypassConvertedFrom";

const EXTENSIONS: [&str; 3] = [".conf", ".conflist", ".json"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConflistError {
    #[error("{file} is not a JSON object")]
    NotAnObject { file: String },
    #[error("{file} has no \"plugins\" array")]
    NoPlugins { file: String },
    #[error("{file} has no plugin \"type\" (a list in a .conf file? containerd refuses it too)")]
    NoType { file: String },
    #[error("{file} configures only meshbypass: a chained plugin needs a primary network plugin first")]
    OnlyUs { file: String },
    #[error("{file} is not a CNI network config name (.conf, .conflist, .json)")]
    NotConfigName { file: String },
    #[error("{file} names {from:?} as its original single config, which is not a plain config file name")]
    BadMarker { file: String, from: String },
}

/// Whether libcni would read `name` as a network config: its extension as
/// Go's `filepath.Ext` sees it, so `.conf` alone is one too.
pub fn is_config_name(name: &str) -> bool {
    !name.contains('/') && EXTENSIONS.iter().any(|ext| name.ends_with(ext))
}

/// Whether `name` is a list (`.conflist`) rather than a single config.
pub fn is_list_name(name: &str) -> bool {
    name.ends_with(".conflist")
}

/// The file the runtime uses: the lexicographically (bytewise) first config name.
pub fn primary<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names.into_iter().filter(|n| is_config_name(n)).min()
}

/// A document to write under `file`, and maybe a file to remove after it.
#[derive(Debug, Clone, PartialEq)]
pub struct Edit {
    /// The file to (re)write.
    pub file: String,
    pub doc: Value,
    /// The file that the write replaces (the single `.conf` we converted, or
    /// the `.conflist` we restore it from); removed after the write.
    pub remove: Option<String>,
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE)
}

fn object<'a>(file: &str, doc: &'a Value) -> Result<&'a Map<String, Value>, ConflistError> {
    doc.as_object()
        .ok_or_else(|| ConflistError::NotAnObject { file: file.into() })
}

fn plugins<'a>(file: &str, doc: &'a Value) -> Result<&'a Vec<Value>, ConflistError> {
    object(file, doc)?
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or_else(|| ConflistError::NoPlugins { file: file.into() })
}

/// Our entry in `doc` (read from `file`): the last `type: meshbypass`
/// plugin of a list; `None` in a single config or a list without one.
pub fn ours(file: &str, doc: &Value) -> Option<Value> {
    if !is_list_name(file) {
        return None;
    }
    plugins(file, doc)
        .ok()?
        .iter()
        .rev()
        .find(|p| is_ours(p))
        .cloned()
}

/// Whether `doc` (read from `file`) has a meshbypass entry.
#[cfg(test)]
pub fn has_ours(file: &str, doc: &Value) -> bool {
    if is_list_name(file) {
        plugins(file, doc).is_ok_and(|p| p.iter().any(is_ours))
    } else {
        is_ours(doc)
    }
}

/// The edit that chains `ours` into `doc` (read from `file`); `None` when
/// `doc` already is exactly that (nothing to write: no fight with the owner).
pub fn inject(file: &str, doc: &Value, ours: &Value) -> Result<Option<Edit>, ConflistError> {
    if !is_config_name(file) {
        return Err(ConflistError::NotConfigName { file: file.into() });
    }
    if !is_list_name(file) {
        return inject_single(file, doc, ours).map(Some);
    }
    let mut out = object(file, doc)?.clone();
    let mut list: Vec<Value> = plugins(file, doc)?
        .iter()
        .filter(|p| !is_ours(p))
        .cloned()
        .collect();
    if list.is_empty() {
        return Err(ConflistError::OnlyUs { file: file.into() });
    }
    list.push(ours.clone());
    out.insert("plugins".into(), Value::Array(list));
    let out = Value::Object(out);
    Ok((out != *doc).then(|| Edit {
        file: file.into(),
        doc: out,
        remove: None,
    }))
}

fn inject_single(file: &str, doc: &Value, ours: &Value) -> Result<Edit, ConflistError> {
    let conf = object(file, doc)?;
    if conf.get("type").and_then(Value::as_str).is_none() {
        return Err(ConflistError::NoType { file: file.into() });
    }
    if is_ours(doc) {
        return Err(ConflistError::OnlyUs { file: file.into() });
    }
    let stem = file.rsplit_once('.').map_or(file, |(stem, _)| stem);
    let mut out = Map::new();
    if let Some(v) = conf.get("cniVersion") {
        out.insert("cniVersion".into(), v.clone());
    }
    let name = conf.get("name").cloned().unwrap_or_else(|| Value::from(stem));
    out.insert("name".into(), name);
    out.insert("plugins".into(), Value::Array(vec![doc.clone(), ours.clone()]));
    out.insert(CONVERTED_FROM.into(), Value::from(file));
    Ok(Edit {
        file: format!("{stem}.conflist"),
        doc: Value::Object(out),
        remove: Some(file.into()),
    })
}

/// The edit that takes our entries out of `doc` (read from `file`); `None`
/// when it has none. A conflist we converted becomes its single config again.
pub fn remove(file: &str, doc: &Value) -> Result<Option<Edit>, ConflistError> {
    if !is_list_name(file) {
        // A single config cannot hold a chain; if it is ours alone, it is
        // not ours to delete (someone wrote it by hand).
        return Ok(None);
    }
    let conf = object(file, doc)?;
    let list = plugins(file, doc)?;
    if !list.iter().any(is_ours) {
        return Ok(None);
    }
    let kept: Vec<Value> = list.iter().filter(|p| !is_ours(p)).cloned().collect();
    if let Some(from) = conf.get(CONVERTED_FROM) {
        let from_name = from.as_str().unwrap_or_default();
        if !is_config_name(from_name) || is_list_name(from_name) {
            return Err(ConflistError::BadMarker {
                file: file.into(),
                from: from.to_string(),
            });
        }
        if let [single] = kept.as_slice() {
            return Ok(Some(Edit {
                file: from_name.into(),
                doc: single.clone(),
                remove: Some(file.into()),
            }));
        }
        // Somebody added plugins since: it stays a list (without the marker).
    }
    let mut out = conf.clone();
    out.remove(CONVERTED_FROM);
    out.insert("plugins".into(), Value::Array(kept));
    Ok(Some(Edit {
        file: file.into(),
        doc: Value::Object(out),
        remove: None,
    }))
}

/// How a document is written: two-space indented JSON and a final newline.
pub fn render(doc: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(doc).expect("a serde_json::Value always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ours() -> Value {
        json!({"type": "meshbypass", "mesh": "istio"})
    }

    #[test]
    fn picks_the_first_config_file_bytewise() {
        let names = [
            "99-loopback.conf",
            "10-flannel.conflist",
            "10-calico.conflist",
            "README",
            "05-x.json.bak",
        ];
        assert_eq!(primary(names), Some("10-calico.conflist"));
        // "X.conf" sorts before "X.conflist", as in Go's sort.Strings.
        assert_eq!(primary(["10-a.conflist", "10-a.conf"]), Some("10-a.conf"));
        // Upper case sorts before lower case, bytewise.
        assert_eq!(primary(["a.conf", "B.conf"]), Some("B.conf"));
        // libcni reads a file named just ".conf" (Go's filepath.Ext); never
        // our temp files.
        assert_eq!(
            primary([".conf", "notes.txt", ".x.conflist.meshbypass-1-0.tmp"]),
            Some(".conf")
        );
        assert_eq!(primary(["notes.txt", ".x.conflist.meshbypass-1-0.tmp"]), None);
    }

    #[test]
    fn rejects_what_the_runtime_would_reject() {
        let list = json!({"name": "n", "plugins": [{"type": "bridge"}]});
        assert_eq!(
            inject("10-x.conf", &list, &ours()),
            Err(ConflistError::NoType {
                file: "10-x.conf".into()
            })
        );
        assert_eq!(
            inject("10-x.conflist", &json!({"name": "n"}), &ours()),
            Err(ConflistError::NoPlugins {
                file: "10-x.conflist".into()
            })
        );
        assert_eq!(
            inject(
                "10-x.conflist",
                &json!({"name": "n", "plugins": [{"type": "meshbypass"}]}),
                &ours()
            ),
            Err(ConflistError::OnlyUs {
                file: "10-x.conflist".into()
            })
        );
        assert_eq!(
            inject("10-x.conflist", &json!([1]), &ours()),
            Err(ConflistError::NotAnObject {
                file: "10-x.conflist".into()
            })
        );
    }

    #[test]
    fn replaces_an_old_entry_wherever_it_is() {
        let doc = json!({"name": "n", "plugins": [
            {"type": "meshbypass", "mesh": "linkerd"}, {"type": "bridge"}, {"type": "meshbypass"}]});
        let edit = inject("10-x.conflist", &doc, &ours())
            .expect("inject")
            .expect("an edit");
        assert_eq!(
            edit.doc,
            json!({"name": "n", "plugins": [{"type": "bridge"}, ours()]})
        );
    }

    #[test]
    fn a_marker_cannot_point_outside_the_conf_dir() {
        for from in ["../../etc/passwd.conf", "x.conflist", "noext"] {
            let doc = json!({"name": "n", CONVERTED_FROM: from,
                             "plugins": [{"type": "bridge"}, {"type": "meshbypass"}]});
            assert!(
                matches!(
                    remove("10-x.conflist", &doc),
                    Err(ConflistError::BadMarker { .. })
                ),
                "marker {from:?} accepted"
            );
        }
    }

    #[test]
    fn a_converted_list_that_gained_plugins_stays_a_list() {
        let doc = json!({"name": "n", CONVERTED_FROM: "10-x.conf",
                         "plugins": [{"type": "bridge"}, {"type": "portmap"}, {"type": "meshbypass"}]});
        let edit = remove("10-x.conflist", &doc).expect("remove").expect("an edit");
        assert_eq!(edit.file, "10-x.conflist");
        assert_eq!(edit.remove, None);
        assert_eq!(
            edit.doc,
            json!({"name": "n", "plugins": [{"type": "bridge"}, {"type": "portmap"}]})
        );
    }

    /// Realistic primaries (modeled on what Calico, Flannel, kindnet,
    /// Cilium chaining on the AWS VPC CNI and containerd's bridge write):
    /// inject → golden; inject again → nothing to do; remove → the original.
    /// `MESHBYPASS_UPDATE_GOLDEN=1` rewrites the goldens.
    #[test]
    fn goldens_inject_idempotently_and_remove_back_to_the_original() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata");
        let read_json = |path: &std::path::Path| -> Value {
            let text = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
        };
        let ours = read_json(&dir.join("plugin-settings.json"));
        let update = std::env::var_os("MESHBYPASS_UPDATE_GOLDEN").is_some_and(|v| v == "1");
        let cases = [
            ("10-calico.conflist", "10-calico.conflist"),
            ("10-flannel.conflist", "10-flannel.conflist"),
            ("10-kindnet.conflist", "10-kindnet.conflist"),
            ("05-cilium.conflist", "05-cilium.conflist"),
            ("10-containerd-net.conflist", "10-containerd-net.conflist"),
            ("10-flannel.conf", "10-flannel.conflist"),
        ];
        for (input, output) in cases {
            let original = read_json(&dir.join("conflist").join(input));
            let edit = inject(input, &original, &ours)
                .unwrap_or_else(|e| panic!("{input}: inject: {e}"))
                .unwrap_or_else(|| panic!("{input}: inject changed nothing"));
            assert_eq!(edit.file, output, "{input}: written under the wrong name");
            let converted = input != output;
            assert_eq!(
                edit.remove.as_deref(),
                converted.then_some(input),
                "{input}: removal after write"
            );

            let golden = dir.join("conflist").join(format!("{input}.injected.golden"));
            let rendered = render(&edit.doc);
            if update {
                std::fs::write(&golden, &rendered)
                    .unwrap_or_else(|e| panic!("writing {}: {e}", golden.display()));
            }
            let want = std::fs::read_to_string(&golden).unwrap_or_else(|e| {
                panic!(
                    "reading {} (MESHBYPASS_UPDATE_GOLDEN=1 makes it): {e}",
                    golden.display()
                )
            });
            assert_eq!(
                String::from_utf8_lossy(&rendered),
                want,
                "{input}: differs from {}",
                golden.display()
            );

            // Everything but the plugin list is the owner's, untouched.
            let plugins_of = |v: &Value| v["plugins"].as_array().cloned().unwrap_or_default();
            if !converted {
                let mut expect = original.clone();
                let mut list = plugins_of(&original);
                list.push(ours.clone());
                expect["plugins"] = Value::Array(list);
                assert_eq!(edit.doc, expect, "{input}: more than our entry changed");
            } else {
                assert_eq!(
                    plugins_of(&edit.doc),
                    vec![original.clone(), ours.clone()],
                    "{input}: conversion"
                );
                assert_eq!(
                    edit.doc["cniVersion"], original["cniVersion"],
                    "{input}: cniVersion changed"
                );
            }

            assert_eq!(
                inject(&edit.file, &edit.doc, &ours)
                    .unwrap_or_else(|e| panic!("{input}: second inject: {e}")),
                None,
                "{input}: a second inject wanted to write again"
            );
            assert!(
                has_ours(&edit.file, &edit.doc),
                "{input}: our entry not found after inject"
            );

            let back = remove(&edit.file, &edit.doc)
                .unwrap_or_else(|e| panic!("{input}: remove: {e}"))
                .unwrap_or_else(|| panic!("{input}: remove found nothing to remove"));
            assert_eq!(back.file, input, "{input}: restored under the wrong name");
            assert_eq!(
                back.remove.as_deref(),
                converted.then_some(output),
                "{input}: removal after restore"
            );
            assert_eq!(
                back.doc, original,
                "{input}: remove is not JSON-equal to the original"
            );
            assert_eq!(
                remove(&back.file, &back.doc),
                Ok(None),
                "{input}: a second remove found something"
            );
        }
    }

    /// The repository's example conflists (conflist/*.conflist) are exactly
    /// what injection makes: our entry once, last.
    #[test]
    fn repository_examples_are_already_chained() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conflist");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            if !is_list_name(&name) {
                continue;
            }
            let text = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            let doc: Value = serde_json::from_slice(&text).unwrap_or_else(|e| panic!("parsing {name}: {e}"));
            let plugins = doc["plugins"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: no plugins"));
            let ours = plugins
                .last()
                .cloned()
                .unwrap_or_else(|| panic!("{name}: empty plugins"));
            assert_eq!(
                plugins.iter().filter(|p| is_ours(p)).count(),
                1,
                "{name}: not exactly one meshbypass entry"
            );
            assert_eq!(
                inject(&name, &doc, &ours),
                Ok(None),
                "{name}: our entry is not last"
            );
            seen += 1;
        }
        assert!(
            seen >= 4,
            "expected calico, flannel, kindnet and bridge examples, found {seen}"
        );
    }
}
