//! A tiny HTTP/1.1 responder for probes and scrapes: GET (or HEAD) only,
//! one request per connection (`Connection: close`), bounded request size
//! and read time. Enough for kubelet and Prometheus; nothing else listens.

use std::{
    io::{self, Read, Write},
    net::{TcpListener, TcpStream},
    sync::Arc,
    thread,
    time::Duration,
};

const MAX_REQUEST: usize = 8 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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

pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Serves `handler(path)` on `listener` from a background thread, one
/// connection at a time (each bounded by [`IO_TIMEOUT`]).
pub fn spawn(listener: TcpListener, handler: Handler) -> io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("http".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    if let Err(e) = serve(s, &handler) {
                        log::debug!("http: {e}");
                    }
                }
                Err(e) => log::warn!("http: accept: {e}"),
            }
        }
    })
}

fn serve(mut stream: TcpStream, handler: &Handler) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return respond(&mut stream, false, &Response::text(400, "request too large\n"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf);
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split('?').next().unwrap_or_default();
    let response = match method {
        "GET" | "HEAD" => handler(path),
        "" => Response::text(400, "bad request\n"),
        _ => Response::text(405, "only GET and HEAD\n"),
    };
    respond(&mut stream, method != "HEAD", &response)
}

fn respond(stream: &mut TcpStream, body: bool, r: &Response) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes())?;
    if body {
        stream.write_all(r.body.as_bytes())?;
    }
    stream.flush()
}

/// A minimal client for tests: GET `path`, returns (status, body).
#[cfg(test)]
pub fn get(addr: std::net::SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
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

    #[test]
    fn routes_paths_and_rejects_other_methods() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let handler: Handler = Arc::new(|path| match path {
            "/readyz" => Response::text(503, "not ready\n"),
            "/metrics" => Response::text(200, "x 1\n"),
            _ => Response::text(404, "not found\n"),
        });
        spawn(listener, handler).expect("spawning the server");
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
}
