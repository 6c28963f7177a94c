//! A minimal, blocking Kubernetes API client: `GET` of one object as JSON over HTTPS (rustls with
//! ring, the cluster's CA only, a bearer token or a client certificate), retried until a deadline.
//!
//! Why not kube-rs: the plugin is a short-lived process that makes at most two GETs per ADD, and
//! kube-rs brings an async runtime (tokio), hyper, tower and the generated API types (k8s-openapi)
//! for that. Measured on this project's machine with the same fake API server: the release
//! binary grows by 2.5 MB stripped with this client and by 6.1 MB with kube 2.0 + k8s-openapi 0.26
//! (rustls/ring both); ADD with the pod and namespace GETs takes 7.3 ms p50 here and 6.8 ms with
//! kube-rs (each a new TLS connection; 1.8 ms without the API): latency is a wash, size is not.
//!
//! Every failure to get an answer — connection refused or reset, TLS, a timeout, any HTTP status
//! but 200 (401 and 403 included: the token may be rotating, the RBAC rule may be on its way), or
//! an object that is not the one asked for yet — is retried with a growing pause until the
//! deadline, then reported as [`ApiError::GaveUp`] with the last failure. Only an answer that
//! arrived whole and does not decode is final ([`ApiError::Decode`]).

use std::fmt;
use std::io::Read as _;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use log::{debug, warn};
use serde::de::DeserializeOwned;
use ureq::tls::{RootCerts, TlsConfig, TlsProvider};

use crate::kubeconfig::ApiAccess;

/// The first pause between attempts; doubled after each failure up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// The least time worth starting another attempt with.
const MIN_ATTEMPT: Duration = Duration::from_millis(200);
/// An unreachable address should not eat the whole budget in one attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Far above any Pod or Namespace object.
const MAX_BODY: u64 = 4 << 20;
/// How much of an error body ends up in the message.
const MAX_ERROR_TEXT: usize = 300;

/// Why one attempt, or the whole lookup, failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("GET {url}: {status} {}", reason(*status, message))]
    Status {
        url: String,
        status: u16,
        message: String,
        /// What the body says when it is a Kubernetes `Status` (a proxy or a
        /// server that is not the API server sends something else).
        body: StatusBody,
    },
    #[error("GET {url}")]
    Transport {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("GET {url}: {reason}")]
    NotYet { url: String, reason: String },
    #[error("GET {url}: the answer is not the expected JSON object")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("no answer from the API server after {attempts} attempts in {:.1} s", elapsed.as_secs_f64())]
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        #[source]
        last: Box<ApiError>,
    },
}

/// The machine-readable part of a Kubernetes `Status` answer; empty strings
/// when the body is not one.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct StatusBody {
    /// `Status.reason`: `NotFound`, `Forbidden`, ...
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub details: StatusDetails,
}

/// `Status.details`: which object the answer is about.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct StatusDetails {
    #[serde(default)]
    pub name: String,
    /// The resource, lowercase plural (`daemonsets`).
    #[serde(default)]
    pub kind: String,
}

impl ApiError {
    /// The Kubernetes `Status` of the last attempt, if the API server said
    /// why it failed.
    pub fn status_body(&self) -> Option<&StatusBody> {
        match self {
            ApiError::Status { body, .. } => Some(body),
            ApiError::GaveUp { last, .. } => last.status_body(),
            _ => None,
        }
    }

    /// The HTTP status of the last attempt, if the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            ApiError::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }
}

/// The server's own words (a `Status` object's `message`) and what to check for the usual cases.
fn reason(status: u16, message: &str) -> String {
    let hint = match status {
        401 => " (the token in the kubeconfig is not accepted: expired, or of a deleted service account)",
        403 => " (the node agent's ClusterRole must allow get on pods and namespaces)",
        404 => " (not known to the API server yet)",
        429 => " (the API server is throttling)",
        _ => "",
    };
    if message.is_empty() {
        format!("{}{hint}", status_text(status))
    } else {
        format!("{}: {message}{hint}", status_text(status))
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// A client for one API server.
pub struct Client {
    agent: ureq::Agent,
    server: String,
    authorization: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(access: ApiAccess) -> Client {
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(RootCerts::new_with_certs(&access.roots))
            .client_cert(access.client_cert)
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            // The kubeconfig's server, directly; a proxy from the runtime's environment is not
            // ours to use with the node agent's token.
            .proxy(None)
            .max_redirects(0)
            .http_status_as_error(false)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .user_agent(concat!("meshbypass-cni/", env!("CARGO_PKG_VERSION")))
            .accept("application/json")
            .build()
            .new_agent();
        Client {
            agent,
            server: access.server,
            authorization: access.token.map(|token| format!("Bearer {token}")),
        }
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// `GET {server}{path}` decoded as `T`, retried until `deadline` while the API server cannot
    /// answer or `ready` says the object is not the one expected yet (`Err(reason)`).
    pub fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        deadline: Instant,
        ready: impl Fn(&T) -> Result<(), String>,
    ) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.server);
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let failure = match self.attempt(&url, remaining) {
                Ok(body) => match serde_json::from_slice::<T>(&body) {
                    Err(source) => return Err(ApiError::Decode { url, source }),
                    Ok(object) => match ready(&object) {
                        Ok(()) => {
                            debug!("GET {url}: 200 after {attempts} attempt(s)");
                            return Ok(object);
                        }
                        Err(reason) => ApiError::NotYet {
                            url: url.clone(),
                            reason,
                        },
                    },
                },
                Err(e) => e,
            };
            // Not enough time left for a pause and a real attempt: an attempt cut short by the
            // deadline would only replace this failure with a less telling timeout.
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining < pause + MIN_ATTEMPT {
                return Err(ApiError::GaveUp {
                    attempts,
                    elapsed: started.elapsed(),
                    last: Box::new(failure),
                });
            }
            warn!("{failure}; trying again");
            thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One `GET {server}{path}` with `budget` for all of it, decoded as `T`; no retry, so the
    /// caller sees each answer's status (the node agent tells "gone" from "cannot say").
    pub fn get_once<T: DeserializeOwned>(&self, path: &str, budget: Duration) -> Result<T, ApiError> {
        let url = format!("{}{path}", self.server);
        let body = self.attempt(&url, budget)?;
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode { url, source })
    }

    /// One request with `budget` for all of it; the body of a 200.
    fn attempt(&self, url: &str, budget: Duration) -> Result<Vec<u8>, ApiError> {
        let transport = |source| ApiError::Transport {
            url: url.to_owned(),
            source,
        };
        let mut request = self
            .agent
            .get(url)
            .config()
            .timeout_global(Some(budget.max(Duration::from_millis(1))))
            .build();
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        let mut response = request.call().map_err(transport)?;
        let status = response.status().as_u16();
        let mut body = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(MAX_BODY)
            .read_to_end(&mut body)
            .map_err(|e| transport(ureq::Error::Io(e)))?;
        if status == 200 {
            return Ok(body);
        }
        Err(ApiError::Status {
            url: url.to_owned(),
            status,
            message: status_message(&body),
            body: serde_json::from_slice(&body).unwrap_or_default(),
        })
    }
}

/// The `message` of a Kubernetes `Status` body, or the start of whatever else came.
fn status_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Status {
        #[serde(default)]
        message: String,
    }
    let text = match serde_json::from_slice::<Status>(body) {
        Ok(status) => status.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_owned(),
    };
    match text.char_indices().nth(MAX_ERROR_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_messages_say_what_to_check() {
        let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"pods \"web-0\" is forbidden: User \"system:serviceaccount:meshbypass-system:meshbypass\" cannot get resource \"pods\"","reason":"Forbidden","code":403}"#;
        let err = ApiError::Status {
            url: "https://h/api/v1/namespaces/default/pods/web-0".into(),
            status: 403,
            message: status_message(body),
            body: serde_json::from_slice(body).unwrap(),
        };
        assert_eq!(err.status_body().map(|b| b.reason.as_str()), Some("Forbidden"));
        let text = err.to_string();
        assert!(
            text.contains("403 Forbidden: pods \"web-0\" is forbidden"),
            "{text}"
        );
        assert!(text.contains("ClusterRole"), "{text}");
        assert_eq!(
            status_message(b"<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            status_message(long.as_bytes()).chars().count(),
            MAX_ERROR_TEXT + 1
        );
    }
}
