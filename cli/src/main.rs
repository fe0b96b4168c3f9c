//! The `postino` command: `serve`, the `user`/`alias`/`queue` tools (which
//! talk to a running server over its control socket, or open the store when
//! none runs), the offline `store` tools (`check`, `export`, `import`,
//! `compact`), the `bench` load harness, and the `completions` and `man`
//! generators for packagers.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use postino::control::{self, Request, Response};
use postino::queue_tools;
use postino::Server;
use postino_core::logsafe::Secret;
use postino_core::store::StoreError;
use postino_core::{Config, Store};

#[derive(Parser, Debug)]
#[command(
    name = "postino",
    version,
    about = "A mail server: SMTP in, local mailboxes over POP3, relay via MX"
)]
struct Cli {
    /// Configuration file. Without it (nor $POSTINO_CONFIG), ./postino.toml
    /// if present, else /etc/postino/postino.toml if present, else the built-in
    /// defaults (data in ./data, SMTP 127.0.0.1:2525, POP3 127.0.0.1:1110).
    #[arg(long, short, global = true, env = "POSTINO_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server until SIGINT or SIGTERM (SIGHUP reloads TLS certificates).
    Serve,
    /// Check the configuration file and print the effective settings
    /// (passwords and tokens as `<hidden>`).
    CheckConfig {
        /// Print passwords and tokens too.
        #[arg(long)]
        show_secrets: bool,
    },
    /// Manage mailboxes.
    #[command(subcommand)]
    User(UserCommand),
    /// Manage aliases.
    #[command(subcommand)]
    Alias(AliasCommand),
    /// Explain routing decisions.
    #[command(subcommand)]
    Route(RouteCommand),
    /// Mailbox usage.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Check credentials.
    #[command(subcommand)]
    Auth(AuthCommand),
    /// Inspect and act on the remote delivery queue.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Show a message's history: received, routes, delivery attempts,
    /// notifications (kept for `[trace] keep`); exit status 1 if none.
    Trace {
        /// The message id (`queued as ID`, `postino queue list`).
        id: String,
        /// One line: the events as a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// List the live POP3 sessions of the running server: id, user, since, client.
    Who,
    /// End POP3 sessions of the running server without QUIT (nothing they
    /// marked deleted is removed).
    Kick {
        /// A session id as `postino who` prints it, or a user: all of their sessions.
        target: String,
    },
    /// Make the running server read its configuration file again, as
    /// SIGHUP does: routing, limits, quotas and the TLS certificate take
    /// effect for new sessions; listeners, the data directory and store
    /// settings need a restart (named in the answer). A file that does not
    /// load is refused and the running configuration stays.
    Reload,
    /// Offline tools on the store: check, back up, restore, compact (stop
    /// the server first).
    #[command(subcommand)]
    Store(StoreCommand),
    /// DKIM signing keys.
    #[command(subcommand)]
    Dkim(DkimCommand),
    /// Load harness: SMTP and POP3 clients, and a receiving sink.
    #[command(subcommand)]
    Bench(postino_bench::BenchCommand),
    /// Print a shell completion script (e.g. to /usr/share/bash-completion/completions/postino).
    Completions {
        /// The shell the script is for.
        shell: clap_complete::Shell,
    },
    /// Print the postino(1) manual page, or write it and one page per subcommand to a directory.
    Man {
        /// Write postino.1, postino-serve.1, postino-queue-list.1 ... here (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum DkimCommand {
    /// Make a signing key for DOMAIN: writes the private key (PKCS#8 PEM,
    /// mode 0600; never over an existing file) and prints the DNS TXT
    /// record to publish and the lines to add to the configuration.
    Generate {
        /// The signing domain (`d=`), e.g. example.com.
        domain: String,
        /// The selector (`s=`): the record goes at SELECTOR._domainkey.DOMAIN.
        #[arg(long, default_value = "default")]
        selector: String,
        /// RSA (2048 bits; every verifier knows it) or Ed25519 (RFC 8463).
        #[arg(long, value_enum, default_value_t = DkimAlgorithm::Rsa)]
        algorithm: DkimAlgorithm,
        /// Write the key here instead of DATA_DIR/dkim/DOMAIN.SELECTOR.pem.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

/// `postino dkim generate --algorithm`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum DkimAlgorithm {
    Rsa,
    Ed25519,
}

#[derive(Subcommand, Debug)]
enum StoreCommand {
    /// Verify every record and reference; exit status 1 and a report on damage.
    Check,
    /// Write users, aliases, mailboxes and the queue as JSON lines (see the
    /// README). From a damaged store, writes what can be read and exits 1.
    Export {
        /// Write here instead of to standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Build the store in an empty data directory from an export.
    Import {
        /// The file `postino store export` wrote.
        file: PathBuf,
    },
    /// Rewrite the store with only its live records and swap it in, giving
    /// back the space sled keeps after deleted mail. The server must be
    /// stopped; an interrupted run loses nothing (the next start finishes it).
    Compact,
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Add a mailbox; the password is read from standard input.
    Add {
        /// The mailbox address, in one of the local domains.
        address: String,
        /// The mailbox's quota: a size (1048576, 500M, 1G), unlimited, or
        /// default (`[mailbox] quota` applies; the default).
        #[arg(long, value_name = "SIZE")]
        quota: Option<String>,
    },
    /// Change a mailbox's settings.
    Set {
        /// The mailbox address.
        address: String,
        /// The mailbox's quota: a size (1048576, 500M, 1G), unlimited, or
        /// default (`[mailbox] quota` applies).
        #[arg(long, value_name = "SIZE")]
        quota: Option<String>,
    },
    /// Change a password (read from standard input).
    Passwd {
        /// The mailbox address.
        address: String,
    },
    /// Delete a mailbox and the mail in it.
    Del {
        /// The mailbox address.
        address: String,
        /// Delete even if the mailbox holds mail or aliases point at it
        /// (without it, the command says what would happen and fails).
        #[arg(long)]
        force: bool,
    },
    /// List mailboxes.
    List,
}

#[derive(Subcommand, Debug)]
enum AliasCommand {
    /// Deliver mail for ALIAS to TARGET (local or remote); repeat to add targets.
    Add {
        /// The alias address, in one of the local domains.
        alias: String,
        /// A local mailbox, another alias or a remote address.
        target: String,
    },
    /// Delete an alias and all its targets.
    Del {
        /// The alias address.
        alias: String,
    },
    /// List aliases and their targets.
    List,
}

#[derive(Subcommand, Debug)]
enum RouteCommand {
    /// Say where mail to ADDRESS would go and which rule decided (as
    /// `sendmail -bv`): local user, alias chain, unknown-user policy, relay
    /// permission, and the smarthost or the exchangers resolved now.
    Explain {
        /// The recipient address.
        address: String,
        /// The envelope sender (where a bounce would go).
        #[arg(long, value_name = "SENDER")]
        from: Option<String>,
        /// The client's IP address (relay permission by routing.relay_networks).
        #[arg(long, value_name = "IP")]
        client: Option<String>,
        /// Assume the client authenticated as USER (relay permission).
        #[arg(long, value_name = "USER")]
        auth: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum MailboxCommand {
    /// Messages and octets in one mailbox, or in every user's.
    Stats {
        /// The mailbox address; all mailboxes without it.
        address: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum AuthCommand {
    /// Check a password (read from standard input, never echoed or logged)
    /// as a login would (as `doveadm auth test`); exit status 1 if wrong.
    Test {
        /// The mailbox address to log in as.
        address: String,
    },
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// One line per message: id, state, size, sender, attempts, next
    /// attempt, recipients still to do and the last error (as mailq).
    List {
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per message and line (NDJSON), no header or
        /// count line.
        #[arg(long)]
        json: bool,
    },
    /// The running server's delivery destinations (domains, or the
    /// smarthost) and their traffic shaping: deliveries running and
    /// waiting, concurrency now / limit, rate, and whether the destination
    /// is dead or throttled (running server only).
    Destinations,
    /// Sender, arrival, client, attempts, next attempt and each recipient's state of one message.
    Show {
        /// The message id, as `queue list` prints it.
        id: String,
    },
    /// Print a queued message: headers and body (as postcat -q).
    Cat {
        /// The message id, as `queue list` prints it.
        id: String,
        /// Only the header section (as postcat -h).
        #[arg(long, conflicts_with = "body")]
        headers: bool,
        /// Only the body (as postcat -b).
        #[arg(long)]
        body: bool,
    },
    /// Keep messages queued but do not try them until released (as postsuper -h).
    Hold(Selection),
    /// End the hold of messages; they are tried at once (as postsuper -H).
    Release(Selection),
    /// Retry messages now and start their retry schedule again (as postsuper -r).
    Requeue(Selection),
    /// Retry queued messages now: all of them, or those the filters select
    /// (--domain D as postqueue -s D). Held messages stay held.
    Flush {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Drop messages from the queue without telling their senders (as postsuper -d).
    Delete(Selection),
    /// Give up on messages and bounce them to their senders.
    Bounce(Selection),
}

/// The messages an action is for: ids, or filters (at least one of them).
#[derive(clap::Args, Debug)]
struct Selection {
    /// Message ids, as `queue list` prints them.
    ids: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
}

/// Filters of the queue commands; a message must pass all that are given.
#[derive(clap::Args, Debug, Default)]
struct FilterArgs {
    /// Only messages with a recipient still to deliver in this domain.
    #[arg(long, value_name = "DOMAIN")]
    domain: Option<String>,
    /// Only messages from this envelope sender (case-insensitive);
    /// @DOMAIN: any sender in DOMAIN; "" or <>: the null sender.
    #[arg(long, value_name = "ADDRESS")]
    sender: Option<String>,
    /// Only messages received at least this long ago (e.g. 30m, 2h, 3days).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    older_than: Option<std::time::Duration>,
    /// Only messages in these states (repeat or separate with commas).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "STATE")]
    state: Vec<StateArg>,
}

/// `--state` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum StateArg {
    /// Being tried right now (running server only).
    Active,
    /// On hold (queue hold).
    Held,
    /// Tried at least once, waiting for the next attempt.
    Deferred,
    /// Not tried yet.
    Incoming,
}

impl FilterArgs {
    fn into_filter(self, ids: Vec<String>) -> queue_tools::Filter {
        queue_tools::Filter {
            ids,
            domain: self.domain,
            sender: self.sender,
            older_than: self.older_than.map(|d| d.as_secs()),
            states: self
                .state
                .into_iter()
                .map(|s| match s {
                    StateArg::Active => queue_tools::State::Active,
                    StateArg::Held => queue_tools::State::Held,
                    StateArg::Deferred => queue_tools::State::Deferred,
                    StateArg::Incoming => queue_tools::State::Incoming,
                })
                .collect(),
        }
    }
}

/// The request for a queue command.
fn queue_request(cmd: QueueCommand) -> Request {
    use queue_tools::{Action, Part, QueueRequest};
    let act = |action, sel: Selection| {
        Request::Queue(QueueRequest::Act {
            action,
            filter: sel.filter.into_filter(sel.ids),
        })
    };
    match cmd {
        QueueCommand::List { filter, json } => Request::Queue(QueueRequest::List {
            filter: filter.into_filter(Vec::new()),
            json,
        }),
        QueueCommand::Show { id } => Request::QueueShow { id },
        QueueCommand::Destinations => Request::QueueDestinations,
        QueueCommand::Cat { id, headers, body } => Request::Queue(QueueRequest::Cat {
            id,
            part: match (headers, body) {
                (true, _) => Part::Headers,
                (_, true) => Part::Body,
                _ => Part::All,
            },
        }),
        QueueCommand::Hold(sel) => act(Action::Hold, sel),
        QueueCommand::Release(sel) => act(Action::Release, sel),
        QueueCommand::Requeue(sel) => act(Action::Requeue, sel),
        // Also without filters: the walk is streamed and leaves held
        // messages alone (the older `QueueFlush` request loads the queue).
        QueueCommand::Flush { filter } => Request::Queue(QueueRequest::Act {
            action: Action::Flush,
            filter: filter.into_filter(Vec::new()),
        }),
        // One id and no filter: the single-message request (its answer
        // names the message).
        QueueCommand::Delete(sel) if sel.ids.len() == 1 && sel.filter.is_empty() => {
            Request::QueueDelete {
                id: sel.ids.into_iter().next().unwrap_or_default(),
            }
        }
        QueueCommand::Bounce(sel) if sel.ids.len() == 1 && sel.filter.is_empty() => {
            Request::QueueBounce {
                id: sel.ids.into_iter().next().unwrap_or_default(),
            }
        }
        QueueCommand::Delete(sel) => act(Action::Delete, sel),
        QueueCommand::Bounce(sel) => act(Action::Bounce, sel),
    }
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.domain.is_none()
            && self.sender.is_none()
            && self.older_than.is_none()
            && self.state.is_empty()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Generators need no configuration: a packager's build has none.
    match &cli.command {
        Command::Completions { shell } => return completions(*shell),
        Command::Man { dir } => return man_pages(dir.as_deref()),
        _ => {}
    }
    let config_file = find_config(cli.config.as_deref());
    let config = match load_config(config_file.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("postino: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve => serve(config, config_file),
        Command::CheckConfig { show_secrets } => {
            eprintln!("postino: using {}", describe_config(config_file.as_deref()));
            if let Err(e) = check_files(&config) {
                eprintln!("postino: {e}");
                return ExitCode::from(2);
            }
            if let Err(e) = postino::dkim::DkimKeys::load(&config, config_file.as_deref()) {
                eprintln!("postino: {e}");
                return ExitCode::from(2);
            }
            let shown = match show_secrets {
                true => config,
                false => config.without_secrets(),
            };
            print_lines([toml::to_string_pretty(&shown).unwrap_or_default()])
        }
        Command::Bench(cmd) => {
            // The load harness prints reports as it goes; a reader that
            // stops early (`| head`) ends it as it ends `seq`: by SIGPIPE,
            // which Rust programs ignore unless told (then `println!`
            // panics). It holds no state that an early end could harm.
            restore_sigpipe();
            match postino_bench::run(cmd) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("postino bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Store(cmd) => store_command(&config, cmd),
        Command::Dkim(cmd) => dkim_command(&config, cmd),
        Command::User(cmd) => {
            let request = match cmd {
                UserCommand::Add { address, quota } => match read_password() {
                    Ok(password) => Request::UserAdd {
                        address,
                        password: Secret::new(password),
                        quota,
                    },
                    Err(e) => return fail(&e),
                },
                UserCommand::Passwd { address } => match read_password() {
                    Ok(password) => Request::UserPasswd {
                        address,
                        password: Secret::new(password),
                    },
                    Err(e) => return fail(&e),
                },
                UserCommand::Set { address, quota } => Request::UserSet { address, quota },
                UserCommand::Del { address, force } => Request::UserDel { address, force },
                UserCommand::List => Request::UserList,
            };
            run_control(&config, config_file.as_deref(), request)
        }
        Command::Alias(cmd) => run_control(
            &config,
            config_file.as_deref(),
            match cmd {
                AliasCommand::Add { alias, target } => Request::AliasAdd { alias, target },
                AliasCommand::Del { alias } => Request::AliasDel { alias },
                AliasCommand::List => Request::AliasList,
            },
        ),
        Command::Route(RouteCommand::Explain {
            address,
            from,
            client,
            auth,
        }) => run_control(
            &config,
            config_file.as_deref(),
            Request::RouteExplain {
                address,
                from,
                client,
                auth,
            },
        ),
        Command::Mailbox(MailboxCommand::Stats { address }) => run_control(
            &config,
            config_file.as_deref(),
            Request::MailboxStats { address },
        ),
        Command::Auth(AuthCommand::Test { address }) => match read_password() {
            Ok(password) => run_control(
                &config,
                config_file.as_deref(),
                Request::AuthTest {
                    address,
                    password: Secret::new(password),
                },
            ),
            Err(e) => fail(&e),
        },
        Command::Queue(cmd) => match queue_request(cmd) {
            Request::Queue(request) => run_queue(&config, config_file.as_deref(), request),
            request => run_control(&config, config_file.as_deref(), request),
        },
        Command::Trace { id, json } => {
            run_control(&config, config_file.as_deref(), Request::Trace { id, json })
        }
        Command::Who => run_control(&config, config_file.as_deref(), Request::Who),
        Command::Reload => run_control(&config, config_file.as_deref(), Request::Reload),
        Command::Kick { target } => {
            run_control(&config, config_file.as_deref(), Request::Kick { target })
        }
        Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before the configuration is loaded")
        }
    }
}

/// `postino completions SHELL`: the script on standard output.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "postino", &mut script);
    write_stdout(&script)
}

/// `postino man [--dir DIR]`: postino(1) on standard output, or every page
/// (one per subcommand, as `git` ships them) written to DIR.
fn man_pages(dir: Option<&Path>) -> ExitCode {
    let Some(dir) = dir else {
        let mut page = Vec::new();
        if let Err(e) = clap_mangen::Man::new(Cli::command()).render(&mut page) {
            return fail(&format!("rendering the manual page: {e}"));
        }
        return write_stdout(&page);
    };
    let written = std::fs::create_dir_all(dir).and_then(|()| {
        let mut cmd = Cli::command().disable_help_subcommand(true);
        // Gives each subcommand its display name (postino-queue-list).
        cmd.build();
        write_man_pages(&cmd, dir)
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing manual pages to {}: {e}", dir.display())),
    }
}

/// Writes the page of `cmd` and of each of its subcommands, every one
/// footed "postino VERSION" (`clap_mangen::generate_to` puts the bare
/// subcommand name there).
fn write_man_pages(cmd: &clap::Command, dir: &Path) -> std::io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, dir)?;
    }
    let source = concat!("postino ", env!("CARGO_PKG_VERSION"));
    clap_mangen::Man::new(cmd.clone())
        .source(source)
        .generate_to(dir)
        .map(drop)
}

/// Writes generated text; a reader that stopped early is not an error
/// (as in [`print_lines`]).
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing the output: {e}")),
    }
}

/// `postino store compact`: offline, on the store itself.
fn store_compact(config: &Config) -> ExitCode {
    postino::init_logging(config.log.format);
    match Store::compact(&config.data_dir) {
        Ok(done) => {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            print_lines([format!(
                "compacted {}: {:.1} MiB -> {:.1} MiB, {} records",
                config.data_dir.display(),
                mib(done.before),
                mib(done.after),
                done.records
            )])
        }
        Err(e) => fail(&format!("compacting {}: {e}", config.data_dir.display())),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("postino: {message}");
    ExitCode::FAILURE
}

/// Where the system-wide configuration lives (as Postfix's /etc/postfix).
const ETC_CONFIG: &str = "/etc/postino/postino.toml";

/// The configuration file to use: `--config` or `$POSTINO_CONFIG` (clap
/// reads both, the option first), else `./postino.toml`, else
/// [`ETC_CONFIG`], each only if it exists; `None`: the built-in defaults.
fn find_config(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = given {
        return Some(p.to_owned());
    }
    [Path::new("./postino.toml"), Path::new(ETC_CONFIG)]
        .into_iter()
        .find(|p| p.exists())
        .map(Path::to_owned)
}

/// Names the configuration's source for messages.
fn describe_config(file: Option<&Path>) -> String {
    match file {
        Some(p) => format!("configuration {}", p.display()),
        None => format!(
            "the built-in defaults (no --config, $POSTINO_CONFIG, ./postino.toml or {ETC_CONFIG})"
        ),
    }
}

fn load_config(path: Option<&Path>) -> Result<Config, String> {
    match path {
        Some(p) => Config::load(p).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

/// `check-config`: the files the configuration names can be used: the
/// `[tls]` certificate chain and key (readable, parseable PEM, and a key
/// that goes with the certificate) and `delivery.tls.ca_file`; the error
/// names the key.
fn check_files(config: &Config) -> Result<(), String> {
    if config.delivery.tls.ca_file.is_some() {
        let outbound = postino::delivery::OutboundTls::new(&config.delivery.tls);
        if let Some(problem) = outbound.problem() {
            return Err(problem.to_owned());
        }
    }
    let Some(tls) = &config.tls else {
        return Ok(());
    };
    for (key, path) in [("tls.cert", &tls.cert), ("tls.key", &tls.key)] {
        if let Err(e) = std::fs::File::open(path) {
            return Err(format!("{key} = {}: {e}", path.display()));
        }
    }
    postino::tls::acceptor(tls).map(drop).map_err(|e| match e {
        postino::tls::TlsError::Pem { path, message } => {
            let key = if Path::new(&path) == tls.key {
                "tls.key"
            } else {
                "tls.cert"
            };
            format!("{key} = {path}: {message}")
        }
        other => format!(
            "tls.cert = {}, tls.key = {}: {other}",
            tls.cert.display(),
            tls.key.display()
        ),
    })
}

/// One line from standard input (the password), without its line end. On
/// a terminal it prompts and turns echo off while the line is typed.
fn read_password() -> Result<String, String> {
    let _echo_off = match std::io::stdin().is_terminal() {
        true => {
            eprint!("Password: ");
            EchoOff::new()
        }
        false => None,
    };
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

/// Terminal echo turned off on standard input until dropped.
struct EchoOff(libc::termios);

impl EchoOff {
    fn new() -> Option<EchoOff> {
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut t) != 0 {
                return None;
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            t.c_lflag |= libc::ECHONL;
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) != 0 {
                return None;
            }
            Some(EchoOff(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new`.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.0);
        }
    }
}

/// The store of `config` for a tool run without a server: the sled store
/// in the data directory (which must exist: only `serve` creates one), or
/// the PostgreSQL database of `[store] url`, which every node shares, so a
/// tool run on any machine with a node's configuration acts on the
/// cluster.
fn offline_storage(
    config: &Config,
    config_file: Option<&Path>,
    socket: &Path,
) -> Result<postino_core::storage::SharedStorage, String> {
    let storage: postino_core::storage::SharedStorage = match config.store.backend {
        postino_core::config::StoreBackend::Postgres => {
            match postino_pg::PgStore::from_config(&config.store) {
                Ok(pg) => std::sync::Arc::new(pg),
                Err(e) => return Err(format!("opening the PostgreSQL store: {e}")),
            }
        }
        // A tool run from the wrong directory (or without --config) must
        // not make an empty store and report on it.
        postino_core::config::StoreBackend::Sled if !config.data_dir.join("db").exists() => {
            return Err(format!(
                "no postino store at {} (and no server listening on {}); start the server with postino serve, or pass --config (this used {})",
                config.data_dir.display(),
                socket.display(),
                describe_config(config_file)
            ))
        }
        postino_core::config::StoreBackend::Sled => {
            match Store::open_configured(&config.data_dir, &config.store) {
                Ok(store) => std::sync::Arc::new(postino_core::storage::SledStorage::new(store)),
                Err(e) => {
                    return Err(format!(
                        "{e} (no server answers on {}; is another process using {}?)",
                        socket.display(),
                        config.data_dir.display()
                    ))
                }
            }
        }
    };
    storage.set_quota_policy(config.mailbox.quota, config.mailbox.quota_warning);
    Ok(storage)
}

/// A small runtime for the tools' store calls without a server.
fn tool_runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))
}

/// Sends the request to the running server, or runs it on the store when
/// no server runs and the store exists.
fn run_control(config: &Config, config_file: Option<&Path>, request: Request) -> ExitCode {
    let socket = config.control_socket();
    let response = match control::call(&socket, &request) {
        Ok(Some(r)) => r,
        Ok(None) => {
            let (storage, rt) = match offline_storage(config, config_file, &socket)
                .and_then(|s| tool_runtime().map(|rt| (s, rt)))
            {
                Ok(both) => both,
                Err(e) => return fail(&e),
            };
            let r = rt.block_on(control::execute(storage.as_ref(), config, request));
            if let Err(e) = storage.flush_blocking() {
                return fail(&format!("flushing the store: {e}"));
            }
            r
        }
        Err(e) => return fail(&format!("{}: {e}", socket.display())),
    };
    match response {
        Response::Ok(lines) | Response::More(lines) => print_lines(lines),
        Response::Error(e) => fail(&e),
    }
}

/// [`run_control`] for the queue tools: the server's answer is printed
/// chunk by chunk as it comes, and without a server the store is walked
/// a page at a time and printed line by line, so a listing takes bounded
/// memory.
fn run_queue(
    config: &Config,
    config_file: Option<&Path>,
    request: queue_tools::QueueRequest,
) -> ExitCode {
    use queue_tools::QueueRequest;
    let socket = config.control_socket();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let wire = Request::Queue(request.clone());
    let answer = control::call_streaming(&socket, &wire, |lines| {
        lines.iter().try_for_each(|l| writeln!(out, "{l}"))
    });
    let finished = match answer {
        Ok(Some(Response::Ok(lines) | Response::More(lines))) => lines
            .iter()
            .try_for_each(|l| writeln!(out, "{l}"))
            .map(|()| Ok(())),
        Ok(Some(Response::Error(e))) => Ok(Err(e)),
        // A reader that stopped early: the server stops when we hang up.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
        Err(e) => return fail(&format!("{}: {e}", socket.display())),
        Ok(None) => {
            let (storage, rt) = match offline_storage(config, config_file, &socket)
                .and_then(|s| tool_runtime().map(|rt| (s, rt)))
            {
                Ok(both) => both,
                Err(e) => return fail(&e),
            };
            let mut broken = None;
            let mut emit = |line: String| match writeln!(out, "{line}") {
                Ok(()) => true,
                Err(e) => {
                    broken = Some(e);
                    false
                }
            };
            let store = storage.as_ref();
            let done = rt.block_on(async {
                match request {
                    QueueRequest::List { filter, json } => {
                        queue_tools::list(store, &filter, json, &Default::default(), &mut emit)
                            .await
                    }
                    QueueRequest::Cat { id, part } => {
                        queue_tools::cat(store, &id, part, &mut emit).await
                    }
                    QueueRequest::Act { action, filter } => {
                        queue_tools::act_offline(store, action, &filter)
                            .await
                            .map(|l| {
                                emit(l);
                            })
                    }
                }
            });
            if let Err(e) = storage.flush_blocking() {
                return fail(&format!("flushing the store: {e}"));
            }
            match broken {
                Some(e) => Err(e),
                None => Ok(done),
            }
        }
    };
    match finished.and_then(|done| out.flush().map(|()| done)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => fail(&e),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing the output: {e}")),
    }
}

/// Writes the output of a command, a line each. A reader that stopped
/// early (`postino queue list | head`) is not an error: the command's work
/// is done (and flushed) before anything is printed, so it exits quietly
/// with success, as ripgrep does, instead of panicking in `println!`. Any
/// other write error (a full disk) is reported and fails.
fn print_lines(lines: impl IntoIterator<Item = String>) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let written = lines
        .into_iter()
        .try_for_each(|l| writeln!(out, "{l}"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => fail(&format!("writing the output: {e}")),
    }
}

/// Lets SIGPIPE end the process, as it does most Unix commands.
fn restore_sigpipe() {
    // SAFETY: setting a signal's disposition to its default, before any
    // thread of ours runs, has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The offline `store` tools. They open the store themselves, so a
/// running server (which holds sled's lock) makes them fail, naming the
/// data directory.
fn dkim_command(config: &Config, cmd: DkimCommand) -> ExitCode {
    let DkimCommand::Generate {
        domain,
        selector,
        algorithm,
        output,
    } = cmd;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    // The same rule the configuration applies to its [dkim."DOMAIN"] names.
    let labels = |s: &str| {
        s.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    };
    if !labels(&domain) {
        return fail(&format!("`{domain}` is not a domain name"));
    }
    if !labels(&selector) {
        return fail(&format!(
            "`{selector}` is not a selector (letters, digits, `-`, `.`)"
        ));
    }
    let (algorithm, name) = match algorithm {
        DkimAlgorithm::Rsa => (postino::dkim::Algorithm::Rsa, "RSA-2048"),
        DkimAlgorithm::Ed25519 => (postino::dkim::Algorithm::Ed25519, "Ed25519"),
    };
    let path = output.unwrap_or_else(|| {
        config
            .data_dir
            .join("dkim")
            .join(format!("{domain}.{selector}.pem"))
    });
    let generated = match postino::dkim::generate(algorithm) {
        Ok(g) => g,
        Err(e) => return fail(&e.to_string()),
    };
    if let Err(e) = write_private(&path, generated.private_pem.as_bytes()) {
        return fail(&format!("{}: {e}", path.display()));
    }
    let path = std::path::absolute(&path).unwrap_or(path);
    eprintln!(
        "postino: wrote the {name} key for {domain} to {} (mode 0600)",
        path.display()
    );
    print_lines([
        "; Publish this DNS record:".to_owned(),
        generated.zone_line(&selector, &domain),
        String::new(),
        "# Add to the configuration:".to_owned(),
        format!("[dkim.\"{domain}\"]"),
        format!("selector = \"{selector}\""),
        // Quoted by toml, whatever the path holds.
        format!("key = {}", toml::Value::String(path.display().to_string())),
    ])
}

/// Writes a private key readable by its owner only, never over an
/// existing file (an old key may still be published and in use).
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn store_command(config: &Config, cmd: StoreCommand) -> ExitCode {
    if config.store.backend == postino_core::config::StoreBackend::Postgres {
        return pg_store_command(config, cmd);
    }
    let dir = &config.data_dir;
    match cmd {
        StoreCommand::Check => {
            let store = match open_existing(dir) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let report = match store.check() {
                Ok(r) => r,
                Err(e) => return fail(&format!("checking {}: {e}", dir.display())),
            };
            let c = &report.counts;
            let mut lines = vec![format!(
                "{}: {} users, {} aliases, {} mailbox entries, {} queued, {} spooled",
                dir.display(),
                c.users,
                c.aliases,
                c.mail,
                c.queue,
                c.inbound
            )];
            lines.extend(report.notes.iter().map(|note| format!("note: {note}")));
            lines.extend(report.problems.iter().map(|p| format!("DAMAGED: {p}")));
            if report.problems.is_empty() {
                lines.push("ok".into());
                print_lines(lines)
            } else {
                lines.push(format!(
                    "{} problems; 'postino store export' writes out what can be read",
                    report.problems.len()
                ));
                // Damage is the answer, whether or not the reader saw it all.
                print_lines(lines);
                ExitCode::FAILURE
            }
        }
        StoreCommand::Export { output } => {
            let (store, _salvage) = match open_for_export(dir) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            export_command(output.as_deref(), |out| store.export(out))
        }
        StoreCommand::Compact => store_compact(config),
        StoreCommand::Import { file } => {
            let input = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => return fail(&format!("{}: {e}", file.display())),
            };
            match Store::import(dir, &mut std::io::BufReader::new(input)) {
                Ok(c) => {
                    println!(
                        "imported {} users, {} aliases, {} mailbox entries, {} queued, {} spooled into {}",
                        c.users,
                        c.aliases,
                        c.mail,
                        c.queue,
                        c.inbound,
                        dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("import from {}: {e}", file.display())),
            }
        }
    }
}

/// `store export|import` on the PostgreSQL database of `[store] url` (the
/// same format as sled's, so a store moves between the backends);
/// `check` and `compact` are sled's own.
fn pg_store_command(config: &Config, cmd: StoreCommand) -> ExitCode {
    let open = || {
        postino_pg::PgStore::from_config(&config.store)
            .map_err(|e| format!("opening the PostgreSQL store: {e}"))
    };
    match cmd {
        StoreCommand::Check | StoreCommand::Compact => fail(
            "store check and store compact are for backend = \"sled\"; PostgreSQL has its own tools (amcheck, VACUUM)",
        ),
        StoreCommand::Export { output } => {
            let store = match open() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            export_command(output.as_deref(), |out| store.export(out))
        }
        StoreCommand::Import { file } => {
            let input = match std::fs::File::open(&file) {
                Ok(f) => f,
                Err(e) => return fail(&format!("{}: {e}", file.display())),
            };
            let store = match open() {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            match store.import(&mut std::io::BufReader::new(input)) {
                Ok(c) => {
                    println!(
                        "imported {} users, {} aliases, {} mailbox entries, {} queued, {} spooled into PostgreSQL (node {})",
                        c.users, c.aliases, c.mail, c.queue, c.inbound, config.store.node
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("import from {}: {e}", file.display())),
            }
        }
    }
}

/// `store export` on either backend: into `output` (synced before the
/// counts are printed) or standard output.
fn export_command<E: std::fmt::Display>(
    output: Option<&Path>,
    export: impl FnOnce(&mut dyn Write) -> Result<postino_core::store::Counts, E>,
) -> ExitCode {
    let result = match output {
        Some(path) => std::fs::File::create(path)
            .map_err(|e| format!("{}: {e}", path.display()))
            .and_then(|file| {
                let mut out = std::io::BufWriter::new(file);
                let counts = export(&mut out).map_err(|e| e.to_string())?;
                let file = out.into_inner().map_err(|e| e.to_string())?;
                file.sync_all().map_err(|e| e.to_string())?;
                Ok(counts)
            }),
        None => export(&mut std::io::BufWriter::new(std::io::stdout().lock()))
            .map_err(|e| e.to_string()),
    };
    match result {
        Ok(c) => {
            eprintln!(
                "exported {} users, {} aliases, {} mailbox entries, {} queued, {} spooled; {} unreadable records skipped",
                c.users, c.aliases, c.mail, c.queue, c.inbound, c.skipped
            );
            if c.skipped > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(&format!("export: {e}")),
    }
}

/// Opens a store that must already exist (the tools never create one).
fn open_existing(dir: &Path) -> Result<Store, String> {
    try_open_existing(dir).map_err(|e| format!("{}: {e}", dir.display()))
}

fn try_open_existing(dir: &Path) -> Result<Store, StoreError> {
    if !dir.join("db").exists() {
        return Err(StoreError::Prepare {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no store here"),
        });
    }
    Store::open(dir)
}

/// Opens the store for export. If sled itself reports damage, opens a copy
/// without sled's snapshot files instead: sled then rebuilds its page table
/// from the log, which is where the data is (the snapshot only saves
/// reading all of it). The copy (returned, removed on drop) lives in the
/// temporary directory; the damaged store is left as it was.
fn open_for_export(dir: &Path) -> Result<(Store, Option<SalvageCopy>), String> {
    match try_open_existing(dir) {
        Ok(s) => Ok((s, None)),
        Err(e) if e.is_corruption() => {
            eprintln!(
                "postino: {}: {e}; reading a copy without sled's snapshot instead",
                dir.display()
            );
            let copy = SalvageCopy(
                std::env::temp_dir().join(format!("postino-salvage-{}", std::process::id())),
            );
            copy_store(dir, &copy.0).map_err(|e| format!("copying {}: {e}", dir.display()))?;
            let store = Store::open(&copy.0).map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok((store, Some(copy)))
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

struct SalvageCopy(PathBuf);

impl Drop for SalvageCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Copies sled's files except its snapshots.
fn copy_store(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to.join("blobs"))?;
    for name in ["db", "conf"] {
        std::fs::copy(from.join(name), to.join(name))?;
    }
    if let Ok(blobs) = std::fs::read_dir(from.join("blobs")) {
        for blob in blobs {
            let blob = blob?;
            std::fs::copy(blob.path(), to.join("blobs").join(blob.file_name()))?;
        }
    }
    Ok(())
}

fn serve(config: Config, config_file: Option<PathBuf>) -> ExitCode {
    // Test builds only: failpoints named in FAILPOINTS are set from the start.
    let _failpoints = postino::failpoints_from_env();
    postino::init_logging(config.log.format);
    // `[store] backend = "postgres"`: the PostgreSQL store, shared with the
    // other nodes of the cluster (the server opens sled itself).
    let storage = match config.store.backend {
        postino_core::config::StoreBackend::Postgres => {
            match postino_pg::PgStore::from_config(&config.store) {
                Ok(pg) => Some(std::sync::Arc::new(pg) as postino_core::storage::SharedStorage),
                Err(e) => return fail(&format!("opening the PostgreSQL store: {e}")),
            }
        }
        postino_core::config::StoreBackend::Sled => None,
    };
    let system = actix::System::new();
    let result = system.block_on(async move {
        // Taken over before the server starts: a SIGTERM right after the
        // "postino started" line must stop it gracefully, not kill it.
        let signals = postino::Signals::install();
        let mut builder = Server::builder(config).config_file(config_file);
        if let Some(storage) = storage {
            builder = builder.storage(storage);
        }
        let server = builder.start().await?;
        server.run_until_signal(signals).await;
        Ok::<(), postino::ServerError>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::CommandFactory;

    /// Every subcommand and argument has help text, so that `--help`, the
    /// manual pages and the completions describe all of them.
    #[test]
    fn every_command_and_argument_is_documented() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if !arg.is_hide_set() && arg.get_help().is_none() && id != "help" && id != "version"
                {
                    missing.push(format!("{path} {id}: no help"));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        Cli::command().debug_assert();
        let mut cmd = Cli::command();
        cmd.build();
        let mut missing = Vec::new();
        walk(&cmd, "postino", &mut missing);
        assert!(missing.is_empty(), "undocumented: {missing:#?}");
    }
}
