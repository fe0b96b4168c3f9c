//! The DATA receiver fed in fragments. Invariants:
//! - the data ends exactly at the first `CRLF . CRLF` (counting the CRLF
//!   before the 354 reply), never anywhere else, so one DATA can never
//!   become two messages;
//! - fragments change nothing: the same end and the same result as one
//!   buffer;
//! - under `Normalize` the content has no bare CR or LF; under `Reject` a
//!   bare one before the end is always reported; content is never over the
//!   size limit;
//! - dot-stuffing round-trips: any CRLF text, stuffed and terminated, comes
//!   back exactly.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postino_core::config::BareLf;
use postino_core::smtp::receiver::{DataError, DataReceiver};

type Outcome = Option<(usize, Result<Vec<u8>, DataError>)>;

/// Feeds `input` in chunks of the given sizes (cycled); returns how many
/// octets the receiver consumed up to the end, and its result.
fn run(input: &[u8], sizes: &[usize], policy: BareLf, max: u64) -> Outcome {
    let mut rx = DataReceiver::new(max, policy);
    let mut buf = BytesMut::new();
    let mut fed = 0;
    let mut i = 0;
    while fed < input.len() {
        let n = sizes[i % sizes.len()].max(1).min(input.len() - fed);
        i += 1;
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        if rx.ingest(&mut buf) {
            let consumed = fed - buf.len();
            assert_eq!(rx.received() as usize, consumed);
            return Some((consumed, rx.finish()));
        }
        assert!(buf.is_empty(), "bytes left over before the end");
    }
    None
}

/// The reference: the end is after the first `CRLF . CRLF`, where the data
/// is taken to start right after a CRLF.
fn reference_end(input: &[u8]) -> Option<usize> {
    let mut framed = b"\r\n".to_vec();
    framed.extend_from_slice(input);
    framed
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .map(|i| i + 5 - 2)
}

fn only_crlf(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && bytes[i - 1] == b'\r',
        _ => true,
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let policy = if ctl & 1 == 0 {
        BareLf::Normalize
    } else {
        BareLf::Reject
    };
    let max = [8u64, 64, 1000, 1 << 20][usize::from(ctl >> 1 & 3)];
    let sizes: Vec<usize> = input.iter().take(8).map(|&b| usize::from(b % 17)).collect();

    let whole = run(input, &[input.len().max(1)], policy, max);
    let bytewise = run(input, &[1], policy, max);
    let split = run(
        input,
        if sizes.is_empty() { &[3] } else { &sizes },
        policy,
        max,
    );
    assert_eq!(whole, bytewise, "byte by byte differs");
    assert_eq!(whole, split, "fragments differ");

    assert_eq!(
        whole.as_ref().map(|w| w.0),
        reference_end(input),
        "end of data"
    );
    if let Some((consumed, result)) = &whole {
        let before_end = &input[..consumed - 3];
        match (policy, result) {
            (BareLf::Normalize, Ok(content)) => {
                assert!(only_crlf(content), "bare CR/LF in content");
                assert!(content.len() as u64 <= max);
            }
            (BareLf::Normalize, Err(e)) => assert_eq!(*e, DataError::TooBig),
            (BareLf::Reject, Ok(content)) => {
                assert!(only_crlf(before_end), "bare CR/LF not reported");
                assert!(content.len() as u64 <= max);
            }
            (BareLf::Reject, Err(DataError::BareLineEnding)) => {
                assert!(!only_crlf(before_end), "bare CR/LF reported wrongly")
            }
            (BareLf::Reject, Err(DataError::TooBig)) => assert!(only_crlf(before_end)),
        }
    }

    // Round trip: the input as CRLF text, stuffed and terminated.
    let mut text = Vec::new();
    for line in input.split(|&b| b == b'\n') {
        text.extend(line.iter().copied().filter(|&b| b != b'\r'));
        text.extend_from_slice(b"\r\n");
    }
    let mut wire = Vec::new();
    for line in text.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(line);
    }
    wire.extend_from_slice(b".\r\n");
    let got = run(
        &wire,
        &[sizes.first().copied().unwrap_or(5)],
        policy,
        1 << 20,
    );
    assert_eq!(got, Some((wire.len(), Ok(text))), "stuffing round trip");
});
