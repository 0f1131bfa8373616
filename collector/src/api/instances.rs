//! `/v1/instances` and `/v1/instances/{uuid}`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{
    ApiState, error,
    views::{InstanceView, VcpuThread},
};
use crate::{
    host::proc,
    matching::Matchers,
    model::{instance::Instance, time},
};

fn view(instance: &Instance, matchers: &Matchers) -> InstanceView {
    let matcher = matchers.by_name(&instance.matcher);
    let vcpu_threads = proc::threads(instance.pid)
        .into_iter()
        .filter_map(|(tid, name)| {
            let index = matcher?.vcpu_index(&name)?;
            Some(VcpuThread { tid, index, name })
        })
        .collect();
    InstanceView {
        instance_uuid: instance.instance_uuid.clone(),
        hypervisor: instance.hypervisor.clone(),
        pid: instance.pid,
        start_time: time::rfc3339(instance.start_time),
        origin: instance.origin.as_str().to_owned(),
        executable: instance.executable.clone(),
        vcpu_threads,
        instance_dir: instance.instance_dir.clone(),
    }
}

/// The views of the instances `pick` selects, built off the async workers (they read /proc).
async fn views(
    state: &ApiState,
    pick: impl FnOnce(&crate::model::instance::Snapshot) -> Vec<Instance> + Send + 'static,
) -> Option<Vec<InstanceView>> {
    let snapshot = state.snapshot.borrow().clone();
    let matchers = state.matchers.clone();
    tokio::task::spawn_blocking(move || {
        pick(&snapshot).iter().map(|i| view(i, &matchers)).collect()
    })
    .await
    .ok()
}

pub(super) async fn list(State(state): State<ApiState>) -> Response {
    match views(&state, |s| s.by_pid.values().cloned().collect()).await {
        Some(list) => Json(list).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub(super) async fn one(State(state): State<ApiState>, Path(uuid): Path<String>) -> Response {
    let found = views(&state, move |s| s.by_uuid(&uuid).take(1).cloned().collect()).await;
    match found.and_then(|v| v.into_iter().next()) {
        Some(instance) => Json(instance).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such instance"),
    }
}
