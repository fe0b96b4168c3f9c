//! Messages as postino keeps them: the queue id, the envelope, and the
//! per-recipient routes decided at RCPT time.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::esmtp::EnvelopeParams;
use crate::routing::Route;

/// The id of an accepted message, like Postfix's queue id: named in the `250`
/// reply to DATA and in every log line about the message.
///
/// Allocated from sled's persistent monotonic counter, so ids never repeat,
/// even across crashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(pub u64);

impl MessageId {
    /// Big-endian key: sled keeps ids in allocation order.
    pub fn to_key(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The id from a store key ([`MessageId::to_key`]); `None` if the key is not 8 bytes.
    pub fn from_key(key: &[u8]) -> Option<MessageId> {
        Some(MessageId(u64::from_be_bytes(key.try_into().ok()?)))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010X}", self.0)
    }
}

impl MessageId {
    /// Parses a queue id as the CLI, the control socket and the admin API
    /// take it (hex, as logs and `queue list` show it).
    ///
    /// # Errors
    /// The text that the CLI prints when it is not one.
    pub fn parse_queue_id(id: &str) -> Result<MessageId, String> {
        id.parse().map_err(|_| format!("`{id}` is not a queue id"))
    }
}

impl FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(MessageId)
    }
}

/// One accepted recipient and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutedRecipient {
    /// The address as the client gave it in `RCPT TO` (without `<>`).
    pub address: String,
    /// Where it goes, as the router decided at RCPT.
    pub route: Route,
}

/// Everything about an accepted message except its content.
///
/// Stored (bincode) in a layout older records also read as: see
/// `StoredSender`. JSON (exports) has the plain fields, `params` only
/// when there are some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The message's queue id.
    pub id: MessageId,
    /// The reverse path; `None` is the null sender `<>` (bounces).
    pub sender: Option<String>,
    /// The accepted recipients, each with its route.
    pub recipients: Vec<RoutedRecipient>,
    /// Unix time, seconds.
    pub received_at: u64,
    /// Client address and HELO name, for logs and bounces.
    pub client: String,
    /// The HELO/EHLO name the client gave.
    pub helo: String,
    /// Octets of the stored content (CRLF line ends, unstuffed).
    pub size: u64,
    /// DSN and SMTPUTF8 parameters; `None` when the client sent none.
    pub params: Option<Box<EnvelopeParams>>,
}

/// [`Envelope`] in JSON.
#[derive(Serialize, Deserialize)]
#[serde(rename = "Envelope")]
struct EnvelopeJson {
    id: MessageId,
    sender: Option<String>,
    recipients: Vec<RoutedRecipient>,
    received_at: u64,
    client: String,
    helo: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    params: Option<Box<EnvelopeParams>>,
}

/// [`Envelope`] as stored: the sender's place carries the parameters.
#[derive(Deserialize)]
struct EnvelopeStored {
    id: MessageId,
    sender: StoredSender,
    recipients: Vec<RoutedRecipient>,
    received_at: u64,
    client: String,
    helo: String,
    size: u64,
}

/// The stored sender (schema 4). bincode writes an `Option` as a tag byte
/// 0 or 1 and an enum's variant as its index, one byte too when small: the
/// first two variants are byte for byte the `Option<String>` that schema 3
/// and older wrote, so their records read unchanged, and an envelope
/// without parameters is still written as they were. An envelope with
/// parameters uses the third.
#[derive(Deserialize)]
enum StoredSender {
    Null,
    Some(String),
    With(Option<String>, Box<EnvelopeParams>),
}

impl StoredSender {
    fn split(self) -> (Option<String>, Option<Box<EnvelopeParams>>) {
        match self {
            StoredSender::Null => (None, None),
            StoredSender::Some(s) => (Some(s), None),
            StoredSender::With(s, p) => (s, Some(p)),
        }
    }
}

/// [`EnvelopeStored`] borrowed, for writing without a copy.
#[derive(Serialize)]
#[serde(rename = "EnvelopeStored")]
struct EnvelopeStoredRef<'a> {
    id: MessageId,
    sender: StoredSenderRef<'a>,
    recipients: &'a [RoutedRecipient],
    received_at: u64,
    client: &'a str,
    helo: &'a str,
    size: u64,
}

/// [`StoredSender`] borrowed.
#[derive(Serialize)]
#[serde(rename = "StoredSender")]
enum StoredSenderRef<'a> {
    Null,
    Some(&'a str),
    With(&'a Option<String>, &'a EnvelopeParams),
}

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            // Exports and tools only: a copy does not matter there.
            let e = self.clone();
            return EnvelopeJson {
                id: e.id,
                sender: e.sender,
                recipients: e.recipients,
                received_at: e.received_at,
                client: e.client,
                helo: e.helo,
                size: e.size,
                params: e.params,
            }
            .serialize(s);
        }
        let sender = match (&self.sender, self.params.as_deref()) {
            (s, Some(p)) => StoredSenderRef::With(s, p),
            (Some(s), None) => StoredSenderRef::Some(s),
            (None, None) => StoredSenderRef::Null,
        };
        EnvelopeStoredRef {
            id: self.id,
            sender,
            recipients: &self.recipients,
            received_at: self.received_at,
            client: &self.client,
            helo: &self.helo,
            size: self.size,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let e = EnvelopeJson::deserialize(d)?;
            Ok(Envelope {
                id: e.id,
                sender: e.sender,
                recipients: e.recipients,
                received_at: e.received_at,
                client: e.client,
                helo: e.helo,
                size: e.size,
                params: e.params,
            })
        } else {
            let e = EnvelopeStored::deserialize(d)?;
            let (sender, params) = e.sender.split();
            Ok(Envelope {
                id: e.id,
                sender,
                recipients: e.recipients,
                received_at: e.received_at,
                client: e.client,
                helo: e.helo,
                size: e.size,
                params,
            })
        }
    }
}

impl Envelope {
    /// `<sender>` as it appears in logs and `Return-Path:`.
    pub fn sender_display(&self) -> String {
        format!("<{}>", self.sender.as_deref().unwrap_or(""))
    }
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
