//! `Request::parse` on any line: never panics; every error maps to a
//! well-formed reply; every parsed address prints back to the same mailbox.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postino_core::address::Address;
use postino_core::smtp::request::Request;
use postino_core::smtp::Reply;

fuzz_target!(|data: &[u8]| {
    match Request::parse(data) {
        Ok(Request::Mail {
            from: Some(a),
            params,
        }) => check_address(&a, params.smtputf8),
        Ok(Request::Rcpt { to, .. }) => check_address(&to, true),
        Ok(_) => {}
        Err(e) => check_reply(&e.reply()),
    }
});

fn check_address(a: &Address, utf8: bool) {
    if !a.domain.is_empty() {
        let shown = a.to_string();
        match Address::parse(&shown, utf8) {
            Ok(again) => {
                assert_eq!(again.local_part, a.local_part, "{shown:?}");
                assert_eq!(again.domain, a.domain, "{shown:?}");
            }
            Err(e) => panic!("{a:?} prints as {shown:?}, which does not parse: {e}"),
        }
    }
    let _ = a.canonical();
    // Replies that echo an address stay one line.
    check_reply(&Reply::new(
        554,
        "5.7.1",
        format!("<{a}>: Relay access denied"),
    ));
}

/// Every line `ddd-...` / `ddd ...` ending in CRLF, with no other CR or LF.
fn check_reply(reply: &Reply) {
    let bytes = reply.to_bytes();
    for line in bytes.split_inclusive(|&b| b == b'\n') {
        assert!(line.ends_with(b"\r\n"), "{bytes:?}");
        let body = &line[..line.len() - 2];
        assert!(
            !body.contains(&b'\r') && !body.contains(&b'\n'),
            "{bytes:?}"
        );
        assert!(
            body.len() >= 4 && body[..3].iter().all(u8::is_ascii_digit),
            "{bytes:?}"
        );
    }
}
