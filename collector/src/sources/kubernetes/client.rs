//! The Kubernetes client, configured the standard way: the in-cluster service account when the
//! collector runs in a Pod (`KUBERNETES_SERVICE_HOST` set), else the file(s) named by
//! `KUBECONFIG`. Neither: no client, and the identity source is off (the bare-host default).
//! `~/.kube/config` is never read on its own: an operator's personal configuration on a host
//! must not turn the collector into a client of some cluster.

use std::ffi::OsStr;

use kube::{
    Client,
    config::{InClusterError, KubeConfigOptions, Kubeconfig, KubeconfigError},
};

/// Where the client's configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientOrigin {
    /// The Pod's service account (`/var/run/secrets/kubernetes.io/serviceaccount`).
    InCluster,
    /// The file(s) in `KUBECONFIG`.
    Kubeconfig(String),
}

impl ClientOrigin {
    /// The origin's name in log lines.
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Self::InCluster => "in_cluster",
            Self::Kubeconfig(_) => "kubeconfig",
        }
    }
}

/// kube's errors print their cause in their own text (`"...: {0}"`) and name it as their
/// source too; they are embedded here as text, not as a source, so that each cause prints once.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(InClusterError),
    #[error("KUBECONFIG {path}: {error}")]
    Kubeconfig {
        path: String,
        error: KubeconfigError,
    },
    #[error("Kubernetes client: {0}")]
    Client(kube::Error),
}

/// Which configuration the environment asks for: the in-cluster service account wins.
fn choose(service_host: Option<&OsStr>, kubeconfig: Option<&OsStr>) -> Option<ClientOrigin> {
    if service_host.is_some_and(|h| !h.is_empty()) {
        Some(ClientOrigin::InCluster)
    } else {
        kubeconfig
            .filter(|path| !path.is_empty())
            .map(|path| ClientOrigin::Kubeconfig(path.to_string_lossy().into_owned()))
    }
}

/// A client from the environment's configuration; `None` when there is none.
pub(crate) async fn connect() -> Result<Option<(Client, ClientOrigin)>, ClientError> {
    let Some(origin) = choose(
        std::env::var_os("KUBERNETES_SERVICE_HOST").as_deref(),
        std::env::var_os("KUBECONFIG").as_deref(),
    ) else {
        return Ok(None);
    };
    let config = match &origin {
        ClientOrigin::InCluster => kube::Config::incluster().map_err(ClientError::InCluster)?,
        ClientOrigin::Kubeconfig(path) => {
            let kubeconfig_error = |error| ClientError::Kubeconfig {
                path: path.clone(),
                error,
            };
            let kubeconfig = Kubeconfig::from_env()
                .map_err(kubeconfig_error)?
                .unwrap_or_default();
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(kubeconfig_error)?
        }
    };
    let client = Client::try_from(config).map_err(ClientError::Client)?;
    Ok(Some((client, origin)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_cluster_first_then_kubeconfig_else_off() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(
            choose(s("10.0.0.1"), s("/k")),
            Some(ClientOrigin::InCluster)
        );
        assert_eq!(
            choose(None, s("/etc/k.yaml")),
            Some(ClientOrigin::Kubeconfig("/etc/k.yaml".into()))
        );
        assert_eq!(
            choose(s(""), s("/k")),
            Some(ClientOrigin::Kubeconfig("/k".into()))
        );
        assert_eq!(choose(None, None), None);
        assert_eq!(choose(s(""), s("")), None);
    }
}
