//! Work seen through whether or not its caller waits for it.

/// Work that is polled where it is awaited and, if dropped before it is done, finishes in a
/// task of its own (its output then goes nowhere): what an invocation's caller starts (a
/// claim, a decision, a call) is seen through whether or not the caller waits for it.
/// (Spawning it up front would cost a task hand-over each way on every call, to guard
/// against what rarely happens.)
pub(super) struct FinishOnDrop<T: Send + 'static>(
    Option<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
);

impl<T: Send + 'static> FinishOnDrop<T> {
    pub(super) fn new(work: impl std::future::Future<Output = T> + Send + 'static) -> Self {
        FinishOnDrop(Some(Box::pin(work)))
    }
}

impl<T: Send + 'static> std::future::Future for FinishOnDrop<T> {
    type Output = T;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(future) = self.0.as_mut() else {
            // Polled again after it finished (a caller's bug): nothing more, as
            // `futures::future::Fuse` does.
            return std::task::Poll::Pending;
        };
        let output = std::task::ready!(future.as_mut().poll(cx));
        self.0 = None;
        std::task::Poll::Ready(output)
    }
}

impl<T: Send + 'static> Drop for FinishOnDrop<T> {
    fn drop(&mut self) {
        if let Some(future) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(future);
                }
                // No runtime: the process is shutting down, and the sweeper of the next
                // start records the invocation as interrupted.
                Err(_) => tracing::warn!("an invocation was dropped mid-way outside a runtime"),
            }
        }
    }
}
