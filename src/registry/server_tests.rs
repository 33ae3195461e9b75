//! The client against a real, deliberately misbehaving HTTP server on
//! 127.0.0.1: every test starts one (a thread on a std `TcpListener`) whose
//! handler decides, per request, what raw bytes to answer, and records the
//! request heads so the tests can check what the client sent.

use super::*;
use futures_util::StreamExt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex as StdMutex;

/// What the server does with one request.
enum Reply {
    /// Write these bytes, then close the connection.
    Send(Vec<u8>),
    /// Accept and say nothing for this long (a stalled server).
    Stall(Duration),
}

type Handler = dyn Fn(usize, &str) -> Reply + Send + Sync;

struct Server {
    addr: SocketAddr,
    requests: Arc<StdMutex<Vec<String>>>,
}

impl Server {
    fn start(handler: impl Fn(usize, &str) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let requests = Arc::new(StdMutex::new(Vec::new()));
        let seen = requests.clone();
        let handler: Arc<Handler> = Arc::new(handler);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (seen, handler) = (seen.clone(), handler.clone());
                std::thread::spawn(move || serve_connection(conn, &seen, &*handler));
            }
        });
        Server { addr, requests }
    }

    fn registry(&self) -> String {
        self.addr.to_string()
    }

    fn reference(&self, path: &str) -> Reference {
        Reference::parse(&format!("{}/{path}", self.addr)).expect("test reference")
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

fn serve_connection(mut conn: TcpStream, seen: &StdMutex<Vec<String>>, handler: &Handler) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let mut head = String::from_utf8_lossy(&head).to_string();
    // Read a request body (token POSTs), so closing never resets unread data;
    // it is recorded after the head.
    let body_len: usize = header_value(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; body_len];
    if conn.read_exact(&mut body).is_err() {
        return;
    }
    head.push_str(&String::from_utf8_lossy(&body));
    let n = {
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.push(head.clone());
        seen.len() - 1
    };
    match handler(n, &head) {
        Reply::Send(bytes) => {
            let _ = conn.write_all(&bytes);
        }
        Reply::Stall(d) => std::thread::sleep(d),
    }
}

fn response(status: &str, headers: &[(&str, String)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn path_of(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or_default()
}

fn client() -> Client {
    client_with(|_| {})
}

fn client_with(tweak: impl FnOnce(&mut ClientOptions)) -> Client {
    let mut opts = ClientOptions {
        max_retries: 3,
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        // No config.json: these tests must not pick up the machine's credentials.
        docker_config_dir: Some(PathBuf::from("/nonexistent/imgfs-test")),
        ..ClientOptions::default()
    };
    tweak(&mut opts);
    Client::new(opts).expect("client")
}

/// A blob of `len` bytes that is not periodic at small scales.
fn blob_bytes(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn locator(data: &[u8]) -> BlobLocator {
    BlobLocator {
        digest: Digest::of(data),
        size: data.len() as u64,
        urls: Vec::new(),
    }
}

/// Serves `[start, end]` of `data` as a proper 206 for a `Range` request, or
/// the whole blob with 200 when there is none.
fn serve_range(data: &[u8], head: &str) -> Vec<u8> {
    let Some(range) = header_value(head, "range") else {
        return response("200 OK", &[], data);
    };
    let spec = range.trim_start_matches("bytes=");
    let (a, b) = spec.split_once('-').unwrap_or(("0", ""));
    let start: usize = a.parse().unwrap_or(0);
    let end: usize = b
        .parse()
        .map(|e: usize| e + 1)
        .unwrap_or(data.len())
        .min(data.len());
    let cr = format!("bytes {start}-{}/{}", end - 1, data.len());
    response(
        "206 Partial Content",
        &[("Content-Range", cr)],
        &data[start..end],
    )
}

async fn collect(stream: BlobStream) -> Result<Vec<u8>, RegistryError> {
    let mut out = Vec::new();
    let mut stream = stream;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[tokio::test]
async fn retries_503_then_succeeds() {
    let body = br#"{"schemaVersion":2}"#.to_vec();
    let served = body.clone();
    let server = Server::start(move |n, _| match n {
        0 | 1 => Reply::Send(response("503 Service Unavailable", &[], b"busy")),
        _ => Reply::Send(response(
            "200 OK",
            &[(
                "Content-Type",
                format!("{}; charset=utf-8", media_type::OCI_MANIFEST),
            )],
            &served,
        )),
    });
    let r = server.reference("team/app:v2");
    let m = client()
        .manifest(&r, "v2", &[])
        .await
        .expect("third attempt succeeds");
    assert_eq!(&m.bytes[..], &body[..]);
    assert_eq!(m.media_type, media_type::OCI_MANIFEST);
    assert_eq!(m.digest, Digest::of(&body));
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(path_of(&requests[2]), "/v2/team/app/manifests/v2");
    let accept = header_value(&requests[0], "accept").unwrap_or_default();
    for t in media_type::ALL_MANIFESTS {
        assert!(accept.contains(t), "Accept lacks {t}: {accept}");
    }
}

#[tokio::test]
async fn gives_up_after_bounded_retries_and_never_retries_404() {
    let server = Server::start(|_, head| {
        if path_of(head).contains("missing") {
            let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#;
            Reply::Send(response("404 Not Found", &[], body))
        } else {
            Reply::Send(response("502 Bad Gateway", &[], b""))
        }
    });
    let c = client_with(|o| o.max_retries = 2);
    let e = c
        .manifest(&server.reference("a/missing:v1"), "v1", &[])
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "registry {}: manifest a/missing:v1: 404 not found (MANIFEST_UNKNOWN: manifest unknown)",
            server.registry()
        )
    );
    assert_eq!(server.requests().len(), 1, "404 is not retried");
    let e = c
        .manifest(&server.reference("a/flaky:v1"), "v1", &[])
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::TooManyRetries { attempts: 3, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("502 bad gateway"), "{e}");
    assert_eq!(server.requests().len(), 4);
}

#[tokio::test]
async fn manifest_by_digest_is_verified() {
    let server = Server::start(|_, _| Reply::Send(response("200 OK", &[], b"{\"tampered\":true}")));
    let wanted = Digest::of(b"{\"original\":true}");
    let e = client()
        .manifest(&server.reference("a/b"), &wanted.to_string(), &[])
        .await
        .unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::DigestMismatch { expected, .. } if expected == wanted),
        "{e}"
    );
    assert!(
        e.to_string().contains(&format!("manifest a/b@{wanted}")),
        "{e}"
    );
}

#[tokio::test]
async fn stalled_server_times_out() {
    let server = Server::start(|_, _| Reply::Stall(Duration::from_secs(5)));
    let c = client_with(|o| {
        o.max_retries = 0;
        o.read_timeout = Duration::from_millis(300);
    });
    let started = std::time::Instant::now();
    let e = c
        .manifest(&server.reference("a/b:c"), "c", &[])
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Network(_)), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn blob_resumes_with_range_after_a_dropped_connection() {
    let data = Arc::new(blob_bytes(300_000));
    let served = data.clone();
    let server = Server::start(move |n, head| match n {
        // Promise the whole blob, deliver a third, hang up.
        0 => {
            let mut r = response(
                "200 OK",
                &[("Content-Length", served.len().to_string())],
                &[],
            );
            r.extend_from_slice(&served[..100_000]);
            Reply::Send(r)
        }
        // The resume: a proper 206, but cut short again.
        1 => {
            let mut r = serve_range(&served, head);
            r.truncate(r.len() - 50_000);
            Reply::Send(r)
        }
        // Then a server that ignores Range: the client must skip forward.
        _ => Reply::Send(response("200 OK", &[], &served)),
    });
    let r = server.reference("team/app:v1");
    let s = client().blob(&r, &locator(&data)).await.expect("opened");
    assert_eq!(s.size(), 300_000);
    let got = collect(s).await.expect("one continuous stream");
    assert!(got == *data, "resumed stream differs from the blob");
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(header_value(&requests[0], "range"), None);
    assert_eq!(
        header_value(&requests[1], "range"),
        Some("bytes=100000-299999")
    );
    assert_eq!(
        header_value(&requests[2], "range"),
        Some("bytes=250000-299999")
    );
    assert_eq!(
        path_of(&requests[0]),
        format!("/v2/team/app/blobs/{}", Digest::of(&data))
    );
}

#[tokio::test]
async fn blob_stream_gives_up_when_every_connection_drops() {
    let data = Arc::new(blob_bytes(10_000));
    let served = data.clone();
    let server = Server::start(move |_, head| {
        let mut r = serve_range(&served, head);
        r.truncate(r.len() - 9_000.min(r.len() / 2));
        Reply::Send(r)
    });
    let c = client_with(|o| o.max_retries = 2);
    let s = c
        .blob(&server.reference("a/b"), &locator(&data))
        .await
        .expect("opened");
    let e = collect(s).await.unwrap_err();
    assert!(matches!(e.kind, ErrorKind::TooManyRetries { .. }), "{e}");
    assert_eq!(server.requests().len(), 3, "first request + 2 resumes");
}

#[tokio::test]
async fn blob_range_checks_and_slices() {
    let data = Arc::new(blob_bytes(50_000));
    let served = data.clone();
    let server = Server::start(move |_, head| {
        let path = path_of(head).to_string();
        if path.starts_with("/v2/honest/") {
            Reply::Send(serve_range(&served, head))
        } else if path.starts_with("/v2/ignores/") {
            Reply::Send(response("200 OK", &[], &served))
        } else {
            let cr = format!("bytes 0-9/{}", served.len());
            Reply::Send(response(
                "206 Partial Content",
                &[("Content-Range", cr)],
                &served[..10],
            ))
        }
    });
    let c = client();
    let blob = locator(&data);
    let got = c
        .blob_range(&server.reference("honest/x"), &blob, 1000, 21_000)
        .await
        .expect("206");
    assert!(got[..] == data[1000..21_000]);
    let got = c
        .blob_range(&server.reference("ignores/x"), &blob, 49_990, 50_000)
        .await
        .expect("200 sliced");
    assert!(got[..] == data[49_990..]);
    let e = c
        .blob_range(&server.reference("liar/x"), &blob, 100, 200)
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::Protocol(_)), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("liar/x@")
            && text.contains("bytes 100-199")
            && text.contains("Content-Range"),
        "{text}"
    );
    assert!(
        c.blob_range(&server.reference("honest/x"), &blob, 10, 50_001)
            .await
            .is_err(),
        "past the end"
    );
    assert!(
        c.blob_range(&server.reference("honest/x"), &blob, 7, 7)
            .await
            .expect("empty")
            .is_empty()
    );
}

#[tokio::test]
async fn bearer_flow_token_cache_and_reauth() {
    let manifest = br#"{"schemaVersion":2}"#.to_vec();
    let tokens = Arc::new(StdMutex::new(0u32));
    let issued = tokens.clone();
    let server = Server::start(move |n, head| {
        let path = path_of(head);
        if path.starts_with("/token") {
            let mut count = issued.lock().unwrap_or_else(|p| p.into_inner());
            *count += 1;
            // No expires_in: the client must assume 60 s.
            return Reply::Send(response(
                "200 OK",
                &[],
                format!(r#"{{"access_token":"tok{count}"}}"#).as_bytes(),
            ));
        }
        let auth = header_value(head, "authorization").unwrap_or_default();
        // The first token is "revoked" from request 4 on, to force a re-auth.
        let valid = auth == "Bearer tok2" || (auth == "Bearer tok1" && n < 4);
        if valid {
            Reply::Send(response("200 OK", &[], &manifest))
        } else {
            let host = header_value(head, "host").unwrap_or_default();
            let challenge = format!(
                r#"Bearer realm="http://{host}/token",service="test-registry",scope="repository:team/app:pull,push""#
            );
            Reply::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
            ))
        }
    });
    let c = client();
    let r = server.reference("team/app:v1");
    c.manifest(&r, "v1", &[])
        .await
        .expect("after the token flow");
    c.manifest(&r, "v1", &[]).await.expect("cached token");
    c.manifest(&r, "v1", &[])
        .await
        .expect("re-auth after revocation");
    let requests = server.requests();
    let paths: Vec<&str> = requests.iter().map(|h| path_of(h)).collect();
    assert_eq!(paths.len(), 7, "{paths:?}");
    assert!(paths[1].starts_with("/token?"), "{paths:?}");
    assert!(paths[1].contains("service=test-registry"), "{}", paths[1]);
    assert!(
        paths[1].contains("scope=repository%3Ateam%2Fapp%3Apull&"),
        "{}",
        paths[1]
    );
    assert!(
        paths[1].contains("scope=repository%3Ateam%2Fapp%3Apull%2Cpush"),
        "{}",
        paths[1]
    );
    assert_eq!(
        header_value(&requests[0], "authorization"),
        None,
        "anonymous first"
    );
    assert_eq!(
        header_value(&requests[1], "authorization"),
        None,
        "no credentials configured"
    );
    assert_eq!(
        header_value(&requests[2], "authorization"),
        Some("Bearer tok1")
    );
    assert_eq!(
        header_value(&requests[3], "authorization"),
        Some("Bearer tok1"),
        "cached"
    );
    assert!(paths[5].starts_with("/token?"));
    assert_eq!(
        header_value(&requests[6], "authorization"),
        Some("Bearer tok2")
    );
}

#[tokio::test]
async fn unauthorized_after_reauth_is_a_clear_error() {
    let server = Server::start(|_, head| {
        if path_of(head).starts_with("/token") {
            return Reply::Send(response(
                "200 OK",
                &[],
                br#"{"token":"useless","expires_in":300}"#,
            ));
        }
        let host = header_value(head, "host").unwrap_or_default();
        let challenge = format!(r#"Bearer realm="http://{host}/token",service="s""#);
        Reply::Send(response(
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            b"",
        ))
    });
    let e = client()
        .manifest(&server.reference("a/b:c"), "c", &[])
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("401 unauthorized")
            && text.contains("docker login")
            && text.contains(&server.registry()),
        "{text}"
    );
    assert_eq!(server.requests().len(), 3, "one re-auth, then give up");
}

#[tokio::test]
async fn redirects_never_carry_authorization_to_another_host() {
    let data = Arc::new(blob_bytes(4096));
    let cdn_data = data.clone();
    let cdn = Server::start(move |_, head| Reply::Send(serve_range(&cdn_data, head)));
    let cdn_addr = cdn.addr;
    let server = Server::start(move |_, head| {
        let path = path_of(head);
        if path.starts_with("/token") {
            return Reply::Send(response("200 OK", &[], br#"{"token":"secret-token"}"#));
        }
        if header_value(head, "authorization") != Some("Bearer secret-token") {
            let host = header_value(head, "host").unwrap_or_default();
            let challenge = format!(r#"Bearer realm="http://{host}/token",service="s""#);
            return Reply::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                b"",
            ));
        }
        let location = format!("http://{cdn_addr}/signed/blob?sig=abc");
        Reply::Send(response(
            "307 Temporary Redirect",
            &[("Location", location)],
            b"",
        ))
    });
    let c = client();
    let r = server.reference("team/app");
    let blob = locator(&data);
    let got = collect(c.blob(&r, &blob).await.expect("via the CDN"))
        .await
        .expect("whole");
    assert!(got == *data);
    let part = c
        .blob_range(&r, &blob, 100, 200)
        .await
        .expect("range via cached redirect");
    assert!(part[..] == data[100..200]);
    let cdn_requests = cdn.requests();
    assert_eq!(cdn_requests.len(), 2);
    for head in &cdn_requests {
        assert_eq!(
            header_value(head, "authorization"),
            None,
            "leaked to the CDN: {head}"
        );
        assert_eq!(path_of(head), "/signed/blob?sig=abc");
    }
    // anonymous try, token, authorized try; the range went straight to the CDN.
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn redirect_loops_are_bounded() {
    let server = Server::start(|n, _| {
        let location = format!("/v2/loop/{n}");
        Reply::Send(response("302 Found", &[("Location", location)], b""))
    });
    let e = client()
        .manifest(&server.reference("a/b:c"), "c", &[])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("redirects"), "{e}");
    assert_eq!(server.requests().len(), transport::MAX_REDIRECTS + 1);
}

#[tokio::test]
async fn foreign_urls_are_tried_first_then_the_registry() {
    let data = Arc::new(blob_bytes(2048));
    let served = data.clone();
    let server = Server::start(move |_, head| {
        if path_of(head).starts_with("/dead") {
            Reply::Send(response("404 Not Found", &[], b""))
        } else {
            Reply::Send(serve_range(&served, head))
        }
    });
    let c = client_with(|o| o.max_retries = 0);
    let r = server.reference("win/base");
    let mut blob = locator(&data);
    blob.urls = vec![
        format!("http://{}/dead/layer", server.addr),
        format!("http://{}/foreign/layer", server.addr),
    ];
    let part = c.blob_range(&r, &blob, 10, 20).await.expect("second URL");
    assert!(part[..] == data[10..20]);
    let paths: Vec<String> = server
        .requests()
        .iter()
        .map(|h| path_of(h).to_string())
        .collect();
    assert_eq!(paths, ["/dead/layer", "/foreign/layer"]);
    blob.urls = vec![format!("http://{}/dead/layer", server.addr)];
    let whole = collect(c.blob(&r, &blob).await.expect("falls back"))
        .await
        .expect("whole");
    assert!(whole == *data);
    let last = server.requests().last().cloned().unwrap_or_default();
    assert!(path_of(&last).starts_with("/v2/win/base/blobs/"), "{last}");
}

#[tokio::test]
async fn identity_tokens_use_the_oauth2_refresh_flow() {
    let server = Server::start(|_, head| {
        if head.starts_with("POST /token") {
            return Reply::Send(response(
                "200 OK",
                &[],
                br#"{"access_token":"from-refresh","expires_in":120}"#,
            ));
        }
        if header_value(head, "authorization") == Some("Bearer from-refresh") {
            return Reply::Send(response("200 OK", &[], b"{}"));
        }
        let host = header_value(head, "host").unwrap_or_default();
        let challenge = format!(r#"Bearer realm="http://{host}/token",service="svc""#);
        Reply::Send(response(
            "401 Unauthorized",
            &[("WWW-Authenticate", challenge)],
            b"",
        ))
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let config = format!(
        r#"{{"auths":{{"{}":{{"username":"u","identitytoken":"refresh-me"}}}}}}"#,
        server.registry()
    );
    std::fs::write(dir.path().join("config.json"), config).expect("write config.json");
    let c = client_with(|o| o.docker_config_dir = Some(dir.path().to_path_buf()));
    c.manifest(&server.reference("a/b:c"), "c", &[])
        .await
        .expect("token from the refresh flow");
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    let post = &requests[1];
    assert!(post.starts_with("POST /token "), "{post}");
    assert_eq!(
        header_value(post, "content-type"),
        Some("application/x-www-form-urlencoded")
    );
    for part in [
        "grant_type=refresh_token",
        "refresh_token=refresh-me",
        "service=svc",
        "scope=repository%3Aa%2Fb%3Apull",
    ] {
        assert!(post.contains(part), "{part} missing from {post}");
    }
}

// ------------------------------------------------------------------ mirrors

fn with_mirrors(upstream: &Server, mirrors: &[&Server]) -> Client {
    let endpoints = mirrors
        .iter()
        .map(|m| Url::parse(&format!("http://{}", m.addr)).expect("mirror URL"))
        .collect();
    client_with(|o| {
        o.mirrors.insert(upstream.registry(), endpoints);
    })
}

#[tokio::test]
async fn a_mirror_serves_manifests_blobs_and_ranges_with_its_own_token() {
    let manifest = br#"{"schemaVersion":2,"from":"mirror"}"#.to_vec();
    let data = Arc::new(blob_bytes(10_000));
    let served = data.clone();
    let mirror = Server::start(move |_, head| {
        let path = path_of(head);
        if path.starts_with("/token") {
            return Reply::Send(response("200 OK", &[], br#"{"token":"mirror-tok"}"#));
        }
        if header_value(head, "authorization") != Some("Bearer mirror-tok") {
            let host = header_value(head, "host").unwrap_or_default();
            let challenge = format!(r#"Bearer realm="http://{host}/token",service="mirror""#);
            return Reply::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                b"",
            ));
        }
        if path.contains("/manifests/") {
            return Reply::Send(response("200 OK", &[], &manifest));
        }
        Reply::Send(serve_range(&served, head))
    });
    let upstream =
        Server::start(|_, _| Reply::Send(response("500 Internal Server Error", &[], b"")));
    let c = with_mirrors(&upstream, &[&mirror]);
    let r = upstream.reference("team/app:v1");
    let m = c.manifest(&r, "v1", &[]).await.expect("manifest by tag");
    assert!(m.bytes.ends_with(br#""mirror"}"#));
    let blob = locator(&data);
    let whole = collect(c.blob(&r, &blob).await.expect("blob")).await;
    assert_eq!(whole.expect("whole blob"), *data);
    let part = c.blob_range(&r, &blob, 100, 5000).await.expect("range");
    assert_eq!(&part[..], &data[100..5000]);
    assert!(upstream.requests().is_empty(), "{:?}", upstream.requests());
    let requests = mirror.requests();
    let paths: Vec<&str> = requests.iter().map(|h| path_of(h)).collect();
    assert!(
        paths[0].starts_with("/v2/team/app/manifests/v1"),
        "{paths:?}"
    );
    assert!(paths[1].starts_with("/token?"), "{paths:?}");
    assert_eq!(
        paths.iter().filter(|p| p.starts_with("/token")).count(),
        1,
        "one token for the mirror, then cached: {paths:?}"
    );
}

#[tokio::test]
async fn failing_mirrors_fall_back_in_order_and_a_dead_one_is_left_out() {
    let data = Arc::new(blob_bytes(4096));
    let served = data.clone();
    let busy = Server::start(|_, _| Reply::Send(response("503 Service Unavailable", &[], b"")));
    let refusing = Server::start(|_, _| {
        Reply::Send(response(
            "401 Unauthorized",
            &[("WWW-Authenticate", r#"Basic realm="m""#.to_string())],
            b"",
        ))
    });
    let empty = Server::start(|_, _| {
        Reply::Send(response(
            "404 Not Found",
            &[],
            br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
        ))
    });
    let upstream = Server::start(move |_, head| Reply::Send(serve_range(&served, head)));
    let c = with_mirrors(&upstream, &[&busy, &refusing, &empty]);
    let r = upstream.reference("team/app:v1");
    let blob = locator(&data);
    for _ in 0..2 {
        let part = c
            .blob_range(&r, &blob, 10, 20)
            .await
            .expect("from upstream");
        assert_eq!(&part[..], &data[10..20]);
    }
    assert_eq!(
        busy.requests().len(),
        1,
        "no retry, then left out for a while"
    );
    assert_eq!(
        refusing.requests().len(),
        2,
        "an auth refusal is not a dead mirror"
    );
    assert_eq!(empty.requests().len(), 2);
    assert_eq!(upstream.requests().len(), 2);
}

#[tokio::test]
async fn a_digest_mismatch_from_a_mirror_is_an_error_not_a_fallback() {
    let good = br#"{"schemaVersion":2}"#.to_vec();
    let digest = Digest::of(&good);
    let mirror = Server::start(|_, _| {
        Reply::Send(response("200 OK", &[], br#"{"schemaVersion":2,"evil":1}"#))
    });
    let upstream = Server::start(move |_, _| Reply::Send(response("200 OK", &[], &good)));
    let c = with_mirrors(&upstream, &[&mirror]);
    let e = c
        .manifest(&upstream.reference("team/app:v1"), &digest.to_string(), &[])
        .await
        .unwrap_err();
    assert!(matches!(e.kind, ErrorKind::DigestMismatch { .. }), "{e}");
    assert!(e.to_string().contains(&mirror.registry()), "{e}");
    assert!(upstream.requests().is_empty());
}

mod push;
