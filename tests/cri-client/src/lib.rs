//! A blocking client for the Kubernetes Container Runtime Interface (CRI v1),
//! the gRPC API kubelet speaks to containerd and CRI-O, over a unix socket.
//! The messages and the service stubs are `k8s-cri`'s (generated from the
//! CRI's `api.proto` with tonic/prost); this crate only connects and gives
//! the pod sandbox calls a synchronous face, so the privileged tests can
//! drive a runtime exactly as kubelet does without becoming async.

use std::{path::PathBuf, time::Duration};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ListPodSandboxRequest, PodSandbox, PodSandboxConfig, PodSandboxStatusRequest, PodSandboxStatusResponse,
    RemovePodSandboxRequest, RunPodSandboxRequest, StatusRequest, StatusResponse, StopPodSandboxRequest,
    VersionRequest, VersionResponse, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The CRI v1 messages, for building requests and reading replies.
pub use k8s_cri::v1 as api;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the client's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot connect to the CRI socket {}", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {method} failed")]
    Call {
        method: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("CRI {method} did not answer within {timeout:?}")]
    Timeout { method: &'static str, timeout: Duration },
}

/// One connection to a CRI runtime's socket. Every call has a deadline.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    timeout: Duration,
}

impl Cri {
    /// Connects to the unix socket at `socket`; each later call must answer
    /// within `timeout`.
    pub fn connect(socket: impl Into<PathBuf>, timeout: Duration) -> Result<Self, Error> {
        let socket = socket.into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let path = socket.clone();
        // The URI is a placeholder: the connector dials the socket.
        let endpoint = Endpoint::from_static("http://[::]:0").connect_timeout(timeout);
        let channel = rt
            .block_on(
                endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
                    }
                })),
            )
            .map_err(|source| Error::Connect { socket, source })?;
        Ok(Self {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            timeout,
        })
    }

    /// Runs one call on the client's runtime under the deadline.
    fn call<T>(
        &self,
        method: &'static str,
        fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, Error> {
        let timeout = self.timeout;
        self.rt
            .block_on(async { tokio::time::timeout(timeout, fut).await })
            .map_err(|_| Error::Timeout { method, timeout })?
            .map(tonic::Response::into_inner)
            .map_err(|source| Error::Call { method, source })
    }

    /// `Version`: the runtime's name and version, and the CRI version it speaks.
    pub fn version(&self) -> Result<VersionResponse, Error> {
        let mut c = self.runtime.clone();
        self.call("Version", async move {
            c.version(VersionRequest { version: "v1".into() }).await
        })
    }

    /// `Status` (verbose): the RuntimeReady and NetworkReady conditions.
    pub fn status(&self) -> Result<StatusResponse, Error> {
        let mut c = self.runtime.clone();
        self.call("Status", async move {
            c.status(StatusRequest { verbose: true }).await
        })
    }

    /// `RunPodSandbox`: creates the sandbox (the runtime sets up its network
    /// through CNI ADD) and returns its ID.
    pub fn run_pod_sandbox(&self, config: PodSandboxConfig) -> Result<String, Error> {
        let mut c = self.runtime.clone();
        self.call("RunPodSandbox", async move {
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
        })
        .map(|r| r.pod_sandbox_id)
    }

    /// `PodSandboxStatus` (verbose: `info` carries the runtime's own details,
    /// for containerd the OCI spec with the sandbox's netns path).
    pub fn pod_sandbox_status(&self, id: &str) -> Result<PodSandboxStatusResponse, Error> {
        let mut c = self.runtime.clone();
        let id = id.to_owned();
        self.call("PodSandboxStatus", async move {
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })
    }

    /// `StopPodSandbox`: stops the sandbox and tears down its network (CNI DEL).
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), Error> {
        let mut c = self.runtime.clone();
        let id = id.to_owned();
        self.call("StopPodSandbox", async move {
            c.stop_pod_sandbox(StopPodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
    }

    /// `RemovePodSandbox`: removes a stopped sandbox (CNI DEL once more when
    /// its network was not torn down yet).
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), Error> {
        let mut c = self.runtime.clone();
        let id = id.to_owned();
        self.call("RemovePodSandbox", async move {
            c.remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id: id })
                .await
        })
        .map(drop)
    }

    /// `ListPodSandbox`: every sandbox the runtime knows.
    pub fn list_pod_sandbox(&self) -> Result<Vec<PodSandbox>, Error> {
        let mut c = self.runtime.clone();
        self.call("ListPodSandbox", async move {
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None }).await
        })
        .map(|r| r.items)
    }

    /// `ListImages` (image service): the references of every image.
    pub fn list_images(&self) -> Result<Vec<String>, Error> {
        let mut c = self.images.clone();
        self.call("ListImages", async move {
            c.list_images(api::ListImagesRequest { filter: None }).await
        })
        .map(|r| r.images.into_iter().flat_map(|i| i.repo_tags).collect())
    }
}
