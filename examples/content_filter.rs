//! A content filter at the end of DATA: a message whose `X-Spam-Flag`
//! header says `YES` is refused with 550, every other one is stored with
//! an `X-Content-Filter: passed` header added. `cargo run --example
//! content_filter -- postino.toml`; prints `listening smtp=… pop3=…`.
use postino::policy::{Client, DataDecision, Message, Policy};
use postino_core::{smtp::Reply, Config};

struct SpamFlagFilter;

impl Policy for SpamFlagFilter {
    async fn data(&self, _: &Client, message: &Message<'_>) -> DataDecision {
        match message.header("X-Spam-Flag") {
            Some(flag) if flag.eq_ignore_ascii_case("yes") => {
                DataDecision::Reject(Reply::new(550, "5.7.1", "Message flagged as spam"))
            }
            _ => DataDecision::AddHeader("X-Content-Filter".into(), "passed".into()),
        }
    }
}

#[actix::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    postino::init_logging(Default::default());
    let config = Config::load(
        std::env::args()
            .nth(1)
            .unwrap_or("postino.toml".into())
            .as_ref(),
    )?;
    // SIGTERM/SIGINT stop gracefully, SIGHUP reloads TLS (as `postino serve`).
    let signals = postino::Signals::install();
    let server = postino::Server::builder(config)
        .policy(SpamFlagFilter)
        .start()
        .await?;
    println!(
        "listening smtp={} pop3={}",
        server.smtp_addrs()[0],
        server.pop3_addrs()[0]
    );
    server.run_until_signal(signals).await;
    Ok(())
}
