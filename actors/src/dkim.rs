//! DKIM signing (RFC 6376) of mail that leaves the machine, with Stalwart's
//! `mail-auth` (canonicalization, hashing and signing are its own; nothing
//! here touches them).
//!
//! Which mail is signed: a message with at least one remote recipient whose
//! sender is one of ours — the client authenticated, or the envelope
//! sender's domain is a local domain and the client is in
//! `routing.relay_networks` (a forged local sender from elsewhere, sent on
//! by an alias, is not signed). The signing domain is the `From:` header's
//! domain when it has a key in `[dkim."DOMAIN"]` (what DMARC aligns with),
//! else the envelope sender's. Intake signs once, before the message is
//! written ([`crate::intake::Intake::sign`]), so every copy and every retry
//! carries the same signature; when the same message also goes to local
//! mailboxes, their copy is that signed content too (it is written once).
//! Local-only mail is not signed: it never leaves.
//!
//! postino's own notices — bounces, delay warnings, `delivered` and
//! `relayed` success notices, from `MAILER-DAEMON@` the hostname with
//! sender `<>` — are signed when they go to a remote recipient, with the
//! key of their `From:` domain (so a receiver checking DMARC for it finds
//! an aligned signature; no key for it: unsigned, as before). Every notice
//! is made by `bounce::notification`, at dispatch or in the
//! delivery actor's settlement, which signs it once, before it is written
//! (on either store), so every retry carries the same signature. A notice
//! to a local mailbox is not signed. The delivery actor holds the same
//! [`DkimKeys`] as intake: a reload's keys sign its next notice.
//!
//! Keys are read at start and at every reload ([`DkimKeys`]); a key that
//! cannot be read is a configuration error naming `dkim."DOMAIN".key`. A
//! message that fails to sign is logged and sent unsigned: signing never
//! loses mail.
//!
//! [`generate`] makes a key pair for `postino dkim generate`.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::generate::DkimKeyPair;
use mail_auth::dkim::{Canonicalization, DkimSigner};
use postino_core::config::{Config, ConfigError};
use postino_core::routing::{Route, Target};
use postino_core::Envelope;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;
use tracing::{info, warn};

/// Header fields signed when present (RFC 6376 §5.4.1's list, plus the
/// MIME ones). `From` is always signed, and signed once more than it
/// occurs, so that no second `From:` can be added (§8.15).
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Reply-To",
    "Subject",
    "Date",
    "To",
    "Cc",
    "Resent-Date",
    "Resent-From",
    "Resent-To",
    "Resent-Cc",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
    "Message-ID",
    "Sender",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
];

/// The signing keys in use, shared by every intake and swapped whole by a
/// reload. Cloning shares them.
#[derive(Clone, Default)]
pub struct DkimKeys(Arc<RwLock<Arc<Signers>>>);

impl DkimKeys {
    /// Reads every key that `config` names.
    ///
    /// # Errors
    /// A key file that cannot be read or is not an RSA or Ed25519 private
    /// key, as a [`ConfigError`] naming `file` (the configuration file),
    /// the line and `dkim."DOMAIN".key`.
    pub fn load(config: &Config, file: Option<&Path>) -> Result<DkimKeys, ConfigError> {
        Ok(DkimKeys(Arc::new(RwLock::new(Arc::new(Signers::load(
            config, file,
        )?)))))
    }

    /// Puts the keys of `other` in place for every later message.
    pub(crate) fn replace(&self, other: DkimKeys) {
        let new = other.current();
        match self.0.write() {
            Ok(mut k) => *k = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// The keys in use now.
    pub(crate) fn current(&self) -> Arc<Signers> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// One domain's key.
struct DomainKey {
    selector: String,
    key: Arc<DkimKey>,
}

/// The keys by (lower-case) domain.
#[derive(Default)]
pub(crate) struct Signers {
    by_domain: HashMap<String, DomainKey>,
}

impl Signers {
    fn load(config: &Config, file: Option<&Path>) -> Result<Signers, ConfigError> {
        let mut by_domain = HashMap::new();
        for (domain, dkim) in &config.dkim {
            let key = read_key(&dkim.key).map_err(|message| {
                ConfigError::at_key(file, &format!("dkim.\"{domain}\".key"), message)
            })?;
            by_domain.insert(
                domain.to_ascii_lowercase(),
                DomainKey {
                    selector: dkim.selector.clone(),
                    key: Arc::new(key),
                },
            );
        }
        Ok(Signers { by_domain })
    }

    /// Whether any domain has a key.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// Signs `content` if it should be (see the module docs):
    /// `Ok(None)` when not, else the `DKIM-Signature:` field to put in
    /// front of it and what to log about it.
    ///
    /// # Errors
    /// Signing failed; the caller sends the message unsigned.
    pub(crate) fn sign(
        &self,
        config: &Config,
        envelope: &Envelope,
        authenticated: bool,
        content: &[u8],
    ) -> Result<Option<Signed>, mail_auth::Error> {
        if !wants_signature(config, envelope, authenticated) {
            return Ok(None);
        }
        self.sign_by_domain(envelope, content)
    }

    /// Signs a notice postino made ([`crate::bounce::notification`]) if
    /// it leaves the machine: `Ok(None)` when it goes to a local mailbox
    /// or its `From:` domain has no key. Its sender is `<>`, so only the
    /// `From:` domain (`MAILER-DAEMON@` the hostname) can sign.
    ///
    /// # Errors
    /// Signing failed; the caller sends the notice unsigned.
    pub(crate) fn sign_notice(
        &self,
        notice: &Envelope,
        content: &[u8],
    ) -> Result<Option<Signed>, mail_auth::Error> {
        if !leaves(notice) {
            return Ok(None);
        }
        self.sign_by_domain(notice, content)
    }

    /// Signs `content` with the key of its `From:` domain, else of the
    /// envelope sender's: the choice of whether to sign is made.
    fn sign_by_domain(
        &self,
        envelope: &Envelope,
        content: &[u8],
    ) -> Result<Option<Signed>, mail_auth::Error> {
        let sender_domain = envelope
            .sender
            .as_deref()
            .and_then(|s| s.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        let Some(headers) = mail_parser::MessageParser::new().parse_headers(content) else {
            return Ok(None);
        };
        let from_domain = headers
            .from()
            .and_then(|f| f.first())
            .and_then(|a| a.address())
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        let Some((domain, key)) = [from_domain, sender_domain]
            .into_iter()
            .flatten()
            .find_map(|d| self.by_domain.get_key_value(&d))
        else {
            return Ok(None);
        };
        let mut names: Vec<&str> = SIGNED_HEADERS
            .iter()
            .copied()
            .filter(|name| {
                headers
                    .headers()
                    .iter()
                    .any(|h| h.name().eq_ignore_ascii_case(name))
            })
            .collect();
        if !names.contains(&"From") {
            // RFC 6376 §5.4: From is required; a message without one is
            // not ours to vouch for.
            return Ok(None);
        }
        names.push("From");
        let signature = DkimSigner::from_key(SharedKey(key.key.clone()))
            .domain(domain.as_str())
            .selector(key.selector.as_str())
            .headers(names)
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
            .sign(content)?;
        Ok(Some(Signed {
            header: signature.to_header(),
            domain: domain.clone(),
            selector: key.selector.clone(),
            algorithm: algorithm(&key.key),
        }))
    }
}

impl DkimKeys {
    /// Runs `sign` (a decision and a signature, [`Signers::sign`] or
    /// [`Signers::sign_notice`]) with the current keys on a blocking thread
    /// (an RSA signature and the body hash are milliseconds) and puts the
    /// `DKIM-Signature:` field on top of `content`; `envelope.size`
    /// follows. `wanted` is the cheap part of the decision, made here so
    /// that mail that is not signed (most of it) costs no copy and no hop
    /// to another thread. A failure is logged and `content` comes back
    /// unsigned: signing never loses mail.
    pub(crate) async fn sign_with<F>(
        &self,
        envelope: &mut Envelope,
        content: Vec<u8>,
        wanted: bool,
        sign: F,
    ) -> Vec<u8>
    where
        F: FnOnce(&Signers, &Envelope, &[u8]) -> Result<Option<Signed>, mail_auth::Error>
            + Send
            + 'static,
    {
        let keys = self.current();
        if keys.is_empty() || !wanted {
            return content;
        }
        let id = envelope.id;
        let job_envelope = envelope.clone();
        // Shared with the signing thread, so that even a panic there leaves
        // the content here.
        let content = Arc::new(content);
        let job_content = content.clone();
        let signed =
            tokio::task::spawn_blocking(move || sign(&keys, &job_envelope, &job_content)).await;
        let content = Arc::try_unwrap(content).unwrap_or_else(|c| (*c).clone());
        let failed = |error: &dyn std::fmt::Display| {
            warn!(%id, error = %error, "dkim signing failed; sending unsigned");
        };
        match signed {
            Ok(Ok(Some(signed))) => {
                info!(
                    %id,
                    domain = %signed.domain,
                    selector = %signed.selector,
                    algorithm = signed.algorithm,
                    "dkim signed"
                );
                let mut out = Vec::with_capacity(signed.header.len() + content.len());
                out.extend_from_slice(signed.header.as_bytes());
                out.extend_from_slice(&content);
                envelope.size = out.len() as u64;
                out
            }
            Ok(Ok(None)) => content,
            Ok(Err(e)) => {
                failed(&e);
                content
            }
            Err(e) => {
                failed(&e);
                content
            }
        }
    }
}

/// A signature made for a message.
pub(crate) struct Signed {
    /// The `DKIM-Signature:` field, folded, ending in CRLF.
    pub header: String,
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// `a=`.
    pub algorithm: &'static str,
}

/// Whether `envelope` is mail of ours that leaves the machine, the mail
/// that is signed: from an authenticated user, or from a local-domain
/// sender through a client allowed to relay (anyone may claim a local
/// sender, and alias forwarding would then sign a forgery with our key).
/// Cheap: no content is read.
pub(crate) fn wants_signature(config: &Config, envelope: &Envelope, authenticated: bool) -> bool {
    let sender_domain = envelope
        .sender
        .as_deref()
        .and_then(|s| s.rsplit_once('@'))
        .map(|(_, d)| d.to_ascii_lowercase());
    let ours = authenticated
        || (sender_domain
            .as_deref()
            .is_some_and(|d| config.is_local_domain(d))
            && envelope.client.parse().is_ok_and(|ip| config.may_relay(ip)));
    ours && leaves(envelope)
}

/// Whether `envelope` has a recipient that is not a local mailbox.
pub(crate) fn leaves(envelope: &Envelope) -> bool {
    envelope.recipients.iter().any(|r| match &r.route {
        Route::Deliver(targets) => targets.iter().any(|t| matches!(t, Target::Remote { .. })),
        _ => false,
    })
}

fn algorithm(key: &DkimKey) -> &'static str {
    match key {
        DkimKey::Rsa(_) => "rsa-sha256",
        DkimKey::Ed25519(_) => "ed25519-sha256",
    }
}

/// A key shared by the signers of many messages (`DkimSigner` owns its
/// key, and one is made per message for its list of headers).
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> mail_auth::common::crypto::Algorithm {
        self.0.algorithm()
    }
}

/// Reads a PEM private key: PKCS#1 is RSA; PKCS#8 is Ed25519 or RSA.
fn read_key(path: &Path) -> Result<DkimKey, String> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| format!("{shown}: {e}"))?;
    let der = PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{shown}: not a PEM private key ({e})"))?;
    let rsa = |der| {
        RsaKey::<Sha256>::from_key_der(der)
            .map(DkimKey::Rsa)
            .map_err(|e| format!("{shown}: not a usable RSA key, 2048 bits or more ({e})"))
    };
    match der {
        PrivateKeyDer::Pkcs1(_) => rsa(der),
        PrivateKeyDer::Pkcs8(ref pkcs8) => {
            match Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der()) {
                Ok(key) => Ok(DkimKey::Ed25519(key)),
                Err(_) => rsa(der),
            }
        }
        _ => Err(format!(
            "{shown}: an EC key; DKIM signs with RSA or Ed25519 (RFC 8463)"
        )),
    }
}

/// The algorithms `postino dkim generate` makes keys for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// RSA, 2048 bits (RFC 8301).
    Rsa,
    /// Ed25519 (RFC 8463).
    Ed25519,
}

/// A new key pair, ready to be written and published.
pub struct Generated {
    /// The private key, PKCS#8 PEM.
    pub private_pem: String,
    /// The DNS TXT record's text (`v=DKIM1; k=...; p=...`), whole.
    pub record: String,
}

impl Generated {
    /// The record as a zone file line for `SELECTOR._domainkey.DOMAIN`,
    /// in quoted strings of at most 255 octets (RFC 1035 §3.3.14).
    pub fn zone_line(&self, selector: &str, domain: &str) -> String {
        let strings: Vec<String> = self
            .record
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!(
            "{selector}._domainkey.{domain}. IN TXT ( {} )",
            strings.join(" ")
        )
    }
}

/// Errors making a key pair.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// mail-auth could not make the key.
    #[error("key generation: {0}")]
    Generate(#[from] mail_auth::Error),
    /// The key could not be encoded.
    #[error("key encoding: {0}")]
    Encode(String),
}

/// Makes a key pair with mail-auth's generator: RSA-2048 or Ed25519.
/// The TXT record publishes RSA keys as SubjectPublicKeyInfo (what
/// `openssl rsa -pubout` writes and every verifier reads) and Ed25519 keys
/// as their 32 raw octets (RFC 8463 §4).
///
/// # Errors
/// [`GenerateError`] if the key cannot be made or encoded.
pub fn generate(algorithm: Algorithm) -> Result<Generated, GenerateError> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};

    let encode = |e: &dyn std::fmt::Display| GenerateError::Encode(e.to_string());
    let (pkcs8, record) = match algorithm {
        Algorithm::Rsa => {
            let pair = DkimKeyPair::generate_rsa(2048)?;
            let key =
                rsa::RsaPrivateKey::from_pkcs1_der(pair.private_key()).map_err(|e| encode(&e))?;
            let spki = rsa::RsaPublicKey::from(&key)
                .to_public_key_der()
                .map_err(|e| encode(&e))?;
            let pkcs8 = key.to_pkcs8_der().map_err(|e| encode(&e))?;
            (
                pkcs8.as_bytes().to_vec(),
                format!("v=DKIM1; k=rsa; p={}", base64(spki.as_bytes())),
            )
        }
        Algorithm::Ed25519 => {
            let pair = DkimKeyPair::generate_ed25519()?;
            let record = format!("v=DKIM1; k=ed25519; p={}", pair.encoded_public_key());
            (pair.private_key().to_vec(), record)
        }
    };
    let private_pem =
        pem_rfc7468::encode_string("PRIVATE KEY", pem_rfc7468::LineEnding::LF, &pkcs8)
            .map_err(|e| encode(&e))?;
    Ok(Generated {
        private_pem,
        record,
    })
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_back_as_their_algorithm() {
        let dir = tempfile::tempdir().unwrap();
        for (algorithm, name, k) in [
            (Algorithm::Ed25519, "ed25519-sha256", "k=ed25519; p="),
            (Algorithm::Rsa, "rsa-sha256", "k=rsa; p="),
        ] {
            let generated = generate(algorithm).unwrap();
            assert!(generated.record.contains(k), "{}", generated.record);
            let path = dir.path().join("key.pem");
            std::fs::write(&path, &generated.private_pem).unwrap();
            let key = read_key(&path).unwrap();
            assert_eq!(super::algorithm(&key), name);
        }
    }

    #[test]
    fn long_records_are_split_into_255_octet_strings() {
        let generated = generate(Algorithm::Rsa).unwrap();
        assert!(generated.record.len() > 255);
        let line = generated.zone_line("s1", "example.test");
        assert!(line.starts_with("s1._domainkey.example.test. IN TXT ( \""));
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(strings.len() >= 2, "{line}");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), generated.record);
    }

    /// Keys for example.test (Ed25519: quick to make) and the config.
    fn signers(dir: &Path) -> (Config, Signers) {
        let key = dir.join("ed.pem");
        std::fs::write(&key, generate(Algorithm::Ed25519).unwrap().private_pem).unwrap();
        let text = format!(
            "[routing]\nlocal_domains = [\"example.test\", \"other.test\"]\n\
             relay_networks = [\"127.0.0.0/8\"]\n\
             [dkim.\"Example.Test\"]\nselector = \"ed\"\nkey = \"{}\"\n",
            key.display()
        );
        let config = Config::parse(&text, Path::new("t.toml")).unwrap();
        let signers = Signers::load(&config, None).unwrap();
        (config, signers)
    }

    fn envelope(sender: &str, client: &str, remote: bool) -> Envelope {
        let route = if remote {
            Route::Deliver(vec![Target::Remote {
                address: "bob@dest.test".into(),
            }])
        } else {
            Route::mailbox("carol@example.test")
        };
        Envelope {
            id: postino_core::MessageId(1),
            sender: Some(sender.into()),
            recipients: vec![postino_core::message::RoutedRecipient {
                address: "bob@dest.test".into(),
                route,
            }],
            received_at: 0,
            client: client.into(),
            helo: "client.test".into(),
            size: 0,
            params: None,
        }
    }

    #[test]
    fn only_our_mail_that_leaves_is_signed_with_the_from_domain_first() {
        let dir = tempfile::tempdir().unwrap();
        let (config, signers) = signers(dir.path());
        let mail =
            b"From: <alice@example.test>\r\nTo: <bob@dest.test>\r\nSubject: hi\r\n\r\nbody\r\n";
        let sign = |sender: &str, client: &str, auth: bool, remote: bool, content: &[u8]| {
            signers
                .sign(&config, &envelope(sender, client, remote), auth, content)
                .unwrap()
                .map(|s| (s.domain, s.header))
        };
        // A local sender through a relay network, or any logged-in user.
        let (domain, header) = sign("alice@example.test", "127.0.0.1", false, true, mail).unwrap();
        assert_eq!(domain, "example.test");
        assert!(
            header.starts_with("DKIM-Signature: v=1; a=ed25519-sha256;"),
            "{header}"
        );
        assert!(header.contains("h=Subject:To:From:From;"), "{header}");
        assert!(sign("x@elsewhere.test", "192.0.2.1", true, true, mail).is_some());
        // A local sender from anywhere else, not logged in: a forgery as
        // far as we know.
        assert!(sign("alice@example.test", "192.0.2.1", false, true, mail).is_none());
        // Mail that stays here.
        assert!(sign("alice@example.test", "127.0.0.1", false, false, mail).is_none());
        // From: a domain without a key: the envelope sender's key signs.
        let other = b"From: <alice@other.test>\r\nSubject: hi\r\n\r\nbody\r\n";
        let (domain, _) = sign("alice@example.test", "127.0.0.1", false, true, other).unwrap();
        assert_eq!(domain, "example.test");
        assert!(sign("alice@other.test", "127.0.0.1", false, true, other).is_none());
        // No From: nothing to vouch for.
        assert!(sign(
            "alice@example.test",
            "127.0.0.1",
            false,
            true,
            b"Subject: x\r\n\r\nb\r\n"
        )
        .is_none());
    }

    #[test]
    fn notices_that_leave_are_signed_by_their_from_domain_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_, signers) = signers(dir.path());
        let notice = |remote: bool| Envelope {
            sender: None,
            client: "local".into(),
            ..envelope("x@dest.test", "127.0.0.1", remote)
        };
        let ours = b"From: MAILER-DAEMON@Example.test (Mail Delivery System)\r\n\
            To: <bob@dest.test>\r\nSubject: Undelivered\r\n\r\nbody\r\n";
        let signed = signers.sign_notice(&notice(true), ours).unwrap().unwrap();
        assert_eq!(signed.domain, "example.test");
        assert!(
            signed.header.contains("h=Subject:To:From:From;"),
            "{}",
            signed.header
        );
        // To a local mailbox: it never leaves.
        assert!(signers.sign_notice(&notice(false), ours).unwrap().is_none());
        // A From: domain without a key: unsigned, whatever else matches.
        let theirs = b"From: MAILER-DAEMON@mx.other.test\r\nSubject: x\r\n\r\nb\r\n";
        assert!(signers
            .sign_notice(&notice(true), theirs)
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_file_that_is_not_a_key_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pem");
        std::fs::write(&path, "not a key\n").unwrap();
        let err = read_key(&path).err().unwrap();
        assert!(err.contains("bad.pem") && err.contains("PEM"), "{err}");
        let missing = read_key(&dir.path().join("missing.pem")).err().unwrap();
        assert!(missing.contains("missing.pem"), "{missing}");
    }
}
