//! `Address::parse` on any string, with and without SMTPUTF8. Invariants:
//! no panic; what parses respects RFC 5321's limits; UTF-8 is refused
//! without SMTPUTF8; what Display prints parses back to the same mailbox.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postino_core::address::{Address, MAX_DOMAIN, MAX_PATH};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let Ok(s) = std::str::from_utf8(rest) else {
        return;
    };
    let utf8 = ctl & 1 != 0;
    let Ok(a) = Address::parse(s, utf8) else {
        return;
    };
    assert!(utf8 || s.is_ascii());
    assert!(utf8 || !a.needs_smtputf8());
    assert!(s.len() + 2 <= MAX_PATH, "path limit");
    assert!(a.domain.len() <= MAX_DOMAIN, "domain limit");
    let _ = a.canonical();
    if a.domain.is_empty() {
        assert_eq!(a.local_part, "postmaster");
        return;
    }
    let shown = a.to_string();
    match Address::parse(&shown, utf8) {
        Ok(again) => {
            assert_eq!(again.local_part, a.local_part, "{s:?} -> {shown:?}");
            assert_eq!(again.domain, a.domain, "{s:?} -> {shown:?}");
            assert_eq!(
                again.names_another_host() || !a.source_route().is_empty(),
                a.names_another_host(),
                "{s:?} -> {shown:?}"
            );
        }
        Err(e) => panic!("{s:?} prints as {shown:?}, which does not parse: {e}"),
    }
});
