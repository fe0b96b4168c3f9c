//! `ReplyReceiver` on any server output, whole and in fragments: never
//! panics; fragments change nothing; limits hold; every reply is a code of
//! 200–559 with a status of its class; EHLO keyword parsing never panics.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postino_core::smtp::client::{
    enhanced_status, Extensions, ReplyError, ReplyReceiver, MAX_REPLY_LINE, MAX_REPLY_LINES,
};
use postino_core::smtp::Reply;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the fragment size; the rest is the stream.
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let size = usize::from(first % 16) + 1;
    let whole = read_all(input, input.len().max(1));
    let pieces = read_all(input, size);
    let bytes = read_all(input, 1);
    assert_eq!(whole, pieces, "pieces of {size}");
    assert_eq!(whole, bytes, "byte by byte");
    let (replies, _) = whole;
    for reply in &replies {
        check(reply);
        let _ = Extensions::parse(reply);
    }
});

/// Every reply in `input` fed in pieces of `size`, then the error that
/// ended the stream if any.
fn read_all(input: &[u8], size: usize) -> (Vec<Reply>, Option<ReplyError>) {
    let mut rx = ReplyReceiver::new();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for piece in input.chunks(size) {
        buf.extend_from_slice(piece);
        loop {
            match rx.next_reply(&mut buf) {
                Ok(Some(reply)) => out.push(reply),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        // Never more than one partial line waits in the caller's buffer.
        assert!(buf.len() < MAX_REPLY_LINE, "{} octets buffered", buf.len());
    }
    (out, None)
}

fn check(reply: &Reply) {
    assert!((200..560).contains(&reply.code), "{}", reply.code);
    assert!(reply.code % 100 / 10 <= 5, "{}", reply.code);
    let lines = reply.text.split('\n').count();
    assert!(lines <= MAX_REPLY_LINES, "{lines} lines");
    for line in reply.text.split('\n') {
        assert!(line.len() + 6 <= MAX_REPLY_LINE * 3, "line of {}", line.len());
    }
    if let Some(status) = &reply.status {
        assert_eq!(enhanced_status(status), Some(status.as_ref()));
        assert_eq!(
            status.as_bytes()[0],
            b'0' + u8::try_from(reply.code / 100).unwrap(),
            "{status} in a {} reply",
            reply.code
        );
    }
}
