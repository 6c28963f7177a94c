//! A CNI runtime in miniature, executing a conflist as the spec says
//! (SPEC.md, "Execution of Network Configurations"): ADD runs the plugins in
//! order, each getting the previous result as `prevResult`; DEL runs them in
//! reverse with the cached ADD result; CHECK in order with it. Plugins are
//! found on CNI_PATH by `type`.

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
        let mut prev: Option<Value> = None;
        for p in self.plugins() {
            let t = p["type"].as_str().unwrap().to_owned();
            let r = self.exec(&t, "ADD", Some(att), &self.config_for(&p, prev.as_ref()))?;
            prev = Some(r);
        }
        Ok(prev.unwrap_or(Value::Null))
    }

    /// DEL in reverse order, with the cached ADD result when there is one.
    pub fn del(&self, att: &Attachment, cached: Option<&Value>) -> Result<(), PluginError> {
        for p in self.plugins().iter().rev() {
            let t = p["type"].as_str().unwrap().to_owned();
            self.exec(&t, "DEL", Some(att), &self.config_for(p, cached))?;
        }
        Ok(())
    }

    /// CHECK in order with the cached ADD result.
    pub fn check(&self, att: &Attachment, cached: &Value) -> Result<(), PluginError> {
        for p in self.plugins() {
            let t = p["type"].as_str().unwrap().to_owned();
            self.exec(&t, "CHECK", Some(att), &self.config_for(&p, Some(cached)))?;
        }
        Ok(())
    }

    /// One plugin's entry, by type.
    pub fn plugin(&self, plugin_type: &str) -> Value {
        self.plugins()
            .into_iter()
            .find(|p| p["type"] == plugin_type)
            .unwrap_or_else(|| panic!("no {plugin_type} in the conflist"))
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
