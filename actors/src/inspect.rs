//! Read-only admin questions, answered over the control socket and by the
//! offline CLI alike: `postino route explain` (where would mail to this
//! address go, and why), `postino mailbox stats` and `postino auth test`.
//!
//! The route explanation is [`postino_core::routing::explain`], the same
//! code the router decides with, and remote destinations are resolved with
//! the delivery's own [`MxResolver`].

use postino_core::address::Address;
use postino_core::logsafe::{escape, Secret};
use postino_core::routing::{self, Route, Target};
use postino_core::storage::Storage;
use postino_core::Config;
use tracing::info;

use crate::delivery::mx::{Exchanger, MxResolver};
use crate::wire::{Request, Response};

/// Whether `request` is one of the questions answered here.
pub fn handles(request: &Request) -> bool {
    matches!(
        request,
        Request::RouteExplain { .. } | Request::MailboxStats { .. } | Request::AuthTest { .. }
    )
}

/// Answers one of the requests [`handles`] accepts, on any storage
/// backend. Lookups in the store are short; a password check (argon2)
/// runs on a blocking thread.
pub async fn answer(store: &dyn Storage, config: &Config, request: Request) -> Response {
    match request {
        Request::RouteExplain {
            address,
            from,
            client,
            auth,
        } => explain_route(store, config, &address, from, client, auth).await,
        Request::MailboxStats { address } => mailbox_stats(store, address).await,
        Request::AuthTest { address, password } => auth_test(store, &address, password).await,
        _ => Response::Error("not an inspection request".into()),
    }
}

/// `postino route explain`: the steps of the routing decision, the
/// decision, and for remote targets the smarthost or the exchangers as
/// resolved now. A rejected recipient is an error (exit status 1), as
/// `exim -bt` fails for an undeliverable address.
async fn explain_route(
    store: &dyn Storage,
    config: &Config,
    address: &str,
    from: Option<String>,
    client: Option<String>,
    auth: Option<String>,
) -> Response {
    let rcpt = match Address::parse(address, true) {
        Ok(a) if !a.domain.is_empty() => a,
        Ok(_) => return Response::Error(format!("invalid address {address}: no domain")),
        Err(e) => return Response::Error(format!("invalid address {address}: {e}")),
    };
    let mut lines = vec![format!("recipient: <{rcpt}>")];
    if let Some(from) = &from {
        lines.push(format!("sender: <{from}>"));
    }
    let relay = match relay_reason(config, client.as_deref(), auth.as_deref()) {
        Ok(r) => r,
        Err(e) => return Response::Error(e),
    };
    lines.push(format!(
        "client: {}",
        match (&client, &auth) {
            (Some(ip), Some(user)) => format!("{ip}, authenticated as {user}"),
            (Some(ip), None) => ip.clone(),
            (None, Some(user)) => format!("authenticated as {user}"),
            (None, None) => "not given (an unauthenticated client outside routing.relay_networks; --client, --auth)".into(),
        }
    ));
    let explained = routing::explain_async(&config.routing, store, &rcpt, relay.as_deref()).await;
    let (route, steps) = match explained {
        Ok(r) => r,
        Err(e) => return Response::Error(format!("{e} (at RCPT: 451 4.3.0)")),
    };
    lines.extend(steps.into_iter().map(|s| format!("  {s}")));
    match route {
        Route::Reject(reply) => {
            lines.push(format!("decision: refused at RCPT: {reply}"));
            Response::Error(lines.join("\n"))
        }
        Route::Bounce { status, reason } => {
            lines.push(format!(
                "decision: accepted, then bounced to {}: {status} {reason}",
                from.as_deref()
                    .map_or("the sender".to_owned(), |f| format!("<{f}>"))
            ));
            Response::Ok(lines)
        }
        Route::Deliver(targets) => {
            lines.push("decision: accepted; delivered to".into());
            let resolver = MxResolver::new(&config.dns);
            for t in targets {
                match t {
                    Target::Mailbox { mailbox, original } => lines.push(match original {
                        Some(o) => format!("  local mailbox {mailbox} (X-Original-To: {o})"),
                        None => format!("  local mailbox {mailbox}"),
                    }),
                    Target::Remote { address } => {
                        lines.push(format!("  remote {address}"));
                        let resolver = match &resolver {
                            Ok(r) => r,
                            Err(e) => {
                                lines.push(format!("    {e}"));
                                continue;
                            }
                        };
                        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                        let found = match &config.routing.smarthost {
                            Some(host) => {
                                lines.push(format!("    via routing.smarthost {host}"));
                                resolver.resolve_smarthost(host).await
                            }
                            None => {
                                lines.push(format!(
                                    "    exchangers of {domain} now, in the order tried:"
                                ));
                                resolver.resolve(domain, config.delivery.mx_port).await
                            }
                        };
                        match found {
                            Ok(exchangers) => lines.extend(exchangers.iter().map(exchanger_line)),
                            Err(e) => lines.push(format!(
                                "    none: {e} ({} {})",
                                if e.is_permanent() {
                                    "would bounce with"
                                } else {
                                    "would be retried,"
                                },
                                e.status()
                            )),
                        }
                    }
                }
            }
            Response::Ok(lines)
        }
    }
}

fn exchanger_line(e: &Exchanger) -> String {
    let addrs: Vec<String> = e.addrs.iter().map(ToString::to_string).collect();
    format!("    {:>5} {} [{}]", e.preference, e.host, addrs.join(", "))
}

/// Why the client described may relay, as the SMTP session would decide
/// (`Config::may_relay`, or authenticated); `None` when it may not.
fn relay_reason(
    config: &Config,
    client: Option<&str>,
    auth: Option<&str>,
) -> Result<Option<String>, String> {
    if let Some(user) = auth {
        return Ok(Some(format!("authenticated as {user}")));
    }
    let Some(client) = client else {
        return Ok(None);
    };
    let ip: std::net::IpAddr = client
        .parse()
        .map_err(|_| format!("--client {client}: not an IP address"))?;
    if !config.may_relay(ip) {
        return Ok(None);
    }
    let mapped = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map(std::net::IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    };
    let net = config
        .routing
        .relay_networks
        .iter()
        .find(|n| n.contains(&mapped))
        .map(ToString::to_string)
        .unwrap_or_default();
    Ok(Some(format!(
        "client {client} is in routing.relay_networks ({net})"
    )))
}

/// `postino mailbox stats [ADDR]`: messages, octets and quota of one
/// mailbox, or of every user's; usage as the store keeps it (no scan).
async fn mailbox_stats(store: &dyn Storage, address: Option<String>) -> Response {
    let users = match address {
        Some(a) => match store.is_user(&a).await {
            Ok(true) => vec![a.to_ascii_lowercase()],
            Ok(false) => return Response::Error(format!("no such user: {a}")),
            Err(e) => return Response::Error(e.to_string()),
        },
        None => match store.users().await {
            Ok(u) => u,
            Err(e) => return Response::Error(e.to_string()),
        },
    };
    let mut lines = vec![format!(
        "{:<40} {:>10} {:>14} {:>14} {:>6}",
        "MAILBOX", "MESSAGES", "OCTETS", "QUOTA", "USED"
    )];
    for user in users {
        let stats = match store.usage(&user).await {
            Ok(u) => store.quota(&user).await.map(|q| (u, q)),
            Err(e) => Err(e),
        };
        match stats {
            Ok((usage, quota)) => {
                let (limit, used) = match quota {
                    Some(q) if q > 0 => (
                        q.to_string(),
                        format!("{}%", u128::from(usage.octets) * 100 / u128::from(q)),
                    ),
                    Some(q) => (q.to_string(), "-".into()),
                    None => ("unlimited".into(), "-".into()),
                };
                lines.push(format!(
                    "{user:<40} {:>10} {:>14} {limit:>14} {used:>6}",
                    usage.messages, usage.octets
                ));
            }
            Err(e) => return Response::Error(format!("{user}: {e}")),
        }
    }
    Response::Ok(lines)
}

/// `postino auth test ADDR` (as `doveadm auth test`): whether the password
/// is right. Logged without the password.
async fn auth_test(store: &dyn Storage, address: &str, password: Secret) -> Response {
    let hash = match store.password_hash(address).await {
        Ok(h) => h,
        Err(e) => return Response::Error(format!("auth test for {address}: {e}")),
    };
    // argon2: CPU work, off the async threads.
    let user = address.to_owned();
    let checked = tokio::task::spawn_blocking(move || {
        postino_core::store::verify_password_hash(
            &user,
            hash.as_deref(),
            password.expose(),
            None,
            &mut postino_core::store::PasswordScratch::new(),
        )
    })
    .await;
    match checked.map_err(|e| e.to_string()) {
        Ok(true) => {
            info!(user = %escape(address), result = "ok", "auth test");
            Response::Ok(vec![format!("auth succeeded for {address}")])
        }
        Ok(false) => {
            info!(user = %escape(address), result = "failed", "auth test");
            Response::Error(format!("auth failed for {address}"))
        }
        Err(e) => Response::Error(format!("auth test for {address}: {e}")),
    }
}
