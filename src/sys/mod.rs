//! What every layer above stands on: the one io_uring driver ([`uring`]),
//! recycled large buffers ([`pool`]), the clock ([`clock`]), the one
//! durable write ([`durable`]), the shape of background work ([`worker`])
//! and [`join_all`], which runs borrowed futures side by side.

pub mod clock;
pub mod durable;
pub mod pool;
pub mod uring;
pub mod worker;

/// Keeps freed large buffers in the allocator for reuse. glibc serves an
/// allocation above its threshold (128 KiB, rising as it learns) with a
/// fresh `mmap`, every page of which faults and is zeroed on
/// first touch and unmapped when freed: segments, shards and parity are
/// 1–4 MiB each and come and go at the data rate, so that was a few
/// percent of the attach's and the peers' CPU. Called first thing in
/// `main`, before any other thread exists.
pub fn keep_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; no other thread is
    // running yet, and the values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

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
