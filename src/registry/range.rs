//! HTTP Range requests for blobs: the header we send and the checks on what
//! comes back. A registry may honour the range (206, whose `Content-Range`
//! must match exactly) or ignore it (200 with the whole blob, from which the
//! wanted bytes are cut while streaming, never buffered whole).

use reqwest::header::{self, HeaderMap, HeaderValue};

/// `Range: bytes=start-(end-1)` for the half-open span `[start, end)`.
pub fn range_header(start: u64, end: u64) -> HeaderValue {
    let text = format!("bytes={start}-{}", end.saturating_sub(1));
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("bytes=0-"))
}

/// How to get the wanted span out of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyPlan {
    /// Bytes of body to discard first (non-zero when the range was ignored).
    pub skip: u64,
    /// Whether the body should end right after the span (206); a 200 body
    /// goes on to the end of the blob and is simply dropped.
    pub exact: bool,
}

#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    first: u64,
    last: u64,
    total: Option<u64>,
}

/// `bytes first-last/total` (total may be `*`).
fn parse_content_range(value: &str) -> Option<ContentRange> {
    let spec = value.trim().strip_prefix("bytes")?.trim_start();
    let (span, total) = spec.split_once('/')?;
    let (first, last) = span.trim().split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        n => Some(n.parse().ok()?),
    };
    let range = ContentRange {
        first: first.trim().parse().ok()?,
        last: last.trim().parse().ok()?,
        total,
    };
    (range.first <= range.last).then_some(range)
}

/// Checks a response to a request for `[start, end)` of a blob of `size`
/// bytes. `status` is already known to be 2xx.
pub fn plan_body(
    status: u16,
    headers: &HeaderMap,
    start: u64,
    end: u64,
    size: u64,
) -> Result<BodyPlan, String> {
    let text = |name: header::HeaderName| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_length = text(header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    match status {
        206 => {
            if text(header::CONTENT_TYPE)
                .is_some_and(|t| t.to_ascii_lowercase().starts_with("multipart/"))
            {
                return Err("answered a single range with multipart/byteranges".to_string());
            }
            let raw = text(header::CONTENT_RANGE).ok_or("206 without a Content-Range header")?;
            let got = parse_content_range(&raw)
                .ok_or_else(|| format!("unreadable Content-Range {raw:?}"))?;
            let wanted = ContentRange {
                first: start,
                last: end - 1,
                total: Some(size),
            };
            let total_ok = got.total.is_none_or(|t| t == size);
            if got.first != wanted.first || got.last != wanted.last || !total_ok {
                return Err(format!(
                    "asked for bytes {start}-{} of {size}, got Content-Range {raw:?}",
                    end - 1
                ));
            }
            if content_length.is_some_and(|len| len != end - start) {
                return Err(format!(
                    "206 with Content-Length {content_length:?} for {} bytes",
                    end - start
                ));
            }
            Ok(BodyPlan {
                skip: 0,
                exact: true,
            })
        }
        200 => {
            if content_length.is_some_and(|len| len != size) {
                let len = content_length.unwrap_or_default();
                return Err(format!(
                    "answered a Range request with a whole blob of {len} bytes where the manifest \
                     says {size}: the stored blob is truncated or is not the one the manifest names"
                ));
            }
            Ok(BodyPlan {
                skip: start,
                exact: false,
            })
        }
        other => Err(format!("unexpected status {other} to a Range request")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn range_header_is_inclusive() {
        assert_eq!(range_header(0, 100), "bytes=0-99");
        assert_eq!(range_header(5, 6), "bytes=5-5");
    }

    #[test]
    fn content_range_parsing() {
        let cr = |s| parse_content_range(s);
        assert_eq!(
            cr("bytes 0-99/1000"),
            Some(ContentRange {
                first: 0,
                last: 99,
                total: Some(1000)
            })
        );
        assert_eq!(
            cr("bytes 10-19/*"),
            Some(ContentRange {
                first: 10,
                last: 19,
                total: None
            })
        );
        assert_eq!(cr("bytes 20-10/100"), None);
        assert_eq!(cr("bytes */100"), None);
        assert_eq!(cr("items 0-1/2"), None);
        assert_eq!(cr("bytes 0-x/2"), None);
    }

    #[test]
    fn partial_responses_must_match_exactly() {
        let ok = headers(&[
            ("content-range", "bytes 100-199/1000"),
            ("content-length", "100"),
        ]);
        assert_eq!(
            plan_body(206, &ok, 100, 200, 1000),
            Ok(BodyPlan {
                skip: 0,
                exact: true
            })
        );
        let star = headers(&[("content-range", "bytes 100-199/*")]);
        assert!(plan_body(206, &star, 100, 200, 1000).is_ok());
        for bad in [
            headers(&[("content-range", "bytes 0-99/1000")]),
            headers(&[("content-range", "bytes 100-299/1000")]),
            headers(&[("content-range", "bytes 100-199/999")]),
            headers(&[
                ("content-range", "bytes 100-199/1000"),
                ("content-length", "99"),
            ]),
            headers(&[]),
            headers(&[
                ("content-range", "bytes 100-199/1000"),
                ("content-type", "multipart/byteranges; boundary=x"),
            ]),
        ] {
            assert!(plan_body(206, &bad, 100, 200, 1000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ignored_ranges_are_cut_from_the_whole_body() {
        let whole = headers(&[("content-length", "1000")]);
        assert_eq!(
            plan_body(200, &whole, 100, 200, 1000),
            Ok(BodyPlan {
                skip: 100,
                exact: false
            })
        );
        assert_eq!(
            plan_body(200, &headers(&[]), 7, 8, 1000),
            Ok(BodyPlan {
                skip: 7,
                exact: false
            })
        );
        let wrong = headers(&[("content-length", "999")]);
        assert!(
            plan_body(200, &wrong, 100, 200, 1000)
                .unwrap_err()
                .contains("999")
        );
        assert!(plan_body(204, &whole, 0, 1, 1000).is_err());
    }
}
