//! The HTTP server: the poem application served by hyper with the limits poem's `Server` does not
//! offer (poem 3.1 has only an activity-based idle timeout, and its accept loop retries a failed
//! `accept` at once, spinning a core while the process is out of file descriptors):
//!
//! - at most `max_connections` connections; one over the cap is answered 503 and closed at once,
//!   so the accept loop never waits on a client;
//! - a failed `accept` (EMFILE, ENFILE, ENOBUFS...) backs off exponentially, 10 ms to 1 s;
//! - a request head must arrive within `header_read_timeout` (hyper's timer: from the connection's
//!   start or the end of the previous answer; a connection that sends nothing at all is closed
//!   after the same time);
//! - a connection on which no byte moves either way for `idle_timeout` is shut down gracefully
//!   (an answer in progress is still sent): HTTP/2 connections, and HTTP/1.1 ones mid-request;
//! - the request body deadline is `middleware::read_body_within` (it answers 408).
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use poem::http::uri::Scheme;
use poem::web::{LocalAddr, RemoteAddr};
use poem::{Addr, Endpoint, EndpointExt, Request};
use relay::metrics as names;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;

/// File descriptors kept free for everything but client connections (database pool, Kafka
/// clients, files): the connection cap is lowered to fit the descriptor limit minus this.
const RESERVED_FDS: u64 = 256;
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the server enforces, from `[http]`.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a graceful shutdown waits for in-flight requests before dropping them.
    pub shutdown_grace: Duration,
}

impl HttpLimits {
    /// The configured limits, with the connection cap lowered to what the process's file
    /// descriptor limit can hold (after raising the soft limit to the hard one).
    pub fn from_config(http: &HttpConfig) -> Self {
        let fd_limit = raise_fd_limit();
        let fits = usize::try_from(fd_limit.saturating_sub(RESERVED_FDS))
            .unwrap_or(usize::MAX)
            .max(1);
        let max_connections = if http.max_connections > fits {
            tracing::warn!(
                configured = http.max_connections,
                fd_limit,
                effective = fits,
                "http.max_connections is above what the file descriptor limit allows; lowered"
            );
            fits
        } else {
            http.max_connections
        };
        Self {
            max_connections,
            header_read_timeout: Duration::from_secs(http.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(http.idle_timeout_secs),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit, as servers do (the common soft default of
/// 1024 is exhausted by about a thousand idle clients); returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            let current =
                rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
            tracing::warn!(%error, current, "could not raise the file descriptor limit");
            current
        }
    }
}

/// Serves `app` on `listener` until `shutdown` is cancelled, then lets in-flight requests finish
/// (at most `limits.shutdown_grace`).
pub async fn serve<E>(
    listener: TcpListener,
    app: E,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> io::Result<()>
where
    E: Endpoint + 'static,
{
    let local = listener.local_addr()?;
    accept_loop(listener, local, app, limits, shutdown).await;
    Ok(())
}

/// Where connections come from: the listener, or a test's stand-in that fails.
trait AcceptSource {
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl AcceptSource for TcpListener {
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

async fn accept_loop<E>(
    listener: impl AcceptSource,
    local: SocketAddr,
    app: E,
    limits: HttpLimits,
    shutdown: CancellationToken,
) where
    E: Endpoint + 'static,
{
    let app = Arc::new(app.map_to_response());
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    tracing::info!(addr = %local, max_connections = limits.max_connections, "listening");
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF_MIN;
                accepted
            }
            // The peer gave up before we accepted: nothing is wrong with the listener.
            Err(error) if is_per_connection(&error) => continue,
            Err(error) => {
                // Out of descriptors or memory: accepting again at once would fail again, at
                // full speed. Wait for connections to close.
                metrics::counter!(names::HTTP_ACCEPT_ERRORS_TOTAL).increment(1);
                tracing::warn!(%error, backoff_ms = backoff.as_millis() as u64, "accept failed; backing off");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!(names::HTTP_CONNECTIONS_REFUSED_TOTAL).increment(1);
            refuse_over_capacity(&stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(serve_connection(
            stream,
            local,
            peer.into(),
            app.clone(),
            limits.clone(),
            shutdown.clone(),
            permit,
        ));
    }
    drop(listener);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
}

fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// Answers 503 if the socket takes it at once (a fresh socket's buffer does), then closes.
fn refuse_over_capacity(stream: &TcpStream) {
    const BODY: &str = r#"{"code":"unavailable","message":"too many connections; retry later"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(response.as_bytes());
}

async fn serve_connection<E>(
    stream: TcpStream,
    local: SocketAddr,
    peer: Addr,
    app: Arc<E>,
    limits: HttpLimits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) where
    E: Endpoint<Output = poem::Response> + 'static,
{
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let local = LocalAddr(local.into());
    let remote = RemoteAddr(peer);
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let app = app.clone();
        let request = Request::from((request, local.clone(), remote.clone(), Scheme::HTTP));
        async move {
            let response: hyper::Response<_> = app.get_response(request).await.into();
            Ok::<_, std::convert::Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut closing = false;
    loop {
        tokio::select! {
            _ = connection.as_mut() => return,
            () = shutdown.cancelled(), if !closing => {}
            () = activity.silent(limits.idle_timeout, limits.header_read_timeout), if !closing => {}
        }
        // Shutdown or silence: finish the answer in progress, take no new request.
        closing = true;
        connection.as_mut().graceful_shutdown();
    }
}

/// When bytes last moved on a connection, and whether any were read yet.
struct Activity {
    start: Instant,
    last_millis: AtomicU64,
    read_any: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_millis: AtomicU64::new(0),
            read_any: AtomicBool::new(false),
        }
    }

    fn touch(&self) {
        let millis = self.start.elapsed().as_millis() as u64;
        self.last_millis.store(millis, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle` (for `first` while nothing was read yet: a
    /// client that never sends a request gets the header deadline, not the idle one).
    async fn silent(&self, idle: Duration, first: Duration) {
        loop {
            let last = self.last_millis.load(Ordering::Relaxed);
            let limit = if self.read_any.load(Ordering::Relaxed) {
                idle
            } else {
                first
            };
            tokio::time::sleep_until(self.start + Duration::from_millis(last) + limit).await;
            if self.last_millis.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}

/// A socket that records its activity.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_any.store(true, Ordering::Relaxed);
            self.activity.touch();
        }
        result
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A listener whose process is out of file descriptors: every accept fails with EMFILE.
    struct OutOfDescriptors(Arc<AtomicUsize>);

    impl AcceptSource for OutOfDescriptors {
        fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
            self.0.fetch_add(1, Ordering::Relaxed);
            std::future::ready(Err(io::Error::from_raw_os_error(24)))
        }
    }

    #[tokio::test]
    async fn accept_errors_back_off_instead_of_spinning() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let limits = HttpLimits {
            max_connections: 10,
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(1),
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            stop.cancel();
        });
        let app = poem::Route::new();
        let local: SocketAddr = "127.0.0.1:0".parse().expect("an address");
        accept_loop(
            OutOfDescriptors(attempts.clone()),
            local,
            app,
            limits,
            shutdown,
        )
        .await;
        // 10 + 20 + 40 + ... ms: 7 attempts in a second, where an immediate retry made millions.
        let attempts = attempts.load(Ordering::Relaxed);
        assert!(
            (3..=10).contains(&attempts),
            "{attempts} accept attempts in 1 s"
        );
    }
}
