//! Delivery status notifications (RFC 3464 `multipart/report`): the bounces,
//! delay warnings and success notices (RFC 3461 `NOTIFY=SUCCESS`) postino
//! sends from `MAILER-DAEMON` with sender `<>`.

use std::fmt::Write as _;

use crate::message::MessageId;

/// Postfix's `bounce_size_limit`: larger originals are returned as headers only.
pub const MAX_RETURNED_CONTENT: usize = 50_000;

/// Whether the message failed for good or is only late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Delivery failed for good: the report is a bounce.
    Failure,
    /// Delivery is late but still tried: a delay warning.
    Delay,
    /// Delivered into a local mailbox (`Action: delivered`).
    Delivered,
    /// Handed to a next hop that does not offer DSN, which will not tell
    /// (`Action: relayed`, RFC 3461 §6.2.1).
    Relayed,
    /// Forwarded by an alias to other addresses, whose own notices (not
    /// about success) follow (`Action: expanded`, RFC 3464 §2.3.3; how
    /// Postfix answers `NOTIFY=SUCCESS` for an alias).
    Expanded,
}

impl Kind {
    /// A notice of success of some kind (the original's headers only).
    pub fn is_success(self) -> bool {
        matches!(self, Kind::Delivered | Kind::Relayed | Kind::Expanded)
    }
}

/// One recipient the report is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// The recipient as the original envelope had it.
    pub address: String,
    /// Enhanced status code, e.g. `5.1.1`.
    pub status: String,
    /// The remote's reply or our reason, e.g. `550 5.1.1 <x@y>: user unknown`.
    pub diagnostic: String,
    /// The exchanger that gave the reply, if any.
    pub remote_mta: Option<String>,
    /// `ORCPT` as given (`Original-Recipient: rfc822;…`).
    pub original_recipient: Option<String>,
    /// This recipient's action when not the report's (a success notice
    /// for a local delivery sent with a bounce).
    pub action: Option<Kind>,
}

/// Everything a report needs to know about the original message.
#[derive(Debug, Clone)]
pub struct Report<'a> {
    /// Failure or delay.
    pub kind: Kind,
    /// Our host name (`Reporting-MTA`, `From: MAILER-DAEMON@…`).
    pub hostname: &'a str,
    /// Id of the original message.
    pub id: MessageId,
    /// Original envelope sender: the report goes there.
    pub sender: &'a str,
    /// RFC 5322 date of arrival and of now.
    pub arrival_date: &'a str,
    /// RFC 5322 date of the report.
    pub date: &'a str,
    /// The recipients the report is about.
    pub recipients: &'a [RecipientStatus],
    /// The original content (headers and body, CRLF).
    pub original: &'a [u8],
    /// `ENVID` of the original (`Original-Envelope-Id`).
    pub envid: Option<&'a str>,
    /// Return only the original's headers (`RET=HDRS`; success notices
    /// always do).
    pub headers_only: bool,
}

impl Report<'_> {
    /// Builds the whole report message, CRLF line ends, ready to spool.
    pub fn build(&self) -> Vec<u8> {
        let boundary = format!("{}.{}/{}", self.id, self.kind_tag(), self.hostname);
        let subject = match self.kind {
            Kind::Failure => "Undelivered Mail Returned to Sender",
            Kind::Delay => "Delayed Mail (still being retried)",
            Kind::Delivered | Kind::Relayed | Kind::Expanded => "Successful Mail Delivery Report",
        };
        let mut m = String::with_capacity(2048 + self.original.len().min(MAX_RETURNED_CONTENT));
        let _ = write!(
            m,
            "From: MAILER-DAEMON@{host} (Mail Delivery System)\r\n\
             To: <{sender}>\r\n\
             Subject: {subject}\r\n\
             Date: {date}\r\n\
             Message-ID: <{id}.{tag}@{host}>\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status;\r\n\
             \tboundary=\"{boundary}\"\r\n\
             \r\n\
             This is a MIME-encapsulated message.\r\n\
             \r\n\
             --{boundary}\r\n\
             Content-Description: Notification\r\n\
             Content-Type: text/plain; charset=utf-8\r\n\
             \r\n",
            host = self.hostname,
            sender = self.sender,
            date = self.date,
            id = self.id,
            tag = self.kind_tag(),
        );
        self.human_text(&mut m);
        let _ = write!(
            m,
            "\r\n--{boundary}\r\n\
             Content-Description: Delivery report\r\n\
             Content-Type: message/delivery-status\r\n\
             \r\n\
             Reporting-MTA: dns; {host}\r\n\
             X-Postino-Queue-ID: {id}\r\n",
            host = self.hostname,
            id = self.id,
        );
        if let Some(envid) = self.envid {
            let _ = write!(m, "Original-Envelope-Id: {envid}\r\n");
        }
        let _ = write!(m, "Arrival-Date: {}\r\n", self.arrival_date);
        for r in self.recipients {
            let action = match r.action.unwrap_or(self.kind) {
                Kind::Failure => "failed",
                Kind::Delay => "delayed",
                Kind::Delivered => "delivered",
                Kind::Relayed => "relayed",
                Kind::Expanded => "expanded",
            };
            m.push_str("\r\n");
            if let Some(orcpt) = &r.original_recipient {
                let _ = write!(m, "Original-Recipient: {orcpt}\r\n");
            }
            let _ = write!(
                m,
                "Final-Recipient: rfc822; {addr}\r\nAction: {action}\r\nStatus: {status}\r\n",
                addr = r.address,
                status = r.status,
            );
            if let Some(mta) = &r.remote_mta {
                let _ = write!(m, "Remote-MTA: dns; {mta}\r\n");
            }
            let _ = write!(m, "Diagnostic-Code: smtp; {}\r\n", one_line(&r.diagnostic));
        }
        let mut out = m.into_bytes();
        let (ctype, desc, part) = if self.original.len() <= MAX_RETURNED_CONTENT
            && !self.headers_only
            && !self.kind.is_success()
        {
            ("message/rfc822", "Undelivered Message", self.original)
        } else {
            (
                "text/rfc822-headers",
                "Undelivered Message Headers",
                headers_of(self.original),
            )
        };
        out.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\nContent-Description: {desc}\r\nContent-Type: {ctype}\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(part);
        if !part.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        out
    }

    fn kind_tag(&self) -> &'static str {
        match self.kind {
            Kind::Failure => "bounce",
            Kind::Delay => "delay",
            Kind::Delivered | Kind::Relayed | Kind::Expanded => "success",
        }
    }

    fn human_text(&self, m: &mut String) {
        let _ = write!(
            m,
            "This is the mail system at host {}.\r\n\r\n",
            self.hostname
        );
        match self.kind {
            Kind::Failure => m.push_str(
                "I'm sorry to have to inform you that your message could not\r\n\
                 be delivered to one or more recipients. It's attached below.\r\n\r\n\
                 For further assistance, please send mail to postmaster.\r\n\r\n",
            ),
            Kind::Delay => m.push_str(
                "####################################################################\r\n\
                 # THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n\
                 ####################################################################\r\n\r\n\
                 Your message could not be delivered yet. The mail system will keep\r\n\
                 trying to deliver it.\r\n\r\n",
            ),
            Kind::Delivered => m.push_str(
                "Your message was delivered to the mailbox of the recipients\r\n\
                 listed below, as you asked.\r\n\r\n",
            ),
            Kind::Relayed => m.push_str(
                "Your message was handed on to the recipients' mail system, which\r\n\
                 does not report delivery: you will hear of it again only if it\r\n\
                 fails there.\r\n\r\n",
            ),
            Kind::Expanded => m.push_str(
                "Your message reached the addresses listed below, which forward it\r\n\
                 to others: you will hear of it again only if it fails there.\r\n\r\n",
            ),
        }
        for r in self.recipients {
            let _ = write!(m, "<{}>: {}\r\n", r.address, one_line(&r.diagnostic));
        }
    }
}

/// Diagnostic text folded onto one line (remote replies may be multi-line).
fn one_line(s: &str) -> String {
    s.split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The header section of a message, through the blank line.
pub fn headers_of(content: &[u8]) -> &[u8] {
    memchr::memmem::find(content, b"\r\n\r\n")
        .map(|i| &content[..i + 2])
        .unwrap_or(content)
}

/// An RFC 5322 date for Unix time `secs` (UTC).
pub fn rfc5322_date(secs: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc2822)
                .ok()
        })
        .unwrap_or_else(|| "Thu, 01 Jan 1970 00:00:00 +0000".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: Kind, original: &[u8]) -> Vec<u8> {
        Report {
            kind,
            hostname: "mx.example.test",
            id: MessageId(0xABC),
            sender: "alice@example.test",
            arrival_date: &rfc5322_date(0),
            date: &rfc5322_date(86_400),
            recipients: &[
                RecipientStatus {
                    address: "bob@remote.test".into(),
                    status: "5.1.1".into(),
                    diagnostic: "550 5.1.1 <bob@remote.test>: User unknown".into(),
                    remote_mta: Some("mx1.remote.test".into()),
                    original_recipient: Some("rfc822;Bob@remote.test".into()),
                    action: None,
                },
                RecipientStatus {
                    address: "carol@remote.test".into(),
                    status: "5.0.0".into(),
                    diagnostic: "554 no\r\nreally".into(),
                    remote_mta: None,
                    original_recipient: None,
                    action: None,
                },
            ],
            original,
            envid: (kind == Kind::Failure).then_some("QQ314159"),
            headers_only: false,
        }
        .build()
    }

    #[test]
    fn failure_report_is_rfc3464() {
        let original = b"Subject: hi\r\nFrom: alice@example.test\r\n\r\nbody\r\n";
        let text = String::from_utf8(report(Kind::Failure, original)).unwrap();
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("Content-Type: message/delivery-status\r\n"));
        assert!(text.contains("Original-Envelope-Id: QQ314159\r\nArrival-Date: "));
        assert!(text.contains("\r\n\r\nOriginal-Recipient: rfc822;Bob@remote.test\r\nFinal-Recipient: rfc822; bob@remote.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx1.remote.test\r\n"));
        assert!(text.contains("Diagnostic-Code: smtp; 554 no really\r\n"));
        assert!(text.contains("Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n"));
        assert!(text.contains("Date: Fri, 02 Jan 1970 00:00:00 +0000\r\n"));
        assert!(text.ends_with("--0000000ABC.bounce/mx.example.test--\r\n"));
        assert!(!text.replace("\r\n", "").contains('\n'), "no bare LF");
    }

    #[test]
    fn large_original_returns_headers_only() {
        let mut original = b"Subject: big\r\n\r\n".to_vec();
        original.extend(std::iter::repeat_n(b'x', MAX_RETURNED_CONTENT));
        let text = String::from_utf8(report(Kind::Delay, &original)).unwrap();
        assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: big\r\n\r\n--"));
        assert!(text.contains("Action: delayed"));
        assert!(!text.contains("xxxx"));
    }

    #[test]
    fn success_reports_return_headers_only() {
        let original = b"Subject: hi\r\n\r\nsecret body\r\n";
        for (kind, action) in [
            (Kind::Delivered, "delivered"),
            (Kind::Relayed, "relayed"),
            (Kind::Expanded, "expanded"),
        ] {
            let text = String::from_utf8(report(kind, original)).unwrap();
            assert!(text.contains(&format!("Action: {action}\r\n")), "{text}");
            assert!(text.contains("Subject: Successful Mail Delivery Report"));
            assert!(text.contains("Content-Type: text/rfc822-headers\r\n\r\nSubject: hi\r\n"));
            assert!(!text.contains("secret body"));
            assert!(!text.contains("Original-Envelope-Id"));
        }
    }
}
