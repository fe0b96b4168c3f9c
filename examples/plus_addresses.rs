//! `custom_router`'s rules as a [`postino::policy::Policy`]: `user+tag@` a
//! local domain goes to `user@`, `blocked.test` is refused, the rest is left
//! to the default router. `cargo run --example plus_addresses -- postino.toml`
use postino::policy::{Client, Policy, RcptDecision};
use postino_core::{smtp::Reply, Address, Config};

struct PlusAddresses(Vec<String>);

impl Policy for PlusAddresses {
    async fn rcpt(&self, _: &Client, _: Option<&Address>, to: &Address) -> RcptDecision {
        if to.domain.eq_ignore_ascii_case("blocked.test") {
            let text = format!("<{to}>: this server does not accept mail for blocked.test");
            return RcptDecision::Reject(Reply::new(550, "5.7.1", text));
        }
        let local = self.0.iter().any(|d| d.eq_ignore_ascii_case(&to.domain));
        match to.local_part.split_once('+') {
            Some((user, _)) if local && !user.is_empty() => {
                let user = format!("{user}@{}", to.domain);
                RcptDecision::Rewrite(Address::parse(&user, true).expect("shorter than `to`"))
            }
            _ => RcptDecision::Default,
        }
    }
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    postino::init_logging(Default::default());
    let path = std::env::args().nth(1).unwrap_or("postino.toml".into());
    let config = Config::load(path.as_ref())?;
    let policy = PlusAddresses(config.routing.local_domains.clone());
    let signals = postino::Signals::install(); // Before start, as `postino serve`.
    let server = postino::Server::builder(config).policy(policy);
    let server = server.start().await?;
    let (smtp, pop3) = (server.smtp_addrs()[0], server.pop3_addrs()[0]);
    println!("listening smtp={smtp} pop3={pop3}");
    server.run_until_signal(signals).await;
    Ok(())
}
