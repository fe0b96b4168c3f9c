//! The `postino` command: `serve`, the `user`/`alias`/`queue` tools (which
//! talk to a running server over its control socket, or open the store when
//! none runs), `store compact` (offline), and the `bench` load harness.

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postino::control::{self, Request, Response};
use postino::Server;
use postino_core::{Config, Store};

#[derive(Parser, Debug)]
#[command(
    name = "postino",
    version,
    about = "A mail server: SMTP in, local mailboxes over POP3, relay via MX"
)]
struct Cli {
    /// Configuration file. Without it, ./postino.toml if present, else the
    /// built-in defaults (data in ./data, SMTP 127.0.0.1:2525, POP3 127.0.0.1:1110).
    #[arg(long, short, global = true, env = "POSTINO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server until SIGINT or SIGTERM (SIGHUP reloads TLS certificates).
    Serve,
    /// Check the configuration file and print the effective settings.
    CheckConfig,
    /// Manage mailboxes.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage aliases.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Inspect and act on the remote delivery queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Load harness: SMTP and POP3 clients, and a receiving sink.
    #[command(subcommand)]
    Bench(postino::bench::BenchCommand),
    /// Maintain the store (server stopped).
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Rewrite the store with only its live records and swap it in, giving
    /// back the space sled keeps after deleted mail. The server must be
    /// stopped; an interrupted run loses nothing (the next start finishes it).
    Compact,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a mailbox; the password is read from standard input.
    Add { address: String },
    /// Change a password (read from standard input).
    Passwd { address: String },
    /// Delete a mailbox and the mail in it.
    Del { address: String },
    /// List mailboxes.
    List,
}

#[derive(Subcommand, Debug)]
enum AliasCommand {
    /// Deliver mail for ALIAS to TARGET (local or remote); repeat to add targets.
    Add {
        alias: String,
        target: String,
    },
    Del {
        alias: String,
    },
    List,
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Id, sender, attempts, next attempt, recipients and last error of each message.
    List,
    Show {
        id: String,
    },
    /// Retry every queued message now.
    Flush,
    Delete {
        id: String,
    },
    /// Give up on a message and bounce it to its sender.
    Bounce {
        id: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postino: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve => serve(config),
        Command::CheckConfig => {
            println!("{}", toml::to_string_pretty(&config).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Command::Bench(cmd) => match postino::bench::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("postino bench: {e}");
                ExitCode::FAILURE
            }
        },
        Command::User(cmd) => {
            let request = match cmd {
                UserCommand::Add { address } => match read_password() {
                    Ok(password) => Request::UserAdd { address, password },
                    Err(e) => return fail(&e),
                },
                UserCommand::Passwd { address } => match read_password() {
                    Ok(password) => Request::UserPasswd { address, password },
                    Err(e) => return fail(&e),
                },
                UserCommand::Del { address } => Request::UserDel { address },
                UserCommand::List => Request::UserList,
            };
            run_control(&config, request)
        }
        Command::Alias(cmd) => run_control(
            &config,
            match cmd {
                AliasCommand::Add { alias, target } => Request::AliasAdd { alias, target },
                AliasCommand::Del { alias } => Request::AliasDel { alias },
                AliasCommand::List => Request::AliasList,
            },
        ),
        Command::Queue(cmd) => run_control(
            &config,
            match cmd {
                QueueCommand::List => Request::QueueList,
                QueueCommand::Show { id } => Request::QueueShow { id },
                QueueCommand::Flush => Request::QueueFlush,
                QueueCommand::Delete { id } => Request::QueueDelete { id },
                QueueCommand::Bounce { id } => Request::QueueBounce { id },
            },
        ),
        Command::Store(StoreCommand::Compact) => store_compact(&config),
    }
}

/// `postino store compact`: offline, on the store itself.
fn store_compact(config: &Config) -> ExitCode {
    postino::init_logging();
    match Store::compact(&config.data_dir) {
        Ok(done) => {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "compacted {}: {:.1} MiB -> {:.1} MiB, {} records",
                config.data_dir.display(),
                mib(done.before),
                mib(done.after),
                done.records
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("compacting {}: {e}", config.data_dir.display())),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("postino: {message}");
    ExitCode::FAILURE
}

fn load_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None if Path::new("postino.toml").exists() => {
            Config::load(Path::new("postino.toml")).map_err(|e| e.to_string())
        }
        None => Ok(Config::default()),
    }
}

/// One line from standard input (the password), without its line end.
fn read_password() -> Result<String, String> {
    if std::io::stdin().is_terminal() {
        eprint!("Password: ");
    }
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password: {e}"))?;
    let password = line.trim_end_matches(['\r', '\n']).to_owned();
    if password.is_empty() {
        return Err("empty password (give it on standard input)".into());
    }
    Ok(password)
}

/// Sends the request to the running server, or runs it on the store when
/// no server runs.
fn run_control(config: &Config, request: Request) -> ExitCode {
    let socket = config.control_socket();
    let response = match control::call(&socket, &request) {
        Ok(Some(r)) => r,
        Ok(None) => match Store::open_configured(&config.data_dir, &config.store) {
            Ok(store) => {
                let r = control::execute(&store, request);
                if let Err(e) = store.flush_blocking() {
                    return fail(&format!("flushing the store: {e}"));
                }
                r
            }
            Err(e) => {
                return fail(&format!(
                    "{e} (no server answers on {}; is another process using {}?)",
                    socket.display(),
                    config.data_dir.display()
                ))
            }
        },
        Err(e) => return fail(&format!("{}: {e}", socket.display())),
    };
    match response {
        Response::Ok(lines) => {
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Response::Error(e) => fail(&e),
    }
}

fn serve(config: Config) -> ExitCode {
    postino::init_logging();
    let system = actix::System::new();
    let result = system.block_on(async move {
        let server = Server::builder(config).start().await?;
        wait_for_signals(&server).await;
        server.stop().await;
        Ok::<(), postino::ServerError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

/// Returns on SIGINT or SIGTERM; reloads TLS on SIGHUP.
async fn wait_for_signals(server: &Server) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                if let Err(e) = server.reload_tls() {
                    tracing::error!(error = %e, "tls reload failed; keeping the old certificate");
                }
            }
        }
    }
}
