//! Embedding postino with a routing actor of your own: plus-addresses
//! (`user+tag@example.test`) are delivered to `user@example.test`, mail for
//! one domain is refused with a 5xx of our wording, and every other
//! recipient is left to the default router.
//!
//! ```text
//! cargo run --example custom_router -- postino.toml   # a config file
//! cargo run --example custom_router                   # a config built in code
//! ```
//!
//! Once every listener is bound it prints one line,
//! `listening smtp=ADDR[,ADDR…] pop3=ADDR[,ADDR…] control=PATH`, and runs
//! until SIGINT or SIGTERM. The library server serves the control socket
//! too, so `postino user add alice@example.test --config postino.toml`
//! works against it as against `postino serve`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use actix::prelude::*;
use postino::{RouteRecipient, Server};
use postino_core::smtp::Reply;
use postino_core::{Config, DirectoryError, Route, Target};

/// Mail for this domain is refused, whatever the local part.
const BLOCKED_DOMAIN: &str = "blocked.test";

/// Decides routes for `RCPT TO`. Holds the default router to delegate to:
/// the server builder hands it over (see [`postino::ServerBuilder::router`]).
struct PlusRouter {
    default: Recipient<RouteRecipient>,
    local_domains: Vec<String>,
}

impl Actor for PlusRouter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Every SMTP session asks here and awaits the answer, so a large
        // mailbox is back-pressure, not unbounded buffering (as the default
        // router does).
        ctx.set_mailbox_capacity(4096);
    }
}

impl PlusRouter {
    fn is_local(&self, domain: &str) -> bool {
        self.local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }
}

impl Handler<RouteRecipient> for PlusRouter {
    type Result = ResponseFuture<Result<Route, DirectoryError>>;

    fn handle(&mut self, msg: RouteRecipient, _: &mut Self::Context) -> Self::Result {
        let RouteRecipient(mut query) = msg;
        if query.recipient.domain.eq_ignore_ascii_case(BLOCKED_DOMAIN) {
            let reply = Reply::new(
                550,
                "5.7.1",
                format!(
                    "<{}>: this server does not accept mail for {BLOCKED_DOMAIN}",
                    query.recipient
                ),
            );
            return Box::pin(async move { Ok(Route::Reject(reply)) });
        }

        // Only our own domains: `bob+x@remote.test` is someone else's
        // address and is relayed unchanged.
        let mut original = None;
        if self.is_local(&query.recipient.domain) {
            if let Some((user, _tag)) = query.recipient.local_part.split_once('+') {
                if !user.is_empty() {
                    original = Some(query.recipient.canonical());
                    query.recipient.local_part = user.to_owned();
                }
            }
        }

        let default = self.default.clone();
        Box::pin(async move {
            let route = match default.send(RouteRecipient(query)).await {
                // A failed lookup passes through: the client is told to
                // try again later (451), never that the user is unknown.
                Ok(route) => route?,
                // The default router is gone (shutting down): a temporary
                // failure, so the client tries again later.
                Err(_) => {
                    return Ok(Route::Reject(Reply::new(
                        451,
                        "4.3.0",
                        "Routing is unavailable, try again later",
                    )))
                }
            };
            Ok(match (route, original) {
                // Record the address as given in `X-Original-To:`, as
                // Postfix's local delivery does.
                (Route::Deliver(targets), Some(original)) => Route::Deliver(
                    targets
                        .into_iter()
                        .map(|t| match t {
                            Target::Mailbox {
                                mailbox,
                                original: None,
                            } => Target::Mailbox {
                                mailbox,
                                original: Some(original.clone()),
                            },
                            other => other,
                        })
                        .collect(),
                ),
                (route, _) => route,
            })
        })
    }
}

/// A configuration made in code: loopback listeners on ports the system
/// picks, data in `./custom-router-data`, local domain `example.test`.
fn built_in_config() -> Config {
    let any_port: SocketAddr = ([127, 0, 0, 1], 0).into();
    let mut config = Config {
        hostname: "mx.example.test".into(),
        data_dir: "custom-router-data".into(),
        ..Config::default()
    };
    config.smtp.listen = vec![any_port];
    config.pop3.listen = vec![any_port];
    config.routing.local_domains = vec!["example.test".into()];
    config
}

fn joined(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

async fn run(config: Config) -> Result<(), postino::ServerError> {
    let local_domains = config.routing.local_domains.clone();
    // `postino serve`'s signal handling: SIGTERM/SIGINT stop gracefully,
    // SIGHUP reloads TLS. Installed before the server starts.
    let signals = postino::Signals::install();
    let server = Server::builder(config)
        .router(move |default| {
            PlusRouter {
                default,
                local_domains: local_domains.clone(),
            }
            .start()
            .recipient()
        })
        .start()
        .await?;
    // One line on stdout, for people and for scripts (the tests parse it).
    println!(
        "listening smtp={} pop3={} control={}",
        joined(server.smtp_addrs()),
        joined(server.pop3_addrs()),
        server.config().control_socket().display()
    );
    server.run_until_signal(signals).await;
    Ok(())
}

fn main() -> ExitCode {
    postino::init_logging(Default::default());
    let config = match std::env::args_os().nth(1) {
        Some(path) => match Config::load(Path::new(&path)) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("custom_router: {e}");
                return ExitCode::from(2);
            }
        },
        None => built_in_config(),
    };
    let system = actix::System::new();
    match system.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("custom_router: {e}");
            ExitCode::FAILURE
        }
    }
}
