//! The plugin's kubeconfig, made from the agent's service account: the
//! plugin runs on the host (exec'd by the runtime), where the pod's token
//! mount is not visible, so the token and the CA are embedded. Written as
//! JSON (which every kubeconfig loader reads, being YAML) with mode 0600,
//! atomically, and rewritten when the token rotates.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde_json::json;

/// Where a pod finds its service account.
pub const DEFAULT_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const DEFAULT_CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Beside the conflists, not ending in .conf/.conflist/.json (libcni skips it).
pub const DEFAULT_KUBECONFIG_OUT: &str = "/etc/cni/net.d/meshbypass-kubeconfig";

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the service account token {} is empty", path.display())]
    EmptyToken { path: PathBuf },
}

/// The API server as a pod sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServer {
    pub host: String,
    pub port: String,
}

impl ApiServer {
    /// From `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT` (443 when unset).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let host = get("KUBERNETES_SERVICE_HOST").filter(|h| !h.is_empty())?;
        let port = get("KUBERNETES_SERVICE_PORT")
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "443".into());
        Some(Self { host, port })
    }

    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("https://[{}]:{}", self.host, self.port)
        } else {
            format!("https://{}:{}", self.host, self.port)
        }
    }
}

/// The service account files; `None` from [`ServiceAccount::read`] when not
/// in a cluster (no token file).
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

/// What the kubeconfig is made of, read once per refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub token: String,
    pub ca: Vec<u8>,
}

impl ServiceAccount {
    /// Whether this looks like a pod with a service account.
    pub fn present(&self) -> bool {
        self.token_file.exists() && self.ca_file.exists()
    }

    pub fn read(&self) -> Result<Credentials, KubeconfigError> {
        let read = |path: &Path| {
            fs::read(path).map_err(|source| KubeconfigError::Read {
                path: path.into(),
                source,
            })
        };
        let token = String::from_utf8_lossy(&read(&self.token_file)?)
            .trim()
            .to_owned();
        if token.is_empty() {
            return Err(KubeconfigError::EmptyToken {
                path: self.token_file.clone(),
            });
        }
        Ok(Credentials {
            token,
            ca: read(&self.ca_file)?,
        })
    }
}

/// The kubeconfig document.
pub fn render(server: &ApiServer, creds: &Credentials) -> Vec<u8> {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server.url(),
            "certificate-authority-data": base64(&creds.ca),
        }}],
        "users": [{"name": "meshbypass", "user": {"token": creds.token}}],
        "contexts": [{"name": "meshbypass", "context": {"cluster": "local", "user": "meshbypass"}}],
        "current-context": "meshbypass",
    });
    let mut out = serde_json::to_vec_pretty(&doc).expect("a serde_json::Value always serializes");
    out.push(b'\n');
    out
}

/// Standard base64 with padding (RFC 4648 §4), as kubeconfig's `*-data` keys want.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "base64({input:?})");
        }
    }

    #[test]
    fn server_url_brackets_ipv6() {
        let env = |host: &'static str| {
            move |k: &str| match k {
                "KUBERNETES_SERVICE_HOST" => Some(host.to_owned()),
                _ => None,
            }
        };
        assert_eq!(
            ApiServer::from_env(env("10.96.0.1")).expect("server").url(),
            "https://10.96.0.1:443"
        );
        assert_eq!(
            ApiServer::from_env(env("fd00::1")).expect("server").url(),
            "https://[fd00::1]:443"
        );
        assert_eq!(ApiServer::from_env(|_: &str| None), None);
    }

    #[test]
    fn renders_a_kubeconfig_with_embedded_ca_and_token() {
        let server = ApiServer {
            host: "10.96.0.1".into(),
            port: "6443".into(),
        };
        let creds = Credentials {
            token: "tok\"en".into(),
            ca: b"-----BEGIN CERTIFICATE-----\n".to_vec(),
        };
        let doc: serde_json::Value = serde_json::from_slice(&render(&server, &creds)).expect("valid JSON");
        assert_eq!(doc["clusters"][0]["cluster"]["server"], "https://10.96.0.1:6443");
        assert_eq!(doc["users"][0]["user"]["token"], "tok\"en");
        assert_eq!(
            doc["clusters"][0]["cluster"]["certificate-authority-data"],
            base64(b"-----BEGIN CERTIFICATE-----\n")
        );
        assert_eq!(doc["current-context"], "meshbypass");
    }
}
