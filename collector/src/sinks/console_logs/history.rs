//! Recent console lines of each instance, in memory, for the logs API (`tail`, `since`,
//! `follow`). Bounded in bytes (records' real size) per instance and for all instances
//! together (three quarters of `console.memory_max_bytes`): past the total, instances that
//! ended give way first, then the largest histories, oldest lines first. An instance's lines
//! stay until the console source expires them (`console.retention_seconds` after it exited),
//! or the bound takes them.

use std::{sync::Arc, time::Duration};

use crate::{
    model::console::{ConsoleSubscriber, LogRecord},
    util::journal::{Cost, Journal, Limits, Subscription},
};

/// Lines a follower may fall behind before it skips (and is told how many).
const FOLLOW_BACKLOG: usize = 8192;

impl Cost for LogRecord {
    fn cost(&self) -> usize {
        self.size()
    }
}

/// The lines kept for the API. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct ConsoleHistory {
    journal: Arc<Journal<Arc<str>, LogRecord>>,
}

impl ConsoleHistory {
    pub(crate) fn new(history_bytes: usize, total_bytes: usize) -> Self {
        Self {
            journal: Arc::new(Journal::new(
                Limits {
                    per_key: history_bytes,
                    total: total_bytes,
                    keys: usize::MAX,
                    retention: None,
                    follow_backlog: FOLLOW_BACKLOG,
                },
                false,
            )),
        }
    }

    /// The kept lines of `uuid` and, when `follow` and it runs, its later lines; waits up to
    /// `wait` for an instance the console source is about to begin. `None`: no such log.
    pub(crate) async fn subscribe(
        &self,
        uuid: &str,
        follow: bool,
        wait: Duration,
    ) -> Option<Subscription<LogRecord>> {
        self.journal
            .subscribe_soon(&Arc::from(uuid), follow, wait)
            .await
    }

    /// The subscriber half, for the console source.
    pub(crate) fn subscriber(&self) -> Box<dyn ConsoleSubscriber> {
        Box::new(self.clone())
    }
}

impl ConsoleSubscriber for ConsoleHistory {
    fn begin(&mut self, uuid: &Arc<str>) {
        self.journal.begin(uuid);
    }

    fn records(&mut self, batch: &[Arc<LogRecord>]) {
        // Records come in runs of one instance: look each run up once.
        for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            self.journal.push(&run[0].instance_uuid, run, false);
        }
    }

    fn end(&mut self, uuid: &Arc<str>) {
        self.journal.end(uuid);
    }

    fn expire(&mut self, uuid: &Arc<str>) {
        self.journal.remove(uuid);
    }

    fn close(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::console::Stream;

    #[tokio::test]
    async fn lines_of_begun_instances_only() {
        let history = ConsoleHistory::new(1 << 20, usize::MAX);
        let mut subscriber = history.subscriber();
        let a: Arc<str> = "a".into();
        subscriber.begin(&a);
        subscriber.records(&[
            LogRecord::test_line("a", Stream::Stdout, 1, "one"),
            LogRecord::test_line("b", Stream::Stdout, 1, "not begun"),
        ]);
        let wait = Duration::from_millis(10);
        let sub = history.subscribe("a", false, wait).await.unwrap();
        assert_eq!(sub.history.len(), 1);
        assert!(history.subscribe("b", false, wait).await.is_none());
        subscriber.expire(&a);
        assert!(history.subscribe("a", false, wait).await.is_none());
    }

    #[tokio::test]
    async fn bounded_in_bytes() {
        let history = ConsoleHistory::new(1000, usize::MAX);
        let mut subscriber = history.subscriber();
        subscriber.begin(&"a".into());
        for seq in 0..100 {
            subscriber.records(&[LogRecord::test_line("a", Stream::Stdout, seq, "0123456789")]);
        }
        let sub = history.subscribe("a", false, Duration::ZERO).await.unwrap();
        let kept: usize = sub.history.iter().map(|r| r.size()).sum();
        assert!(kept <= 1000, "{kept}");
        assert_eq!(sub.history.last().unwrap().seq, 99);
    }
}
