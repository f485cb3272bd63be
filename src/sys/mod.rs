//! What every layer above stands on: the one io_uring driver ([`uring`]),
//! recycled large buffers ([`pool`]), the clock ([`clock`]), the one
//! durable write ([`durable`]), the shape of background work ([`worker`])
//! and [`join_all`], which runs borrowed futures side by side.

pub mod clock;
pub mod durable;
pub mod pool;
pub mod uring;
pub mod worker;

/// Runs the futures concurrently, results in order.
pub async fn join_all<F: std::future::Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..pinned.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|o| o.expect("every future finished")).collect()
}
