//! `Reference::parse` on arbitrary strings: never panics, and what it
//! accepts prints (`Display`) to a reference that parses back to itself.
#![no_main]

use imgfs::reference::Reference;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(parsed) = Reference::parse(text) else {
        return;
    };
    let shown = parsed.to_string();
    let again = Reference::parse(&shown)
        .unwrap_or_else(|e| panic!("{text:?} parses, but its display {shown:?} does not: {e}"));
    assert_eq!(again, parsed, "{text:?} -> {shown:?} parses differently");
    let _ = (parsed.api_host(), parsed.manifest_ref(), parsed.name());
});
