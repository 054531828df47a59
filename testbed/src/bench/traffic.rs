//! Real traffic between the benchmark's client and server namespaces, bounded in count and
//! time: UDP request/response on one flow, TCP connect-request-response-close (a new flow
//! each time), and a UDP stream counted at the receiver.
//!
//! Sockets are made inside their namespace (on a thread that joined it) and belong to it for
//! good; the servers run on plain threads and stop when dropped.
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::netns::Netns;

/// Bytes of every request and response.
pub const MESSAGE: usize = 64;
/// How long one request may wait for its response.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);
/// Lost requests or failed connections after which a measurement gives up.
const MAX_FAILURES: usize = 20;

/// A server thread; stopped and joined when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams received (the stream sink counts here).
    pub received: Arc<AtomicU64>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn io_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

/// Waits up to `ms` until `fd` is readable.
fn readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&raw mut p, 1, ms) == 1 }
}

fn spawn(name: &str, f: impl FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) + Send + 'static) -> Result<Server, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let (s, r) = (stop.clone(), received.clone());
    let thread =
        std::thread::Builder::new().name(name.into()).spawn(move || f(s, r)).map_err(|e| io_err("thread", e))?;
    Ok(Server { stop, thread: Some(thread), received })
}

/// A UDP echo server on `port` in `ns`.
pub fn udp_echo(ns: &Netns, port: u16) -> Result<Server, String> {
    let sock = ns
        .run(move || UdpSocket::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| io_err("binding the UDP echo server", e))?;
    sock.set_read_timeout(Some(Duration::from_millis(20))).map_err(|e| io_err("socket option", e))?;
    spawn("udp-echo", move |stop, _| {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
    })
}

/// A UDP sink on `port` in `ns`: counts datagrams.
pub fn udp_sink(ns: &Netns, port: u16) -> Result<Server, String> {
    let sock = ns
        .run(move || UdpSocket::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| io_err("binding the UDP sink", e))?;
    set_rcvbuf(&sock, 4 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(20))).map_err(|e| io_err("socket option", e))?;
    spawn("udp-sink", move |stop, received| {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if sock.recv(&mut buf).is_ok() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }
    })
}

fn set_rcvbuf(sock: &UdpSocket, bytes: i32) {
    // SAFETY: setsockopt on an open socket with a valid int.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw const bytes).cast(),
            size_of::<i32>() as libc::socklen_t,
        );
    }
}

/// A TCP server on `port` in `ns`: per connection, reads one request and answers it.
pub fn tcp_echo(ns: &Netns, port: u16) -> Result<Server, String> {
    let listener = ns
        .run(move || TcpListener::bind(("0.0.0.0", port)))
        .map_err(|e| e.to_string())?
        .map_err(|e| io_err("binding the TCP server", e))?;
    spawn("tcp-echo", move |stop, _| {
        let fd = listener.as_raw_fd();
        while !stop.load(Ordering::Relaxed) {
            if !readable(fd, 20) {
                continue;
            }
            let Ok((mut s, _)) = listener.accept() else { continue };
            let _ = s.set_read_timeout(Some(REPLY_TIMEOUT));
            let _ = s.set_nodelay(true);
            let mut buf = [0u8; MESSAGE];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    })
}

/// Latency samples in microseconds, sorted.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    pub samples_us: Vec<f64>,
    pub failures: usize,
}

impl Latencies {
    fn finish(mut self) -> Latencies {
        self.samples_us.sort_by(f64::total_cmp);
        self
    }
    pub fn p(&self, p: f64) -> f64 {
        super::percentile(&self.samples_us, p)
    }
}

/// `count` UDP requests on one flow (after `warmup` unmeasured ones), each waiting for its
/// response: the round-trip times.
pub fn udp_rr(client: &Netns, server: SocketAddrV4, warmup: usize, count: usize) -> Result<Latencies, String> {
    client
        .run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| io_err("binding the client socket", e))?;
            sock.connect(server).map_err(|e| io_err("connecting the client socket", e))?;
            sock.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| io_err("socket option", e))?;
            let mut out = Latencies::default();
            let mut req = [0u8; MESSAGE];
            let mut resp = [0u8; 2048];
            for i in 0..(warmup + count) as u64 {
                req[..8].copy_from_slice(&i.to_be_bytes());
                let t = Instant::now();
                sock.send(&req).map_err(|e| io_err("sending", e))?;
                let ok = loop {
                    match sock.recv(&mut resp) {
                        Ok(n) if n >= 8 && resp[..8] == req[..8] => break true,
                        Ok(_) => {} // a late answer to an earlier request
                        Err(_) => break false,
                    }
                };
                if !ok {
                    out.failures += 1;
                    if out.failures > MAX_FAILURES {
                        return Err(format!("more than {MAX_FAILURES} UDP requests lost"));
                    }
                    continue;
                }
                if i as usize >= warmup {
                    out.samples_us.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
            Ok(out.finish())
        })
        .map_err(|e| e.to_string())?
}

/// `count` TCP connections (after `warmup`): connect, send a request, read the response,
/// close. Each sample is the whole exchange, so every one is a new flow through the filter.
pub fn tcp_crr(client: &Netns, server: SocketAddrV4, warmup: usize, count: usize) -> Result<Latencies, String> {
    client
        .run(move || {
            let mut out = Latencies::default();
            let addr = SocketAddr::V4(server);
            let req = [7u8; MESSAGE];
            for i in 0..warmup + count {
                let t = Instant::now();
                let r = (|| {
                    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(REPLY_TIMEOUT))?;
                    s.write_all(&req)?;
                    let mut resp = [0u8; MESSAGE];
                    s.read_exact(&mut resp)?;
                    Ok::<(), std::io::Error>(())
                })();
                match r {
                    Ok(()) if i >= warmup => out.samples_us.push(t.elapsed().as_secs_f64() * 1e6),
                    Ok(()) => {}
                    Err(e) => {
                        out.failures += 1;
                        if out.failures > MAX_FAILURES {
                            return Err(format!("more than {MAX_FAILURES} TCP exchanges failed (last: {e})"));
                        }
                    }
                }
            }
            Ok(out.finish())
        })
        .map_err(|e| e.to_string())?
}

/// What a stream achieved.
#[derive(Clone, Copy, Debug)]
pub struct Stream {
    pub sent_pps: f64,
    pub received_pps: f64,
}

/// Sends `MESSAGE`-byte datagrams to the sink as fast as one thread can for `duration`, then
/// counts what the sink received.
pub fn udp_stream(client: &Netns, sink: &Server, server: SocketAddrV4, duration: Duration) -> Result<Stream, String> {
    let before = sink.received.load(Ordering::SeqCst);
    let sent = client
        .run(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| io_err("binding the stream socket", e))?;
            sock.connect(server).map_err(|e| io_err("connecting the stream socket", e))?;
            let buf = [1u8; MESSAGE];
            let start = Instant::now();
            let mut sent = 0u64;
            'outer: loop {
                for _ in 0..64 {
                    match sock.send(&buf) {
                        Ok(_) => sent += 1,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        // ENOBUFS and the like under load: the packet is not sent.
                        Err(_) => {}
                    }
                }
                if start.elapsed() >= duration {
                    break 'outer;
                }
            }
            Ok::<_, String>((sent, start.elapsed()))
        })
        .map_err(|e| e.to_string())??;
    // Datagrams still queued towards the sink: wait until the count stops moving (two
    // quiet 10 ms polls), 300 ms at most.
    let settle = Instant::now();
    let mut last = sink.received.load(Ordering::SeqCst);
    let mut quiet = 0;
    while quiet < 2 && settle.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(10));
        let now = sink.received.load(Ordering::SeqCst);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    let received = last - before;
    let secs = sent.1.as_secs_f64();
    Ok(Stream { sent_pps: sent.0 as f64 / secs, received_pps: received as f64 / secs })
}
