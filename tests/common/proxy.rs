//! A fault-injecting HTTP proxy in front of a real registry: the faults a
//! real server cannot produce on demand (5xx and 429, connections dropped
//! mid-body, flipped or missing bytes, stalls, Range ignored, a wrong
//! Content-Range), applied to the blob GETs that go through it, on command.
//!
//! One thread per connection, one request per connection (`Connection:
//! close` both ways): the request is relayed to the registry as is (minus
//! `Range` when the fault says so), the whole answer is read, altered, and
//! written back.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happens to the next matching requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Relay untouched.
    None,
    /// Answer this status with an empty body, without asking the registry.
    Status(u16),
    /// Send the head and half the body, then close.
    DropMidBody,
    /// Flip one bit in the middle of the body.
    FlipByte,
    /// Claim the full length, send all but the last byte, close.
    Truncate,
    /// Accept and say nothing for this long, then close.
    Stall(Duration),
    /// Drop the request's `Range` header: the registry answers 200 and the
    /// whole blob.
    IgnoreRange,
    /// Answer 206 with a `Content-Range` shifted by one byte.
    WrongContentRange,
    /// Refuse: close the connection without answering.
    Refuse,
}

#[derive(Debug)]
struct Plan {
    fault: Fault,
    /// Matching requests the fault still applies to (`u32::MAX`: until cleared).
    remaining: u32,
    /// Matching requests seen, faulted or not.
    seen: u32,
}

/// See the module doc.
pub struct FaultProxy {
    pub port: u16,
    plan: Arc<Mutex<Plan>>,
}

impl FaultProxy {
    /// Starts a proxy to the registry at `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let plan = Arc::new(Mutex::new(Plan {
            fault: Fault::None,
            remaining: 0,
            seen: 0,
        }));
        let shared = plan.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let plan = shared.clone();
                std::thread::spawn(move || serve(conn, upstream, &plan));
            }
        });
        FaultProxy { port, plan }
    }

    /// `127.0.0.1:PORT`, to put in references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `times` blob GETs (`u32::MAX`: all of them).
    pub fn set(&self, fault: Fault, times: u32) {
        let mut plan = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        plan.fault = fault;
        plan.remaining = times;
        plan.seen = 0;
    }

    pub fn clear(&self) {
        self.set(Fault::None, 0);
    }

    /// Blob GETs seen since the last `set`.
    pub fn seen(&self) -> u32 {
        self.plan.lock().unwrap_or_else(|p| p.into_inner()).seen
    }
}

/// The fault for this request (only blob GETs are faulted).
fn take_fault(plan: &Mutex<Plan>, head: &str) -> Fault {
    let is_blob_get = head.starts_with("GET ")
        && head
            .split_whitespace()
            .nth(1)
            .is_some_and(|p| p.contains("/blobs/sha256:"));
    if !is_blob_get {
        return Fault::None;
    }
    let mut plan = plan.lock().unwrap_or_else(|p| p.into_inner());
    plan.seen += 1;
    if plan.remaining == 0 {
        return Fault::None;
    }
    if plan.remaining != u32::MAX {
        plan.remaining -= 1;
    }
    plan.fault
}

fn serve(mut client: TcpStream, upstream: u16, plan: &Mutex<Plan>) {
    let Some((head, body)) = read_request(&mut client) else {
        return;
    };
    let fault = take_fault(plan, &head);
    match fault {
        Fault::Status(code) => {
            let _ = client.write_all(
                format!("HTTP/1.1 {code} Fault\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            return;
        }
        Fault::Stall(d) => {
            std::thread::sleep(d);
            return;
        }
        Fault::Refuse => {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        _ => {}
    }
    let head = rewrite_request(&head, fault == Fault::IgnoreRange);
    let Some(answer) = relay(upstream, &head, &body) else {
        return;
    };
    let answer = alter(answer, fault);
    let _ = client.write_all(&answer);
    let _ = client.flush();
}

/// The request head and body (by Content-Length).
fn read_request(conn: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The head with `Connection: close` (and without `Range` if asked).
fn rewrite_request(head: &str, drop_range: bool) -> String {
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        let name = line.split(':').next().unwrap_or_default().trim();
        let skip = i > 0
            && (name.eq_ignore_ascii_case("connection")
                || (drop_range && name.eq_ignore_ascii_case("range")));
        if line.is_empty() || skip {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    out
}

/// Sends the request to the registry and reads the whole answer.
fn relay(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut conn = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    conn.write_all(head.as_bytes()).ok()?;
    conn.write_all(body).ok()?;
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).ok()?;
    Some(answer)
}

/// Splits a raw answer at the end of its head.
fn split(answer: &[u8]) -> Option<usize> {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

fn alter(mut answer: Vec<u8>, fault: Fault) -> Vec<u8> {
    let Some(body_at) = split(&answer) else {
        return answer;
    };
    let body_len = answer.len() - body_at;
    match fault {
        Fault::DropMidBody => answer.truncate(body_at + body_len / 2),
        Fault::Truncate if body_len > 0 => answer.truncate(answer.len() - 1),
        Fault::FlipByte if body_len > 0 => answer[body_at + body_len / 2] ^= 0x10,
        Fault::WrongContentRange => {
            let head = String::from_utf8_lossy(&answer[..body_at]).into_owned();
            let shifted = head
                .split("\r\n")
                .map(|line| match line.split_once(':') {
                    Some((k, v)) if k.eq_ignore_ascii_case("content-range") => {
                        format!("{k}: {}", shift_range(v.trim()))
                    }
                    _ => line.to_string(),
                })
                .collect::<Vec<_>>()
                .join("\r\n");
            let mut out = shifted.into_bytes();
            out.extend_from_slice(&answer[body_at..]);
            return out;
        }
        _ => {}
    }
    answer
}

/// `bytes A-B/N` -> `bytes A+1-B+1/N`.
fn shift_range(value: &str) -> String {
    let parse = || -> Option<String> {
        let rest = value.strip_prefix("bytes ")?;
        let (range, total) = rest.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
        Some(format!("bytes {}-{}/{total}", a + 1, b + 1))
    };
    parse().unwrap_or_else(|| value.to_string())
}
