//! A CNI runtime in miniature, executing a conflist as the spec says
//! (SPEC.md, "Execution of Network Configurations") and as libcni does it:
//! every plugin gets the list's `name` and `cniVersion`; ADD runs the plugins
//! in order, each getting the previous plugin's result as `prevResult`; DEL
//! runs them in reverse, with the cached ADD result converted to the list's
//! version from 0.4.0 on and without any `prevResult` before (DEL got one in
//! 0.4.0); CHECK (0.4.0 and later only: libcni refuses it for older lists) in
//! order with the cached result. Plugins are found on CNI_PATH by `type`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

/// One pod attachment, with the CNI_ARGS a kubelet-driven runtime passes.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl Attachment {
    pub fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.namespace, self.name, self.container_id, self.uid
        )
    }
}

/// A plugin's error reply.
#[derive(Debug)]
pub struct PluginError {
    pub plugin: String,
    pub code: i64,
    pub msg: String,
    pub raw: String,
}

pub struct Runtime {
    pub conflist: Value,
    pub cni_path: String,
}

impl Runtime {
    /// Loads a conflist file; plugins are looked up in `bin_dirs`.
    pub fn new(conflist: &Path, bin_dirs: &[PathBuf]) -> Self {
        let text =
            std::fs::read_to_string(conflist).unwrap_or_else(|e| panic!("{}: {e}", conflist.display()));
        Self::from_value(serde_json::from_str(&text).expect("conflist JSON"), bin_dirs)
    }

    /// A parsed conflist; plugins are looked up in `bin_dirs`.
    pub fn from_value(conflist: Value, bin_dirs: &[PathBuf]) -> Self {
        let cni_path = bin_dirs
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        Self { conflist, cni_path }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"].as_array().expect("plugins").clone()
    }

    /// The list's `cniVersion`.
    pub fn version(&self) -> &str {
        self.conflist["cniVersion"]
            .as_str()
            .expect("the conflist's cniVersion")
    }

    /// Whether the list's version defines CHECK (0.4.0 and later).
    pub fn can_check(&self) -> bool {
        at_least(self.version(), "0.4.0")
    }

    /// The configuration one plugin receives.
    fn config_for(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = self.conflist["name"].clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    /// Runs one plugin binary; Ok(stdout JSON or Null) or its error reply.
    pub fn exec(
        &self,
        plugin_type: &str,
        command: &str,
        att: Option<&Attachment>,
        config: &Value,
    ) -> Result<Value, PluginError> {
        let bin = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(plugin_type))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {plugin_type} not on CNI_PATH {}", self.cni_path));
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", &self.cni_path);
        if let Some(a) = att {
            cmd.env("CNI_CONTAINERID", &a.container_id)
                .env("CNI_IFNAME", &a.ifname)
                .env("CNI_ARGS", a.cni_args())
                .env(
                    "CNI_NETNS",
                    a.netns
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                );
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(config.to_string().as_bytes())
            .expect("write config");
        let out = child.wait_with_output().expect("wait plugin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            if stdout.trim().is_empty() {
                return Ok(Value::Null);
            }
            return Ok(serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{plugin_type} {command} printed non-JSON {stdout:?}: {e}")));
        }
        let v: Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            panic!(
                "{plugin_type} {command} failed without an error JSON: {stdout:?} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        Err(PluginError {
            plugin: plugin_type.into(),
            code: v["code"].as_i64().unwrap_or(-1),
            msg: v["msg"].as_str().unwrap_or_default().into(),
            raw: stdout,
        })
    }

    /// ADD through the whole list; the final result.
    pub fn add(&self, att: &Attachment) -> Result<Value, PluginError> {
        let steps = self.add_steps(att)?;
        Ok(steps.into_iter().last().map_or(Value::Null, |(_, r)| r))
    }

    /// ADD through the whole list; every plugin's result, by type, in order.
    pub fn add_steps(&self, att: &Attachment) -> Result<Vec<(String, Value)>, PluginError> {
        let mut steps: Vec<(String, Value)> = Vec::new();
        for p in self.plugins() {
            let t = p["type"].as_str().unwrap().to_owned();
            let prev = steps.last().map(|(_, r)| r);
            let r = self.exec(&t, "ADD", Some(att), &self.config_for(&p, prev))?;
            steps.push((t, r));
        }
        Ok(steps)
    }

    /// What a DEL of this list sends as `prevResult`: the cached ADD result in
    /// the list's version from 0.4.0 on, nothing before.
    pub fn del_prev_result(&self, cached: Option<&Value>) -> Option<Value> {
        cached
            .filter(|_| at_least(self.version(), "0.4.0"))
            .map(|r| as_version(r, self.version()))
    }

    /// DEL in reverse order, with the cached ADD result when there is one
    /// and the list's version sends it.
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<(), PluginError> {
        let prev = self.del_prev_result(cached);
        for p in self.plugins().iter().rev() {
            let t = p["type"].as_str().unwrap().to_owned();
            self.exec(&t, "DEL", Some(att), &self.config_for(p, prev.as_ref()))?;
        }
        Ok(())
    }

    /// CHECK in order with the cached ADD result (in the list's version).
    /// Lists before 0.4.0 have no CHECK: libcni refuses without running a
    /// plugin, and so does this (a test asking for it is wrong).
    pub fn check(&self, att: &Attachment, cached: &Value) -> Result<(), PluginError> {
        assert!(
            self.can_check(),
            "libcni refuses CHECK for cniVersion {}: CHECK came with 0.4.0",
            self.version()
        );
        let prev = as_version(cached, self.version());
        for p in self.plugins() {
            let t = p["type"].as_str().unwrap().to_owned();
            self.exec(&t, "CHECK", Some(att), &self.config_for(&p, Some(&prev)))?;
        }
        Ok(())
    }

    /// One plugin of the list run with `command` as the runtime would derive
    /// its configuration (name, version, `prevResult` as given), whatever the
    /// version allows: to see a plugin refuse what a runtime must not send.
    pub fn exec_one(
        &self,
        plugin_type: &str,
        command: &str,
        att: Option<&Attachment>,
        prev: Option<&Value>,
    ) -> Result<Value, PluginError> {
        let config = self.config_for(&self.plugin(plugin_type), prev);
        self.exec(plugin_type, command, att, &config)
    }

    /// One plugin's entry, by type.
    pub fn plugin(&self, plugin_type: &str) -> Value {
        self.find_plugin(plugin_type)
            .unwrap_or_else(|| panic!("no {plugin_type} in the conflist"))
    }

    /// One plugin's entry, by type, if the list has it.
    pub fn find_plugin(&self, plugin_type: &str) -> Option<Value> {
        self.plugins().into_iter().find(|p| p["type"] == plugin_type)
    }

    /// GC (CNI 1.1) for one plugin with the attachments to keep.
    pub fn gc(&self, plugin_type: &str, valid: &[&Attachment]) -> Result<(), PluginError> {
        let mut c = self.config_for(&self.plugin(plugin_type), None);
        c["cniVersion"] = json!("1.1.0");
        c["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|a| json!({"containerID": a.container_id, "ifname": a.ifname}))
            .collect();
        self.exec(plugin_type, "GC", None, &c).map(|_| ())
    }
}

/// `version` is `min` or later (`major.minor.patch`).
pub fn at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Option<(u32, u32, u32)> {
        let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    };
    match (parse(version), parse(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => panic!("not a CNI version: {version:?} or {min:?}"),
    }
}

/// A result converted to `version` as libcni's `GetAsVersion` converts it
/// between the 0.3.0/0.3.1/0.4.0 shape and 1.x: `ips[].version` ("4"/"6")
/// is required before 1.0.0 and absent from 1.0.0 on.
pub fn as_version(result: &Value, version: &str) -> Value {
    let mut out = result.clone();
    out["cniVersion"] = Value::from(version);
    let versioned = !at_least(version, "1.0.0");
    if let Some(ips) = out["ips"].as_array_mut() {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if !versioned {
                ip.remove("version");
            } else if !ip.contains_key("version") {
                let addr = ip["address"].as_str().unwrap_or_default();
                let v4 = addr
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .parse::<std::net::Ipv4Addr>()
                    .is_ok();
                ip.insert("version".into(), Value::from(if v4 { "4" } else { "6" }));
            }
        }
    }
    out
}

/// Whether `result` has the shape its `cniVersion` requires of `ips`:
/// `version` "4"/"6" matching the address before 1.0.0, none from 1.0.0.
pub fn ips_shape_ok(result: &Value) -> bool {
    let version = result["cniVersion"].as_str().unwrap_or_default();
    let versioned = !at_least(version, "1.0.0");
    result["ips"].as_array().is_some_and(|ips| {
        ips.iter().all(|ip| {
            let addr = ip["address"].as_str().unwrap_or_default();
            let family = if addr.contains(':') { "6" } else { "4" };
            match &ip["version"] {
                Value::Null => !versioned,
                v => versioned && v == family,
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(version: &str) -> Runtime {
        Runtime::from_value(
            json!({"cniVersion": version, "name": "n", "plugins": [{"type": "bridge"}]}),
            &[],
        )
    }

    #[test]
    fn del_sends_the_cached_result_from_0_4_0_only() {
        let cached = json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}]});
        for v in ["0.3.0", "0.3.1"] {
            assert_eq!(runtime(v).del_prev_result(Some(&cached)), None, "{v}");
            assert!(!runtime(v).can_check());
        }
        let in_040 = runtime("0.4.0").del_prev_result(Some(&cached)).unwrap();
        assert_eq!(
            in_040,
            json!({"cniVersion": "0.4.0", "ips": [{"address": "10.0.0.2/24", "version": "4"}]})
        );
        assert!(ips_shape_ok(&in_040));
        assert_eq!(
            runtime("1.0.0").del_prev_result(Some(&in_040)),
            Some(cached.clone())
        );
        assert!(ips_shape_ok(&cached));
        let mut mislabelled = as_version(&cached, "0.4.0");
        mislabelled["cniVersion"] = json!("1.0.0");
        assert!(!ips_shape_ok(&mislabelled), "1.x has no ips[].version");
        mislabelled["cniVersion"] = json!("0.3.1");
        mislabelled["ips"][0]["version"] = json!("6");
        assert!(!ips_shape_ok(&mislabelled), "the version matches the address");
        assert!(runtime("0.4.0").can_check() && runtime("1.0.0").can_check());
    }
}
