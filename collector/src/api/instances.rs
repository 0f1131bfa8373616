//! `/v1/instances` and `/v1/instances/{uuid}`.

use axum::{
    Json,
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use super::{
    ApiState, error,
    views::{InstanceView, STATE_CREATED, STATE_RUNNING, VcpuThread},
};
use crate::{
    host::proc,
    matching::Matchers,
    model::{
        identity::PodBacked,
        instance::{Instance, Snapshot},
        time,
    },
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
        state: STATE_RUNNING.to_owned(),
        hypervisor: Some(instance.hypervisor.clone()),
        pid: Some(instance.pid),
        start_time: Some(time::rfc3339(instance.start_time)),
        origin: Some(instance.origin.as_str().to_owned()),
        executable: Some(instance.executable.clone()),
        vcpu_threads,
        instance_dir: instance.instance_dir.clone(),
        identity: instance.identity.clone(),
    }
}

/// An instance a Pod backs and no VMM runs.
fn created_view(uuid: &str, pod: &PodBacked) -> InstanceView {
    InstanceView {
        instance_uuid: uuid.to_owned(),
        state: STATE_CREATED.to_owned(),
        hypervisor: pod.hypervisor.clone(),
        pid: None,
        start_time: None,
        origin: None,
        executable: None,
        vcpu_threads: Vec::new(),
        instance_dir: None,
        identity: Some(pod.identity.clone()),
    }
}

/// The views of the running instances and the created ones `pick` selects, built off the
/// async workers (they read /proc).
async fn views(
    state: &ApiState,
    pick: impl FnOnce(&Snapshot) -> (Vec<Instance>, Vec<(String, PodBacked)>) + Send + 'static,
) -> Option<Vec<InstanceView>> {
    let snapshot = state.snapshot.borrow().clone();
    let matchers = state.matchers.clone();
    tokio::task::spawn_blocking(move || {
        let (running, created) = pick(&snapshot);
        running
            .iter()
            .map(|i| view(i, &matchers))
            .chain(created.iter().map(|(uuid, pod)| created_view(uuid, pod)))
            .collect()
    })
    .await
    .ok()
}

fn created(snapshot: &Snapshot, only: Option<&str>) -> Vec<(String, PodBacked)> {
    snapshot
        .not_running()
        .filter(|(uuid, _)| only.is_none_or(|o| o == uuid.as_str()))
        .map(|(uuid, pod)| (uuid.clone(), pod.clone()))
        .collect()
}

pub(super) async fn list(State(state): State<ApiState>) -> Response {
    let all = |s: &Snapshot| (s.by_pid.values().cloned().collect(), created(s, None));
    match views(&state, all).await {
        Some(list) => Json(list).into_response(),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

pub(super) async fn one(State(state): State<ApiState>, Path(uuid): Path<String>) -> Response {
    let found = views(&state, move |s| {
        let running: Vec<Instance> = s.by_uuid(&uuid).take(1).cloned().collect();
        let created = if running.is_empty() {
            created(s, Some(&uuid))
        } else {
            Vec::new()
        };
        (running, created)
    })
    .await;
    match found.and_then(|v| v.into_iter().next()) {
        Some(instance) => Json(instance).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such instance"),
    }
}
