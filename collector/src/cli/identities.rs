//! `collector identities`: the identity updates the Kubernetes source sees for this node's
//! Pods, one JSON object a line, as the registry will receive them. For an operator asking why
//! an instance has no project, and for the tests (the watch without the kernel side).

use std::io::Write;

use anyhow::Context;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{config::Config, sources::kubernetes};

/// Updates queued between the source and the printer.
const QUEUE: usize = 1024;

/// Watches and prints until SIGINT or SIGTERM, or until stdout closes.
pub(crate) async fn run(config: Config, node_name: Option<String>) -> anyhow::Result<()> {
    let (updates, mut received) = mpsc::channel(QUEUE);
    let node = kubernetes::node_name(node_name);
    let source = kubernetes::configure(&config.kubernetes, node, Vec::new(), updates)
        .await?
        .context("no Kubernetes source: not in a cluster, KUBECONFIG unset, or turned off")?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(source.run(stop.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            update = received.recv() => {
                let Some(update) = update else { break };
                let mut line = serde_json::to_vec(&update)?;
                line.push(b'\n');
                // A closed pipe (`| head`) ends the command.
                if stdout.write_all(&line).and_then(|()| stdout.flush()).is_err() {
                    break;
                }
            }
        }
    }
    stop.cancel();
    task.await.context("kubernetes source task")?;
    Ok(())
}
