//! A tiny HTTP/1.1 responder for probes and scrapes: GET (or HEAD) only,
//! one request per connection (`Connection: close`), bounded request size.
//!
//! Nobody can hold it. One thread multiplexes every connection with
//! `poll(2)`, so an idle client costs a file descriptor, not a thread, and
//! never stands between kubelet and `/healthz`. Each connection has one
//! deadline for the whole request (reading the head, answering), not per
//! read: a client that sends a byte now and then is cut off like one that
//! sends nothing. At most [`Limits::max_connections`] are open at once;
//! beyond that the oldest is closed to make room. Answers that take time
//! (a `/metrics` scrape reads the maps under the node lock) are computed on
//! a thread of their own, at most [`Limits::max_slow`] at once, so they
//! cannot delay the probes either.

use std::{
    collections::VecDeque,
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

const MAX_REQUEST: usize = 8 * 1024;
/// After an accept error other than "try again" (out of descriptors?).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How much the server gives its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; beyond it the oldest is closed.
    pub max_connections: usize,
    /// Slow answers being computed at once; beyond it, 503.
    pub max_slow: usize,
    /// From accept to the last byte of the answer.
    pub request_deadline: Duration,
}

impl Default for Limits {
    /// kubelet probes time out after 1 s by default and Prometheus scrapes
    /// after 10 s; an honest request needs milliseconds.
    fn default() -> Self {
        Self {
            max_connections: 128,
            max_slow: 4,
            request_deadline: Duration::from_secs(2),
        }
    }
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

/// What the handler makes of a path: an answer now, or work that may take
/// a while (run on a thread of its own).
pub enum Route {
    Now(Response),
    Later(Box<dyn FnOnce() -> Response + Send>),
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

pub type Handler = Arc<dyn Fn(&str) -> Route + Send + Sync>;

/// Serves `handler(path)` on `listener` with the default [`Limits`].
pub fn spawn(listener: TcpListener, handler: Handler) -> io::Result<thread::JoinHandle<()>> {
    spawn_with(listener, handler, Limits::default())
}

/// Serves `handler(path)` on `listener` from a background thread.
pub fn spawn_with(
    listener: TcpListener,
    handler: Handler,
    limits: Limits,
) -> io::Result<thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    thread::Builder::new()
        .name("http".into())
        .spawn(move || Server::new(listener, handler, limits).run())
}

/// One open connection.
struct Conn {
    stream: TcpStream,
    deadline: Instant,
    head: Vec<u8>,
    /// The answer, and how much of it is written.
    out: Option<(Vec<u8>, usize)>,
}

enum Step {
    Keep,
    Close,
    /// Handed to a thread (which answers and closes).
    Gone,
}

struct Server {
    listener: TcpListener,
    handler: Handler,
    limits: Limits,
    /// Oldest first.
    conns: VecDeque<Conn>,
    slow: Arc<AtomicUsize>,
    accept_paused_until: Option<Instant>,
}

impl Server {
    fn new(listener: TcpListener, handler: Handler, limits: Limits) -> Self {
        Self {
            listener,
            handler,
            limits,
            conns: VecDeque::new(),
            slow: Arc::new(AtomicUsize::new(0)),
            accept_paused_until: None,
        }
    }

    fn run(mut self) {
        loop {
            let now = Instant::now();
            self.conns.retain(|c| c.deadline > now);
            if self.accept_paused_until.is_some_and(|t| t <= now) {
                self.accept_paused_until = None;
            }
            let accepting = self.accept_paused_until.is_none();
            let wake = self
                .conns
                .iter()
                .map(|c| c.deadline)
                .chain(self.accept_paused_until)
                .min();
            let timeout = match wake {
                None => PollTimeout::NONE,
                Some(t) => {
                    let ms = t.saturating_duration_since(now).as_millis().clamp(1, 60_000);
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let ready = match self.wait(accepting, timeout) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("http: poll: {e}");
                    thread::sleep(ACCEPT_BACKOFF);
                    continue;
                }
            };
            let (listener_ready, conns_ready) = ready;
            // Back to front: removing an index leaves the earlier ones valid.
            for i in (0..conns_ready.len()).rev() {
                if !conns_ready[i] {
                    continue;
                }
                match self.progress(i) {
                    Step::Keep => {}
                    Step::Close => {
                        self.conns.remove(i);
                    }
                    Step::Gone => {}
                }
            }
            if listener_ready {
                self.accept();
            }
        }
    }

    /// Polls the listener (when `accepting`) and every connection; returns
    /// which are ready.
    fn wait(&self, accepting: bool, timeout: PollTimeout) -> nix::Result<(bool, Vec<bool>)> {
        let mut fds = Vec::with_capacity(self.conns.len() + 1);
        let listen = if accepting {
            PollFlags::POLLIN
        } else {
            PollFlags::empty()
        };
        fds.push(PollFd::new(self.listener.as_fd(), listen));
        for c in &self.conns {
            let want = if c.out.is_some() {
                PollFlags::POLLOUT
            } else {
                PollFlags::POLLIN
            };
            fds.push(PollFd::new(c.stream.as_fd(), want));
        }
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok((false, vec![false; self.conns.len()])),
            Err(e) => return Err(e),
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|fd| fd.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        Ok((ready[0], ready[1..].to_vec()))
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::debug!("http: {e}");
                        continue;
                    }
                    while self.conns.len() >= self.limits.max_connections.max(1) {
                        // Dropping it closes it: the client sees EOF.
                        self.conns.pop_front();
                    }
                    self.conns.push_back(Conn {
                        stream,
                        deadline: Instant::now() + self.limits.request_deadline,
                        head: Vec::with_capacity(512),
                        out: None,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) => {}
                Err(e) => {
                    log::warn!("http: accept: {e}");
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Reads or writes what the connection allows now.
    fn progress(&mut self, i: usize) -> Step {
        if self.conns[i].out.is_some() {
            return flush(&mut self.conns[i]);
        }
        let conn = &mut self.conns[i];
        let mut chunk = [0u8; 1024];
        let complete = loop {
            if conn.head.windows(4).any(|w| w == b"\r\n\r\n") {
                break true;
            }
            if conn.head.len() > MAX_REQUEST {
                conn.out = Some((encode(&Response::text(400, "request too large\n"), false), 0));
                return flush(conn);
            }
            match conn.stream.read(&mut chunk) {
                Ok(0) => break true, // EOF: answer what came
                Ok(n) => conn.head.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("http: {e}");
                    return Step::Close;
                }
            }
        };
        if !complete {
            return Step::Keep;
        }
        let head = String::from_utf8_lossy(&conn.head).into_owned();
        let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
        let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        let path = target.split('?').next().unwrap_or_default();
        let body = method != "HEAD";
        let route = match method {
            "GET" | "HEAD" => (self.handler)(path),
            "" => Route::Now(Response::text(400, "bad request\n")),
            _ => Route::Now(Response::text(405, "only GET and HEAD\n")),
        };
        match route {
            Route::Now(r) => {
                let conn = &mut self.conns[i];
                conn.out = Some((encode(&r, body), 0));
                flush(conn)
            }
            Route::Later(job) => self.later(i, job, body),
        }
    }

    /// Hands connection `i` to a thread that computes and sends the answer.
    fn later(&mut self, i: usize, job: Box<dyn FnOnce() -> Response + Send>, body: bool) -> Step {
        if self.slow.fetch_add(1, Ordering::SeqCst) >= self.limits.max_slow {
            self.slow.fetch_sub(1, Ordering::SeqCst);
            let conn = &mut self.conns[i];
            conn.out = Some((encode(&Response::text(503, "busy: try again\n"), body), 0));
            return flush(conn);
        }
        let Some(conn) = self.conns.remove(i) else {
            return Step::Gone;
        };
        let slow = self.slow.clone();
        let spawned = thread::Builder::new().name("http-slow".into()).spawn(move || {
            let r = job();
            if let Err(e) = send_blocking(conn, &encode(&r, body)) {
                log::debug!("http: {e}");
            }
            slow.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            log::warn!("http: cannot start a thread: {e}");
            self.slow.fetch_sub(1, Ordering::SeqCst);
        }
        Step::Gone
    }
}

/// Writes what the socket takes now; `Close` when all is written.
fn flush(conn: &mut Conn) -> Step {
    let Some((out, done)) = &mut conn.out else {
        return Step::Keep;
    };
    while *done < out.len() {
        match conn.stream.write(&out[*done..]) {
            Ok(0) => return Step::Close,
            Ok(n) => *done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Keep,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::debug!("http: {e}");
                return Step::Close;
            }
        }
    }
    Step::Close
}

/// Sends `out` within the connection's deadline (on a slow answer's thread).
fn send_blocking(conn: Conn, out: &[u8]) -> io::Result<()> {
    let left = conn.deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "request deadline passed"));
    }
    let mut stream = conn.stream;
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(left))?;
    stream.write_all(out)?;
    stream.flush()
}

fn encode(r: &Response, body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    if body {
        out.extend_from_slice(r.body.as_bytes());
    }
    out
}

/// A minimal client for tests: GET `path`, returns (status, body).
#[cfg(test)]
pub fn get(addr: std::net::SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line in {out:?}")))?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(limits: Limits) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let handler: Handler = Arc::new(|path| match path {
            "/readyz" => Route::Now(Response::text(503, "not ready\n")),
            "/metrics" => Route::Now(Response::text(200, "x 1\n")),
            "/healthz" => Route::Now(Response::text(200, "ok\n")),
            _ => Route::Now(Response::text(404, "not found\n")),
        });
        spawn_with(listener, handler, limits).expect("spawning the server");
        addr
    }

    /// Reads until EOF or `within`; `true` when the server closed.
    fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut buf = [0u8; 64];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .expect("read timeout");
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("reading: {e}"),
            }
        }
        false
    }

    #[test]
    fn routes_paths_and_rejects_other_methods() {
        let addr = server(Limits::default());
        assert_eq!(
            get(addr, "/metrics?x=1").expect("GET /metrics"),
            (200, "x 1\n".into())
        );
        assert_eq!(get(addr, "/readyz").expect("GET /readyz").0, 503);
        assert_eq!(get(addr, "/nope").expect("GET /nope").0, 404);
        let mut s = TcpStream::connect(addr).expect("connecting");
        s.write_all(b"POST /readyz HTTP/1.1\r\n\r\n").expect("writing");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("reading");
        assert!(out.starts_with("HTTP/1.1 405 "), "{out}");
    }

    /// A client that trickles bytes is cut off at the request deadline,
    /// not kept alive by each byte (a per-read timeout would never fire).
    #[test]
    fn one_deadline_per_request() {
        let deadline = Duration::from_millis(600);
        let addr = server(Limits {
            max_connections: 8,
            max_slow: 1,
            request_deadline: deadline,
        });
        let mut loris = TcpStream::connect(addr).expect("connecting");
        let started = Instant::now();
        let mut cut_off = None;
        for b in b"GET /healthz HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if loris.write_all(&[*b]).is_err() || closed_within(&mut loris, Duration::from_millis(100)) {
                cut_off = Some(started.elapsed());
                break;
            }
        }
        let cut_off = cut_off.expect("the trickling client was never cut off");
        assert!(
            cut_off >= deadline && cut_off < deadline + Duration::from_millis(400),
            "cut off after {cut_off:?}, the deadline is {deadline:?}"
        );
    }

    /// At the cap, a new client is served at once and the oldest idle one
    /// is closed to make room.
    #[test]
    fn the_oldest_connection_makes_room() {
        let addr = server(Limits {
            max_connections: 4,
            max_slow: 1,
            request_deadline: Duration::from_secs(30),
        });
        let mut idle: Vec<TcpStream> = (0..4)
            .map(|_| TcpStream::connect(addr).expect("connecting"))
            .collect();
        // Let the server admit all four before the fifth arrives.
        let t = Instant::now();
        assert_eq!(get(addr, "/healthz").expect("GET /healthz").0, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "answered after {:?}",
            t.elapsed()
        );
        assert!(
            closed_within(&mut idle[0], Duration::from_secs(2)),
            "the oldest idle connection is still open"
        );
        assert!(
            !closed_within(&mut idle[3], Duration::from_millis(200)),
            "a newer idle connection was closed"
        );
    }

    /// A slow answer runs beside the loop: probes go on meanwhile, and past
    /// the cap of slow answers the next one is refused, not queued.
    #[test]
    fn slow_answers_do_not_hold_the_probes() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let started = Arc::new(AtomicUsize::new(0));
        let handler: Handler = {
            let started = started.clone();
            Arc::new(move |path| match path {
                "/slow" => {
                    let started = started.clone();
                    Route::Later(Box::new(move || {
                        started.fetch_add(1, Ordering::SeqCst);
                        thread::sleep(Duration::from_millis(1500));
                        Response::text(200, "slow\n")
                    }))
                }
                _ => Route::Now(Response::text(200, "ok\n")),
            })
        };
        let limits = Limits {
            max_connections: 8,
            max_slow: 1,
            request_deadline: Duration::from_secs(5),
        };
        spawn_with(listener, handler, limits).expect("spawning the server");
        let slow = thread::spawn(move || get(addr, "/slow").expect("GET /slow"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while started.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "the slow answer never started");
            thread::yield_now();
        }
        let t = Instant::now();
        assert_eq!(get(addr, "/healthz").expect("GET /healthz").0, 200);
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "/healthz waited {:?} for a slow answer",
            t.elapsed()
        );
        assert_eq!(get(addr, "/slow").expect("GET /slow").0, 503, "past the cap");
        assert_eq!(slow.join().expect("the slow client"), (200, "slow\n".into()));
        assert_eq!(started.load(Ordering::SeqCst), 1);
    }
}
