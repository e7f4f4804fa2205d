//! One running stage (its own task set and cancellation token, so it can be stopped and replaced
//! at a reload without touching the others), and waiting for the first of several to end.

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// One running stage: its own task set (so a stage can be stopped and replaced at SIGHUP without
/// touching the others) and its cancellation token.
pub(super) struct Stage {
    pub(super) name: &'static str,
    pub(super) token: CancellationToken,
    pub(super) task: JoinSet<Result<(), String>>,
}

impl Stage {
    pub(super) fn spawn<F>(
        name: &'static str,
        parent: &CancellationToken,
        f: impl FnOnce(CancellationToken) -> F,
    ) -> Stage
    where
        F: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let token = parent.child_token();
        let mut task = JoinSet::new();
        task.spawn(f(token.clone()));
        Stage { name, token, task }
    }

    /// Cancels the stage and waits for it until `deadline`; a straggler is logged by name.
    pub(super) async fn stop(mut self, deadline: tokio::time::Instant) {
        self.token.cancel();
        match tokio::time::timeout_at(deadline, self.task.join_next()).await {
            Ok(Some(Ok(Err(e)))) => {
                tracing::warn!(stage = self.name, error = %e, "stage ended with an error while stopping")
            }
            Ok(Some(Err(e))) => {
                tracing::warn!(stage = self.name, error = %e, "stage task failed while stopping")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(stage = self.name, "stage did not stop before the deadline");
                self.task.abort_all();
            }
        }
    }
}

/// The first of `stages` to end, with its result (pending forever if none runs).
pub(super) async fn any_ended(
    stages: &mut [&mut Option<Stage>],
) -> (&'static str, Result<(), String>) {
    std::future::poll_fn(|cx| {
        for stage in stages.iter_mut() {
            if let Some(st) = stage.as_mut() {
                if let std::task::Poll::Ready(Some(r)) = st.task.poll_join_next(cx) {
                    let name = st.name;
                    return std::task::Poll::Ready(match r {
                        Ok(r) => (name, r),
                        Err(e) => (name, Err(e.to_string())),
                    });
                }
            }
        }
        std::task::Poll::Pending
    })
    .await
}
