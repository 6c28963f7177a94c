//! The kubeconfig named by `kubernetes.kubeconfig`: where the API server is and how to prove who
//! we are. What the node agent writes is a single cluster (`server` plus
//! `certificate-authority` or `certificate-authority-data`) and a single user (`token` or
//! `tokenFile`); any kubeconfig with a current context (or just one cluster and one user) works
//! the same way. Client certificates (`client-certificate(-data)` + `client-key(-data)`) are
//! accepted too. Relative paths are relative to the kubeconfig's directory, as in client-go.
//!
//! Not supported, each with an error that names the key: `exec` and `auth-provider` plugins,
//! `username`/`password`, `insecure-skip-tls-verify`, `tls-server-name`, `proxy-url`, and servers
//! that are not `https://`.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use serde::de::IgnoredAny;
use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey};

/// What a client needs to reach the API server.
#[derive(Clone)]
pub struct ApiAccess {
    /// `https://host[:port][/prefix]`, without a trailing slash.
    pub server: String,
    /// The CA certificates the server's certificate must chain to.
    pub roots: Vec<Certificate<'static>>,
    pub token: Option<String>,
    pub client_cert: Option<ClientCert>,
}

impl fmt::Debug for ApiAccess {
    /// Never prints the token or the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiAccess")
            .field("server", &self.server)
            .field("roots", &self.roots.len())
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("client_cert", &self.client_cert.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("it is not a kubeconfig (YAML with clusters, users and contexts)")]
    Parse {
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("current-context {name:?} is not among its contexts")]
    NoSuchContext { name: String },
    #[error("its context names {kind} {name:?}, which it does not define")]
    Dangling { kind: &'static str, name: String },
    #[error(
        "it has {contexts} contexts, {clusters} clusters and {users} users and no current-context; set \
         current-context or keep one cluster and one user"
    )]
    Ambiguous {
        contexts: usize,
        clusters: usize,
        users: usize,
    },
    #[error("cluster {cluster:?} has no server")]
    NoServer { cluster: String },
    #[error("cluster {cluster:?} has server {server:?}; meshbypass only talks to an https:// API server")]
    NotHttps { cluster: String, server: String },
    #[error(
        "cluster {cluster:?} has no certificate-authority or certificate-authority-data; the API server's \
         certificate must be verified against the cluster's CA"
    )]
    NoCa { cluster: String },
    #[error("{key} is not supported; {fix}")]
    Unsupported { key: &'static str, fix: &'static str },
    #[error("{key} is not valid base64")]
    Base64 {
        key: &'static str,
        #[source]
        source: base64::DecodeError,
    },
    #[error("{key} holds no PEM {what}")]
    NoPem { key: &'static str, what: &'static str },
    #[error("{key} is not valid PEM")]
    Pem {
        key: &'static str,
        #[source]
        source: ureq::Error,
    },
    #[error("client-certificate and client-key must be given together")]
    HalfClientCert,
    #[error("the token in {key} is empty")]
    EmptyToken { key: &'static str },
}

/// Reads and resolves the kubeconfig at `path`, with the files it names.
pub fn load(path: &Path) -> Result<ApiAccess, KubeconfigError> {
    let text = read_bounded(path)?;
    parse(&text, path.parent().unwrap_or(Path::new("/")))
}

/// Resolves a kubeconfig document held in memory; relative paths in it are relative to `base`.
/// (The node agent asks the API server with what it writes for the plugin, before writing it.)
pub fn parse(text: &[u8], base: &Path) -> Result<ApiAccess, KubeconfigError> {
    let raw: RawKubeconfig =
        serde_yaml_ng::from_slice(text).map_err(|source| KubeconfigError::Parse { source })?;
    resolve(raw, base)
}

#[derive(Deserialize)]
struct RawKubeconfig {
    #[serde(default)]
    clusters: Option<Vec<NamedCluster>>,
    #[serde(default)]
    users: Option<Vec<NamedUser>>,
    #[serde(default)]
    contexts: Option<Vec<NamedContext>>,
    #[serde(default, rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: RawCluster,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: Option<RawUser>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: RawContext,
}

#[derive(Deserialize)]
struct RawContext {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawCluster {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    certificate_authority: Option<PathBuf>,
    #[serde(default)]
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: Option<bool>,
    #[serde(default)]
    tls_server_name: Option<String>,
    #[serde(default)]
    proxy_url: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RawUser {
    #[serde(default)]
    token: Option<String>,
    #[serde(default, rename = "tokenFile")]
    token_file: Option<PathBuf>,
    #[serde(default)]
    client_certificate: Option<PathBuf>,
    #[serde(default)]
    client_certificate_data: Option<String>,
    #[serde(default)]
    client_key: Option<PathBuf>,
    #[serde(default)]
    client_key_data: Option<String>,
    #[serde(default)]
    username: Option<IgnoredAny>,
    #[serde(default)]
    exec: Option<IgnoredAny>,
    #[serde(default)]
    auth_provider: Option<IgnoredAny>,
}

fn resolve(raw: RawKubeconfig, base: &Path) -> Result<ApiAccess, KubeconfigError> {
    let clusters = raw.clusters.unwrap_or_default();
    let mut users = raw.users.unwrap_or_default();
    let contexts = raw.contexts.unwrap_or_default();
    let context = match raw.current_context.filter(|name| !name.is_empty()) {
        Some(name) => match contexts.iter().find(|c| c.name == name) {
            Some(c) => Some(&c.context),
            None => return Err(KubeconfigError::NoSuchContext { name }),
        },
        None if contexts.len() == 1 => Some(&contexts[0].context),
        None => None,
    };
    let ambiguous = || KubeconfigError::Ambiguous {
        contexts: contexts.len(),
        clusters: clusters.len(),
        users: users.len(),
    };
    let (cluster, user) =
        match context {
            Some(ctx) => {
                let cluster = clusters.iter().find(|c| c.name == ctx.cluster).ok_or_else(|| {
                    KubeconfigError::Dangling {
                        kind: "cluster",
                        name: ctx.cluster.clone(),
                    }
                })?;
                let user = match ctx.user.as_deref().filter(|u| !u.is_empty()) {
                    None => None,
                    Some(name) => {
                        let at = users.iter().position(|u| u.name == name).ok_or_else(|| {
                            KubeconfigError::Dangling {
                                kind: "user",
                                name: name.to_owned(),
                            }
                        })?;
                        Some(users.swap_remove(at))
                    }
                };
                (cluster, user)
            }
            None if clusters.len() == 1 && users.len() <= 1 => (&clusters[0], users.pop()),
            None => return Err(ambiguous()),
        };
    let user = user.and_then(|u| u.user).unwrap_or_default();
    let server = cluster_server(cluster)?;
    let roots = cluster_roots(cluster, base)?;
    let token = user_token(&user, base)?;
    let client_cert = user_cert(&user, base)?;
    Ok(ApiAccess {
        server,
        roots,
        token,
        client_cert,
    })
}

fn cluster_server(named: &NamedCluster) -> Result<String, KubeconfigError> {
    let cluster = &named.cluster;
    refuse([
        (
            cluster.insecure_skip_tls_verify == Some(true),
            "insecure-skip-tls-verify",
            "give the cluster's certificate-authority instead",
        ),
        (
            cluster.tls_server_name.is_some(),
            "tls-server-name",
            "use a server address that the API server's certificate names",
        ),
        (
            cluster.proxy_url.is_some(),
            "proxy-url",
            "the plugin connects to the API server directly",
        ),
    ])?;
    let server = cluster
        .server
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| KubeconfigError::NoServer {
            cluster: named.name.clone(),
        })?;
    if !server.starts_with("https://") {
        return Err(KubeconfigError::NotHttps {
            cluster: named.name.clone(),
            server: server.to_owned(),
        });
    }
    Ok(server.trim_end_matches('/').to_owned())
}

/// The first key that is set, of `(set, key, fix)`, is an [`KubeconfigError::Unsupported`].
fn refuse<const N: usize>(keys: [(bool, &'static str, &'static str); N]) -> Result<(), KubeconfigError> {
    match keys.into_iter().find(|(set, _, _)| *set) {
        Some((_, key, fix)) => Err(KubeconfigError::Unsupported { key, fix }),
        None => Ok(()),
    }
}

fn cluster_roots(named: &NamedCluster, base: &Path) -> Result<Vec<Certificate<'static>>, KubeconfigError> {
    let cluster = &named.cluster;
    // As in client-go, the inline data wins over the file.
    let pem = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => base64_decode("certificate-authority-data", data)?,
        (None, Some(file)) => read(base, file)?,
        (None, None) => {
            return Err(KubeconfigError::NoCa {
                cluster: named.name.clone(),
            });
        }
    };
    let key = if cluster.certificate_authority_data.is_some() {
        "certificate-authority-data"
    } else {
        "certificate-authority"
    };
    let mut roots = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item.map_err(|source| KubeconfigError::Pem { key, source })? {
            PemItem::Certificate(cert) => roots.push(cert),
            _ => continue,
        }
    }
    if roots.is_empty() {
        return Err(KubeconfigError::NoPem {
            key,
            what: "certificate",
        });
    }
    Ok(roots)
}

fn user_token(user: &RawUser, base: &Path) -> Result<Option<String>, KubeconfigError> {
    let token_instead = "give the node agent's service account token in token or tokenFile";
    refuse([
        (user.exec.is_some(), "users[].user.exec", token_instead),
        (
            user.auth_provider.is_some(),
            "users[].user.auth-provider",
            token_instead,
        ),
        (
            user.username.is_some(),
            "users[].user.username",
            "basic authentication is gone from Kubernetes; use a token",
        ),
    ])?;
    // The file wins, as in client-go: the node agent rewrites it when the token rotates.
    let (key, token) = match (&user.token_file, &user.token) {
        (Some(file), _) => (
            "tokenFile",
            String::from_utf8_lossy(&read(base, file)?).into_owned(),
        ),
        (None, Some(token)) => ("token", token.clone()),
        (None, None) => return Ok(None),
    };
    let token = token.trim();
    if token.is_empty() {
        return Err(KubeconfigError::EmptyToken { key });
    }
    Ok(Some(token.to_owned()))
}

fn user_cert(user: &RawUser, base: &Path) -> Result<Option<ClientCert>, KubeconfigError> {
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(data), _) => Some((
            "client-certificate-data",
            base64_decode("client-certificate-data", data)?,
        )),
        (None, Some(file)) => Some(("client-certificate", read(base, file)?)),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(data), _) => Some(("client-key-data", base64_decode("client-key-data", data)?)),
        (None, Some(file)) => Some(("client-key", read(base, file)?)),
        (None, None) => None,
    };
    let ((cert_key, cert_pem), (key_key, key_pem)) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => return Err(KubeconfigError::HalfClientCert),
    };
    let mut chain = Vec::new();
    for item in ureq::tls::parse_pem(&cert_pem) {
        if let PemItem::Certificate(c) = item.map_err(|source| KubeconfigError::Pem {
            key: cert_key,
            source,
        })? {
            chain.push(c);
        }
    }
    if chain.is_empty() {
        return Err(KubeconfigError::NoPem {
            key: cert_key,
            what: "certificate",
        });
    }
    let key =
        PrivateKey::from_pem(&key_pem).map_err(|source| KubeconfigError::Pem { key: key_key, source })?;
    Ok(Some(ClientCert::new_with_certs(&chain, key)))
}

fn base64_decode(key: &'static str, data: &str) -> Result<Vec<u8>, KubeconfigError> {
    let compact: String = data.split_whitespace().collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|source| KubeconfigError::Base64 { key, source })
}

/// A file the kubeconfig names, relative to the kubeconfig's directory unless absolute.
fn read(base: &Path, file: &Path) -> Result<Vec<u8>, KubeconfigError> {
    read_bounded(&base.join(file))
}

/// Kubeconfigs, tokens and certificates are kilobytes: 4 MiB bounds a
/// misconfigured path (a device, a log) without limiting real files.
const MAX_FILE: u64 = 4 << 20;

fn read_bounded(path: &Path) -> Result<Vec<u8>, KubeconfigError> {
    use std::io::Read;
    let err = |source| KubeconfigError::Read {
        path: path.into(),
        source,
    };
    let mut buf = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_end(&mut buf))
        .map_err(err)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(err(std::io::Error::other("larger than 4 MiB: not a kubeconfig")));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("self-signed").pem()
    }

    fn b64(data: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(data)
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    #[test]
    fn node_agent_kubeconfig_with_token_file_and_ca_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "ca.crt", &ca_pem());
        write(dir.path(), "token", "  eyJhbGciOi.token \n");
        let path = write(
            dir.path(),
            "kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: https://10.96.0.1:443/\n    \
             certificate-authority: ca.crt\nusers:\n- name: meshbypass\n  user:\n    tokenFile: token\n\
             contexts:\n- name: meshbypass\n  context:\n    cluster: local\n    user: meshbypass\n\
             current-context: meshbypass\n",
        );
        let access = load(&path).expect("loads");
        assert_eq!(access.server, "https://10.96.0.1:443");
        assert_eq!(access.roots.len(), 1);
        assert_eq!(access.token.as_deref(), Some("eyJhbGciOi.token"));
        assert!(access.client_cert.is_none());
        let debug = format!("{access:?}");
        assert!(!debug.contains("eyJ"), "the token never shows in Debug: {debug}");
    }

    /// The JSON document install/src/kubeconfig.rs writes (CA and token inline).
    #[test]
    fn node_agent_json_kubeconfig() {
        let dir = tempfile::tempdir().expect("tempdir");
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": "https://[fd00:10:96::1]:443",
                "certificate-authority-data": b64(&ca_pem()),
            }}],
            "users": [{"name": "meshbypass", "user": {"token": "eyJhbGciOi.token"}}],
            "contexts": [{"name": "meshbypass", "context": {"cluster": "local", "user": "meshbypass"}}],
            "current-context": "meshbypass",
        });
        let path = write(
            dir.path(),
            "meshbypass-kubeconfig",
            &serde_json::to_string_pretty(&doc).expect("JSON"),
        );
        let access = load(&path).expect("loads");
        assert_eq!(access.server, "https://[fd00:10:96::1]:443");
        assert_eq!(access.token.as_deref(), Some("eyJhbGciOi.token"));
        assert_eq!(access.roots.len(), 1);
    }

    #[test]
    fn inline_data_without_context_and_client_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["node".to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let path = write(
            dir.path(),
            "kubeconfig",
            &format!(
                "clusters:\n- name: c\n  cluster:\n    server: https://api.example:6443\n    \
                 certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    \
                 client-key-data: {}\n",
                b64(&ca_pem()),
                b64(&cert.pem()),
                b64(&key.serialize_pem())
            ),
        );
        let access = load(&path).expect("loads");
        assert_eq!(access.server, "https://api.example:6443");
        assert!(access.token.is_none());
        assert!(access.client_cert.is_some());
    }

    #[test]
    fn misconfigurations_name_what_to_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = b64(&ca_pem());
        let cluster = |extra: &str| {
            format!(
                "clusters:\n- name: c\n  cluster:\n    server: https://h:6443\n    certificate-authority-data: {ca}\n{extra}"
            )
        };
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "not a kubeconfig"),
            ("clusters: []\n".into(), "0 clusters"),
            (
                "clusters:\n- name: c\n  cluster:\n    server: http://h:8080\n    certificate-authority-data: x\n"
                    .into(),
                "https://",
            ),
            (
                "clusters:\n- name: c\n  cluster:\n    server: https://h:6443\n".into(),
                "no certificate-authority",
            ),
            (
                cluster("    insecure-skip-tls-verify: true\n"),
                "insecure-skip-tls-verify",
            ),
            (
                cluster("users:\n- name: u\n  user:\n    exec:\n      command: aws\n"),
                "exec",
            ),
            (
                cluster("users:\n- name: u\n  user:\n    tokenFile: /nonexistent/token\n"),
                "/nonexistent/token",
            ),
            (cluster("users:\n- name: u\n  user:\n    token: ' '\n"), "empty"),
            (cluster("current-context: other\n"), "other"),
            (
                "clusters:\n- name: c\n  cluster:\n    server: https://h\n    certificate-authority-data: '!!'\n"
                    .into(),
                "base64",
            ),
            (
                format!(
                    "clusters:\n- name: c\n  cluster:\n    server: https://h\n    certificate-authority-data: {}\n",
                    b64("not pem")
                ),
                "no PEM",
            ),
        ];
        for (text, expect) in cases {
            let path = write(dir.path(), "kubeconfig", &text);
            let err = load(&path).expect_err(&text);
            let chain = meshbypass_ebpf::chain::error_chain(&err);
            assert!(
                chain.contains(expect),
                "{text:?} → {chain:?} should mention {expect:?}"
            );
        }
        let err = load(&dir.path().join("missing")).expect_err("no file");
        assert!(matches!(err, KubeconfigError::Read { .. }), "{err:?}");
    }
}
