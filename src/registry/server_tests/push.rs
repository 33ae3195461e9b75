//! Pushes against the misbehaving server: what the client sends (methods,
//! paths, query strings, headers, bodies, credentials) and how it recovers.

use super::*;

fn method_of(head: &str) -> &str {
    head.split_whitespace().next().unwrap_or_default()
}

/// "METHOD path" of every request so far.
fn lines(server: &Server) -> Vec<String> {
    server
        .requests()
        .iter()
        .map(|h| format!("{} {}", method_of(h), path_of(h)))
        .collect()
}

/// The body of a recorded request (the server appends it to the head).
fn body_of(head: &str) -> &str {
    head.split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

fn created(digest: &Digest) -> Reply {
    Reply::Send(response(
        "201 Created",
        &[("Docker-Content-Digest", digest.to_string())],
        b"",
    ))
}

fn not_found() -> Reply {
    Reply::Send(response("404 Not Found", &[], b""))
}

/// A blob the recorded (lossy UTF-8) request body can be compared with.
fn ascii_blob(len: usize) -> Bytes {
    Bytes::from(
        blob_bytes(len)
            .into_iter()
            .map(|b| b'a' + b % 26)
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn a_failed_put_restarts_the_upload_from_a_new_session() {
    let data = ascii_blob(3000);
    let digest = Digest::of(&data);
    let puts = Arc::new(StdMutex::new(0u32));
    let seen_puts = puts.clone();
    let reply_digest = digest;
    let server = Server::start(move |n, head| match method_of(head) {
        "HEAD" => not_found(),
        "POST" => Reply::Send(response(
            "202 Accepted",
            // Relative, with a query string of its own.
            &[(
                "Location",
                format!("/v2/team/app/blobs/uploads/session{n}?_state=a%2Bb%3D"),
            )],
            b"",
        )),
        "PUT" => {
            let mut count = seen_puts.lock().unwrap_or_else(|p| p.into_inner());
            *count += 1;
            if *count == 1 {
                Reply::Send(response("500 Internal Server Error", &[], b"oops"))
            } else {
                created(&reply_digest)
            }
        }
        _ => Reply::Send(response("405 Method Not Allowed", &[], b"")),
    });
    let r = server.reference("team/app:v1");
    client()
        .push_blob(&r, &digest, data.clone())
        .await
        .expect("pushed on the second session");
    let d = digest.to_string().replace(':', "%3A");
    assert_eq!(
        lines(&server),
        [
            format!("HEAD /v2/team/app/blobs/{digest}"),
            "POST /v2/team/app/blobs/uploads/".to_string(),
            format!("PUT /v2/team/app/blobs/uploads/session1?_state=a%2Bb%3D&digest={d}"),
            format!("HEAD /v2/team/app/blobs/{digest}"),
            "POST /v2/team/app/blobs/uploads/".to_string(),
            format!("PUT /v2/team/app/blobs/uploads/session4?_state=a%2Bb%3D&digest={d}"),
        ]
    );
    let requests = server.requests();
    assert_eq!(header_value(&requests[1], "content-length"), Some("0"));
    let put = &requests[5];
    assert_eq!(
        header_value(put, "content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(
        header_value(put, "content-length"),
        Some(data.len().to_string().as_str())
    );
    assert!(body_of(put).as_bytes() == &data[..], "PUT body differs");
}

#[tokio::test]
async fn an_existing_blob_is_not_uploaded_and_failures_are_bounded() {
    let data = ascii_blob(100);
    let digest = Digest::of(&data);
    let there = Server::start(|_, head| match method_of(head) {
        "HEAD" => Reply::Send(response("200 OK", &[("Content-Length", "100".into())], b"")),
        _ => Reply::Send(response("500 Internal Server Error", &[], b"")),
    });
    let c = client_with(|o| o.max_retries = 1);
    let r = there.reference("a/b");
    assert!(c.blob_exists(&r, &digest).await.expect("HEAD"));
    c.push_blob(&r, &digest, data.clone())
        .await
        .expect("skipped");
    assert_eq!(lines(&there).len(), 2, "{:?}", lines(&there));

    let broken = Server::start(|_, head| match method_of(head) {
        "HEAD" => not_found(),
        "POST" => Reply::Send(response(
            "202 Accepted",
            &[("Location", "/v2/a/b/blobs/uploads/x".into())],
            b"",
        )),
        _ => Reply::Send(response("503 Service Unavailable", &[], b"")),
    });
    let r = broken.reference("a/b");
    assert!(!c.blob_exists(&r, &digest).await.expect("HEAD 404"));
    let e = c.push_blob(&r, &digest, data).await.unwrap_err();
    assert!(
        matches!(e.kind, ErrorKind::TooManyRetries { attempts: 2, .. }),
        "{e}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "registry {}: pushing blob a/b@{digest}: gave up after 2 attempts",
            broken.registry()
        )) && text.contains("503"),
        "{text}"
    );
    let puts = lines(&broken)
        .iter()
        .filter(|l| l.starts_with("PUT"))
        .count();
    assert_eq!(puts, 2, "{:?}", lines(&broken));
}

#[tokio::test]
async fn a_refused_upload_is_not_restarted() {
    let data = ascii_blob(100);
    let digest = Digest::of(&data);
    let server = Server::start(|_, head| {
        match method_of(head) {
        "HEAD" => not_found(),
        "POST" => Reply::Send(response(
            "202 Accepted",
            &[("Location", "/v2/a/b/blobs/uploads/x".into())],
            b"",
        )),
        _ => Reply::Send(response(
            "400 Bad Request",
            &[],
            br#"{"errors":[{"code":"DIGEST_INVALID","message":"provided digest did not match uploaded content"}]}"#,
        )),
    }
    });
    let e = client()
        .push_blob(&server.reference("a/b"), &digest, data)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("DIGEST_INVALID"), "{e}");
    assert_eq!(lines(&server).len(), 3, "{:?}", lines(&server));
}

/// Tokens name their scopes, so a test can see which one a request carried.
fn token_server(storage: Option<String>) -> Server {
    Server::start(move |n, head| {
        let path = path_of(head);
        if let Some(query) = path.strip_prefix("/token?") {
            let scopes: Vec<&str> = query
                .split('&')
                .filter_map(|kv| kv.strip_prefix("scope="))
                .collect();
            let token = format!("tok{n}:{}", scopes.join("+"));
            return Reply::Send(response(
                "200 OK",
                &[],
                format!(r#"{{"token":"{token}","expires_in":300}}"#).as_bytes(),
            ));
        }
        let Some(token) = header_value(head, "authorization") else {
            let host = header_value(head, "host").unwrap_or_default();
            let challenge = format!(r#"Bearer realm="http://{host}/token",service="reg""#);
            return Reply::Send(response(
                "401 Unauthorized",
                &[("WWW-Authenticate", challenge)],
                b"",
            ));
        };
        let write = matches!(method_of(head), "POST" | "PUT" | "DELETE");
        if write && !token.contains("pull%2Cpush") {
            return Reply::Send(response("403 Forbidden", &[], b""));
        }
        match method_of(head) {
            "HEAD" => not_found(),
            "POST" => {
                let location = match &storage {
                    Some(s) => format!("http://{s}/upload/1?sig=abc"),
                    None => "/v2/team/app/blobs/uploads/1".to_string(),
                };
                Reply::Send(response("202 Accepted", &[("Location", location)], b""))
            }
            _ => Reply::Send(response("201 Created", &[], b"")),
        }
    })
}

#[tokio::test]
async fn reads_and_pushes_ask_for_their_own_token_scopes() {
    let storage = Server::start(|_, _| Reply::Send(response("201 Created", &[], b"")));
    let server = token_server(Some(storage.registry()));
    let c = client();
    let r = server.reference("team/app:v1");
    let data = ascii_blob(64);
    let digest = Digest::of(&data);
    assert!(!c.blob_exists(&r, &digest).await.expect("read"));
    c.push_blob(&r, &digest, data).await.expect("push");
    c.push_blob(&r, &Digest::of(b"other"), Bytes::from_static(b"other"))
        .await
        .expect("second push, token cached");
    let requests = server.requests();
    let tokens: Vec<&String> = requests
        .iter()
        .filter(|h| path_of(h).starts_with("/token"))
        .collect();
    assert_eq!(tokens.len(), 2, "one pull and one push token: {tokens:?}");
    assert!(
        path_of(tokens[0]).ends_with("scope=repository%3Ateam%2Fapp%3Apull"),
        "{}",
        path_of(tokens[0])
    );
    assert!(
        path_of(tokens[1]).ends_with("scope=repository%3Ateam%2Fapp%3Apull%2Cpush"),
        "{}",
        path_of(tokens[1])
    );
    let writes: Vec<&String> = requests.iter().filter(|h| method_of(h) == "POST").collect();
    assert_eq!(writes.len(), 2);
    // The upload session lives on another host: no registry token there.
    let uploads = storage.requests();
    assert_eq!(uploads.len(), 2);
    for put in &uploads {
        assert_eq!(method_of(put), "PUT");
        assert!(path_of(put).starts_with("/upload/1?sig=abc&digest=sha256%3A"));
        assert_eq!(header_value(put, "authorization"), None);
    }
}

#[tokio::test]
async fn mounts_carry_the_source_scope_and_a_declined_mount_cancels_its_session() {
    let server = token_server(None);
    let c = client();
    let r = server.reference("team/app:v1");
    let digest = Digest::of(b"layer");
    let from = server.reference("base/os:1");
    // token_server answers every POST with 202: the mount was declined.
    assert!(!c.mount_blob(&r, &digest, &from).await.expect("mount"));
    let all = lines(&server);
    let mount = all
        .iter()
        .find(|l| l.starts_with("POST"))
        .expect("a mount POST");
    assert_eq!(
        mount,
        &format!(
            "POST /v2/team/app/blobs/uploads/?mount={}&from=base%2Fos",
            digest.to_string().replace(':', "%3A")
        )
    );
    let token = all.iter().find(|l| l.contains("/token?")).expect("a token");
    assert!(
        token.contains(
            "scope=repository%3Ateam%2Fapp%3Apull%2Cpush&scope=repository%3Abase%2Fos%3Apull"
        ),
        "{token}"
    );
    assert_eq!(
        all.last().map(String::as_str),
        Some("DELETE /v2/team/app/blobs/uploads/1")
    );

    let elsewhere = Reference::parse("other.example/base/os:1").expect("reference");
    let before = server.requests().len();
    assert!(!c.mount_blob(&r, &digest, &elsewhere).await.expect("no-op"));
    assert_eq!(
        server.requests().len(),
        before,
        "another registry: no request"
    );

    let mounting = Server::start(move |_, head| match method_of(head) {
        "POST" if path_of(head).contains("mount=") => created(&digest),
        _ => Reply::Send(response("500 Internal Server Error", &[], b"")),
    });
    let r = mounting.reference("team/app");
    let from = mounting.reference("base/os");
    assert!(c.mount_blob(&r, &digest, &from).await.expect("mounted"));
}

#[tokio::test]
async fn manifests_are_put_by_tag_or_digest_and_the_stated_digest_is_checked() {
    let manifest = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
    let digest = Digest::of(&manifest);
    let server = Server::start(move |_, head| {
        if path_of(head).ends_with("/liar") {
            created(&Digest::of(b"something else"))
        } else {
            created(&digest)
        }
    });
    let c = client();
    let tagged = server.reference("team/app:v1");
    let got = c
        .push_manifest(&tagged, media_type::OCI_MANIFEST, manifest.clone())
        .await
        .expect("by tag");
    assert_eq!(got, digest);
    let pinned = server.reference("team/app").with_digest(digest);
    c.push_manifest(&pinned, media_type::OCI_MANIFEST, manifest.clone())
        .await
        .expect("by digest");
    let requests = server.requests();
    assert_eq!(
        lines(&server),
        [
            "PUT /v2/team/app/manifests/v1".to_string(),
            format!("PUT /v2/team/app/manifests/{digest}"),
        ]
    );
    assert_eq!(
        header_value(&requests[0], "content-type"),
        Some(media_type::OCI_MANIFEST)
    );
    assert_eq!(body_of(&requests[0]).as_bytes(), &manifest[..]);

    let e = c
        .push_manifest(
            &server.reference("team/app:liar"),
            media_type::OCI_MANIFEST,
            manifest,
        )
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "registry {}: pushing manifest team/app:liar: the registry reports storing",
            server.registry()
        )) && text.contains(&digest.to_string()),
        "{text}"
    );
}

#[tokio::test]
async fn pushes_never_go_to_a_mirror() {
    let mirror = Server::start(|_, _| Reply::Send(response("201 Created", &[], b"")));
    let upstream = Server::start(|_, head| match method_of(head) {
        "HEAD" => not_found(),
        "POST" => Reply::Send(response(
            "202 Accepted",
            &[("Location", "/v2/team/app/blobs/uploads/1".into())],
            b"",
        )),
        _ => Reply::Send(response("201 Created", &[], b"")),
    });
    let c = with_mirrors(&upstream, &[&mirror]);
    let r = upstream.reference("team/app:v1");
    let data = ascii_blob(10);
    assert!(!c.blob_exists(&r, &Digest::of(&data)).await.expect("HEAD"));
    c.push_blob(&r, &Digest::of(&data), data)
        .await
        .expect("blob");
    c.push_manifest(&r, media_type::OCI_MANIFEST, Bytes::from_static(b"{}"))
        .await
        .expect("manifest");
    assert!(mirror.requests().is_empty(), "{:?}", lines(&mirror));
    assert_eq!(lines(&upstream).len(), 5, "{:?}", lines(&upstream));
}
