//! The `postino` command line as an administrator uses it: users and
//! aliases with the server stopped (the CLI opens the store) and running
//! (over the control socket, taking effect at once), `--config` anywhere,
//! configuration errors that name the key and the line, and a listener that
//! cannot bind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::smtp_local::pop_all;
use crate::support::server::{binary, cli_with_config, config_text, Raw, TestServer};

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts success and returns standard output.
pub(crate) fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts failure and returns standard error.
fn fails(out: Output) -> String {
    assert!(
        !out.status.success(),
        "expected failure; stdout: {}",
        stdout(&out)
    );
    // 124 is `timeout` giving up: a hang is not a clean failure.
    assert_ne!(out.status.code(), Some(124), "timed out: {}", stderr(&out));
    stderr(&out)
}

/// Runs `postino ARGS` exactly as given (no `--config` added), bounded in
/// time, with `stdin`.
fn postino(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("timeout")
        .arg("60")
        .arg(binary())
        .args(args)
        .env_remove("POSTINO_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run postino");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("postino output")
}

/// A config file in a fresh directory, never used by a server yet.
fn fresh_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("postino.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

/// One SMTP session's replies to RCPT TO for each address.
fn rcpt_replies(server: &TestServer, rcpts: &[&str]) -> Vec<String> {
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO admin.test");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    let replies = rcpts
        .iter()
        .map(|r| c.cmd(&format!("RCPT TO:<{r}>")))
        .collect();
    c.cmd("QUIT");
    replies
}

/// Whether a POP3 login with this password succeeds.
fn pop_login(server: &TestServer, user: &str, password: &str) -> bool {
    let mut c = Raw::connect(server.pop3);
    assert!(c.line().starts_with("+OK"));
    c.send(format!("USER {user}\r\nPASS {password}\r\nQUIT\r\n").as_bytes());
    assert!(c.line().starts_with("+OK"));
    c.line().starts_with("+OK")
}

/// Runs `postino ARGS` in `cwd`, with `$POSTINO_CONFIG` set to `env_config`
/// or unset, bounded in time.
fn postino_in(cwd: &Path, env_config: Option<&Path>, args: &[&str], stdin: &str) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("60")
        .arg(binary())
        .args(args)
        .current_dir(cwd)
        .env_remove("POSTINO_CONFIG");
    if let Some(path) = env_config {
        cmd.env("POSTINO_CONFIG", path);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run postino");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("postino output")
}

/// The configuration is `--config`, else `$POSTINO_CONFIG`, else
/// `./postino.toml`, else `/etc/postino/postino.toml`, else the defaults;
/// `check-config` says which on standard error, `serve` in its startup line.
#[test]
fn config_lookup_order_is_option_env_cwd_etc_defaults() {
    let dirs: Vec<_> = (0..4)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let [opt_dir, env_dir, cwd, empty] = &dirs[..] else {
        unreachable!()
    };
    let write = |dir: &tempfile::TempDir, host: &str| {
        let path = dir.path().join("postino.toml");
        std::fs::write(&path, format!("hostname = \"{host}\"\n")).expect("write config");
        path
    };
    let opt = write(opt_dir, "opt.example.test");
    let env = write(env_dir, "env.example.test");
    write(cwd, "cwd.example.test");
    let check = |dir: &tempfile::TempDir, env: Option<&Path>, args: &[&str]| {
        let out = postino_in(dir.path(), env, args, "");
        let err = stderr(&out);
        (ok(out), err)
    };

    let opt_arg = opt.to_str().expect("utf-8 path");
    let (out, err) = check(cwd, Some(&env), &["check-config", "--config", opt_arg]);
    assert!(out.contains("opt.example.test"), "{out}");
    assert!(
        err.contains(&format!("using configuration {opt_arg}")),
        "{err}"
    );

    let (out, err) = check(cwd, Some(&env), &["check-config"]);
    assert!(out.contains("env.example.test"), "{out}");
    assert!(
        err.contains(&format!("using configuration {}", env.display())),
        "{err}"
    );

    let (out, err) = check(cwd, None, &["check-config"]);
    assert!(out.contains("cwd.example.test"), "{out}");
    assert!(err.contains("using configuration ./postino.toml"), "{err}");

    let (out, err) = check(empty, None, &["check-config"]);
    if Path::new("/etc/postino/postino.toml").exists() {
        assert!(err.contains("/etc/postino/postino.toml"), "{err}");
    } else {
        assert!(err.contains("using the built-in defaults"), "{err}");
        assert!(!out.contains("example.test"), "{out}");
    }

    let mut server = TestServer::start();
    assert_eq!(server.terminate(), Some(0));
    let log = server.log();
    let started = log
        .lines()
        .find(|l| l.contains("postino started"))
        .unwrap_or_else(|| panic!("no startup line: {log}"));
    assert!(
        started.contains(&format!("config={}", server.config.display())),
        "{started}"
    );
}

/// Only `serve` creates a store: the tools, run where there is none (no
/// config file in the current directory, or a config whose server never
/// ran), fail, name the data directory, and leave nothing behind.
#[test]
fn tools_never_create_a_store() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let in_cwd = |args: &[&str], stdin: &str| postino_in(cwd.path(), None, args, stdin);
    let has_etc = Path::new("/etc/postino/postino.toml").exists();
    for (args, stdin) in [
        (&["queue", "list"][..], ""),
        (&["user", "list"][..], ""),
        (&["user", "add", "alice@example.test"][..], "pw\n"),
        (&["alias", "list"][..], ""),
        (&["queue", "flush"][..], ""),
    ] {
        let out = in_cwd(args, stdin);
        if has_etc {
            continue; // the machine's own config decides; only the file check below holds
        }
        let err = fails(out);
        assert!(
            err.contains("no postino store at data")
                && err.contains("postino serve")
                && err.contains("--config"),
            "{args:?}: {err}"
        );
    }
    assert!(
        !cwd.path().join("data").exists(),
        "no data directory was created"
    );

    let (dir, config) = fresh_config(&config_text("", "", "", ""));
    let data = dir.path().join("data");
    for (args, stdin) in [
        (&["user", "add", "alice@example.test"][..], "pw\n"),
        (
            &["alias", "add", "a@example.test", "b@example.test"][..],
            "",
        ),
        (&["queue", "list"][..], ""),
    ] {
        let err = fails(cli_with_config(&config, args, stdin));
        assert!(
            err.contains(&format!("no postino store at {}", data.display())),
            "{args:?}: {err}"
        );
    }
    assert!(!data.exists(), "no data directory was created");
}

/// `user add` and `alias add` take only RFC 5321 addresses in a local
/// domain (an alias's target may be remote, but must be an address), both
/// through a running server's socket and on the store when none runs.
#[test]
fn user_and_alias_add_refuse_bad_and_foreign_addresses() {
    let mut server = TestServer::start();
    let refused = |server: &TestServer, how: &str| {
        for (name, why) in [
            ("<carol@example.test>", "invalid address"),
            ("bad..dots@example.test", "invalid address"),
            ("a\"b@example.test", "invalid address"),
            ("a\"b@", "invalid address"),
            ("bad..dots@", "invalid address"),
            ("postmaster", "invalid address"),
            (
                "carol@elsewhere.test",
                "elsewhere.test is not a local domain",
            ),
            ("carol%other.test@example.test", "names another host"),
        ] {
            let err = fails(server.cli(&["user", "add", name], "pw\n"));
            assert!(err.contains(why), "{how}: user add {name}: {err}");
            let err = fails(server.cli(&["alias", "add", name, "alice@example.test"], ""));
            assert!(err.contains(why), "{how}: alias add {name}: {err}");
        }
        for target in ["<bob@elsewhere.test>", "bad..dots@elsewhere.test", "bob"] {
            let err = fails(server.cli(&["alias", "add", "sales@example.test", target], ""));
            assert!(
                err.contains("invalid address"),
                "{how}: target {target}: {err}"
            );
        }
        assert_eq!(ok(server.cli(&["user", "list"], "")), "", "{how}");
        assert_eq!(ok(server.cli(&["alias", "list"], "")), "", "{how}");
    };
    refused(&server, "running");
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    refused(&server, "stopped");
    // What is right still works, remote alias targets included.
    ok(server.cli(&["user", "add", "Carol@EXAMPLE.test"], "pw\n"));
    ok(server.cli(
        &["alias", "add", "sales@example.test", "bob@elsewhere.test"],
        "",
    ));
}

/// Deleting or showing what does not exist exits 1 and says so, through a
/// running server and on the store alike (a script must not read "done").
#[test]
fn not_found_is_exit_status_1_everywhere() {
    let mut server = TestServer::start();
    let missing = |server: &TestServer, how: &str| {
        for (args, says) in [
            (&["user", "del", "nobody@example.test"][..], "no such user"),
            (
                &["user", "passwd", "nobody@example.test"][..],
                "no such user",
            ),
            (
                &["alias", "del", "nothing@example.test"][..],
                "no such alias",
            ),
            (
                &["queue", "show", "00DEADBEEF"][..],
                "no queued message 00DEADBEEF",
            ),
            (
                &["queue", "delete", "00DEADBEEF"][..],
                "no queued message 00DEADBEEF",
            ),
            (&["queue", "show", "not-an-id"][..], "not a queue id"),
            (&["queue", "delete", "not-an-id"][..], "not a queue id"),
            (&["queue", "bounce", "not-an-id"][..], ""),
            (&["queue", "bounce", "00DEADBEEF"][..], ""),
        ] {
            let out = server.cli(args, "pw\n");
            assert_eq!(
                out.status.code(),
                Some(1),
                "{how}: {args:?}: {}{}",
                stdout(&out),
                stderr(&out)
            );
            let err = stderr(&out);
            assert!(
                err.contains(says) && !err.is_empty(),
                "{how}: {args:?}: {err}"
            );
        }
    };
    missing(&server, "running");
    // Online, bounce says which message is missing.
    let err = fails(server.cli(&["queue", "bounce", "00DEADBEEF"], ""));
    assert!(err.contains("no queued message 00DEADBEEF"), "{err}");
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    missing(&server, "stopped");
}

#[test]
fn users_and_aliases_while_no_server_runs() {
    let mut server = TestServer::start();
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    let config = server.config.clone();
    let out = ok(cli_with_config(
        &config,
        &["user", "add", "Alice@Example.test"],
        "secret\n",
    ));
    assert_eq!(out, "added Alice@Example.test\n");
    ok(cli_with_config(
        &config,
        &["user", "add", "bob@example.test"],
        "pw\n",
    ));
    assert_eq!(
        ok(cli_with_config(&config, &["user", "list"], "")),
        "alice@example.test\nbob@example.test\n"
    );
    // Duplicates, unknown users, bad addresses, empty passwords: errors.
    let err = fails(cli_with_config(
        &config,
        &["user", "add", "alice@example.test"],
        "x\n",
    ));
    assert!(
        err.contains("user alice@example.test already exists"),
        "{err}"
    );
    let err = fails(cli_with_config(
        &config,
        &["user", "del", "nobody@example.test"],
        "",
    ));
    assert!(err.contains("no such user: nobody@example.test"), "{err}");
    let err = fails(cli_with_config(
        &config,
        &["user", "passwd", "nobody@example.test"],
        "x\n",
    ));
    assert!(err.contains("no such user"), "{err}");
    let err = fails(cli_with_config(
        &config,
        &["user", "add", "not-an-address"],
        "x\n",
    ));
    assert!(err.contains("invalid address"), "{err}");
    let err = fails(cli_with_config(
        &config,
        &["user", "add", "carol@example.test"],
        "",
    ));
    assert!(err.contains("empty password"), "{err}");
    let err = fails(cli_with_config(
        &config,
        &["alias", "del", "none@example.test"],
        "",
    ));
    assert!(err.contains("no such alias"), "{err}");

    ok(cli_with_config(
        &config,
        &["alias", "add", "sales@example.test", "alice@example.test"],
        "",
    ));
    ok(cli_with_config(
        &config,
        &["alias", "add", "sales@example.test", "bob@example.test"],
        "",
    ));
    ok(cli_with_config(
        &config,
        &["alias", "add", "old@example.test", "bob@example.test"],
        "",
    ));
    assert_eq!(
        ok(cli_with_config(&config, &["alias", "list"], "")),
        "old@example.test -> bob@example.test\n\
         sales@example.test -> alice@example.test, bob@example.test\n"
    );
    ok(cli_with_config(
        &config,
        &["alias", "del", "old@example.test"],
        "",
    ));
    ok(cli_with_config(
        &config,
        &["user", "passwd", "bob@example.test"],
        "newpw\n",
    ));
    // An alias still points at bob: the delete says so and needs --force.
    let err = fails(cli_with_config(
        &config,
        &["user", "del", "bob@example.test"],
        "",
    ));
    assert!(
        err.contains("sales@example.test") && err.contains("--force"),
        "{err}"
    );
    ok(cli_with_config(
        &config,
        &["user", "del", "--force", "bob@example.test"],
        "",
    ));
    assert_eq!(
        ok(cli_with_config(&config, &["user", "list"], "")),
        "alice@example.test\n"
    );
    assert_eq!(
        ok(cli_with_config(&config, &["alias", "list"], "")),
        "sales@example.test -> alice@example.test, bob@example.test\n"
    );
}

#[test]
fn users_and_aliases_while_the_server_is_stopped() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "first");
    // Stopped cleanly: the control socket is gone, the CLI opens the store.
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    server.add_user("bob@example.test", "bobpw");
    ok(server.cli(&["user", "passwd", "alice@example.test"], "second\n"));
    ok(server.cli(
        &["alias", "add", "info@example.test", "bob@example.test"],
        "",
    ));
    server.restart();
    assert!(pop_login(&server, "alice@example.test", "second"));
    assert!(!pop_login(&server, "alice@example.test", "first"));
    assert!(pop_login(&server, "bob@example.test", "bobpw"));
    let replies = rcpt_replies(&server, &["info@example.test", "bob@example.test"]);
    assert!(replies.iter().all(|r| r.starts_with("250")), "{replies:?}");

    // Killed: a stale control socket is left behind; the CLI still works.
    server.kill9();
    assert!(server.data_dir().join("control.sock").exists());
    ok(server.cli(&["user", "add", "carol@example.test"], "c\n"));
    assert_eq!(
        ok(server.cli(&["user", "list"], "")),
        "alice@example.test\nbob@example.test\ncarol@example.test\n"
    );
    server.restart();
    assert!(pop_login(&server, "carol@example.test", "c"));
}

#[test]
fn users_and_aliases_take_effect_at_once_on_a_running_server() {
    let mut server = TestServer::start();
    assert!(rcpt_replies(&server, &["alice@example.test"])[0].starts_with("550 5.1.1"));

    // Over the control socket (the running server holds the sled lock, so
    // this cannot have opened the store).
    server.add_user("alice@example.test", "pw");
    let mut c = Raw::connect(server.smtp);
    c.reply();
    c.cmd("EHLO admin.test");
    assert!(c.cmd("MAIL FROM:<a@b.test>").starts_with("250"));
    assert!(c.cmd("RCPT TO:<alice@example.test>").starts_with("250"));
    assert!(c
        .cmd("RCPT TO:<team@example.test>")
        .starts_with("550 5.1.1"));
    // Even within one SMTP transaction, the next RCPT sees the new alias.
    ok(server.cli(
        &["alias", "add", "team@example.test", "alice@example.test"],
        "",
    ));
    assert!(c.cmd("RCPT TO:<team@example.test>").starts_with("250"));
    assert!(c.cmd("DATA").starts_with("354"));
    assert!(c
        .cmd("Subject: welcome\r\n\r\nhello\r\n.")
        .starts_with("250 2.0.0"));
    c.cmd("QUIT");
    let msgs = pop_all(&server, "alice@example.test", "pw");
    assert_eq!(
        msgs.len(),
        1,
        "one copy for alice, direct and via the alias"
    );

    assert_eq!(
        ok(server.cli(&["user", "list"], "")),
        "alice@example.test\n"
    );
    assert_eq!(
        ok(server.cli(&["alias", "list"], "")),
        "team@example.test -> alice@example.test\n"
    );
    // alice's login with "pw" above is remembered (`[auth] cache_ttl`,
    // on by default): a new password must end it at once.
    assert!(pop_login(&server, "alice@example.test", "pw"));
    ok(server.cli(&["user", "passwd", "alice@example.test"], "pw2\n"));
    assert!(pop_login(&server, "alice@example.test", "pw2"));
    assert!(!pop_login(&server, "alice@example.test", "pw"));
    let err = fails(server.cli(&["user", "add", "alice@example.test"], "x\n"));
    assert!(err.contains("already exists"), "{err}");

    // A user added over the control socket survives a kill -9 right after
    // the command returned: the server flushed before answering.
    server.add_user("dave@example.test", "d");
    server.kill9();
    server.restart();
    assert!(pop_login(&server, "dave@example.test", "d"));

    ok(server.cli(&["alias", "del", "team@example.test"], ""));
    ok(server.cli(&["user", "del", "dave@example.test"], ""));
    let replies = rcpt_replies(&server, &["team@example.test", "dave@example.test"]);
    assert!(
        replies.iter().all(|r| r.starts_with("550 5.1.1")),
        "{replies:?}"
    );
}

#[test]
fn config_option_is_accepted_before_and_after_the_subcommand() {
    // A store made by a server that ran once (the tools make none).
    let mut server = TestServer::start();
    assert_eq!(server.terminate(), Some(0), "{}", server.log());
    let c = server.config.to_str().unwrap();
    ok(postino(
        &["user", "add", "a@example.test", "--config", c],
        "pw\n",
    ));
    let equals = format!("--config={c}");
    for args in [
        ["--config", c, "user", "list"],
        ["user", "--config", c, "list"],
        ["user", "list", "--config", c],
        ["user", "list", "-c", c],
        [equals.as_str(), "user", "list", "--"],
    ] {
        let args: Vec<&str> = args.into_iter().filter(|a| *a != "--").collect();
        assert_eq!(ok(postino(&args, "")), "a@example.test\n", "{args:?}");
    }
    // And from the environment.
    let out = Command::new(binary())
        .args(["user", "list"])
        .env("POSTINO_CONFIG", c)
        .output()
        .unwrap();
    assert_eq!(ok(out), "a@example.test\n");
}

#[test]
fn bad_config_files_name_the_key_and_the_line() {
    let base = config_text("", "", "", "");
    // (what is wrong, config text, the line it is on, what the error names)
    let cases: Vec<(&str, String, usize, Vec<&str>)> = vec![
        (
            "unknown key",
            base.replace("[pop3]\n", "[pop3]\nlisten_on = 5\n"),
            line_of(&base, "[pop3]") + 1,
            vec!["listen_on"],
        ),
        (
            "bad value type",
            base.replace("[smtp]\n", "[smtp]\nmax_message_size = \"big\"\n"),
            line_of(&base, "[smtp]") + 1,
            vec!["smtp.max_message_size"],
        ),
        (
            "bad enum value",
            base.replace(
                "local_domains = [\"example.test\"]\n",
                "local_domains = [\"example.test\"]\nunknown_user = \"drop\"\n",
            ),
            line_of(&base, "local_domains") + 1,
            vec!["routing.unknown_user", "reject"],
        ),
        (
            "syntax error",
            base.replace("[routing]\n", "[routing]\nthis is not toml\n"),
            line_of(&base, "[routing]") + 1,
            vec![],
        ),
        (
            "semantic error",
            format!("{base}[delivery]\nretry = []\n"),
            base.lines().count() + 2,
            vec!["delivery.retry", "at least one"],
        ),
        (
            "bad listen address",
            base.replacen(
                "listen = [\"127.0.0.1:0\"]",
                "listen = [\"localhost:25\"]",
                1,
            ),
            line_of(&base, "listen"),
            vec!["smtp.listen"],
        ),
    ];
    for (what, text, line, names) in &cases {
        let (_dir, config) = fresh_config(text);
        let c = config.to_str().unwrap();
        for args in [
            vec!["check-config", "--config", c],
            vec!["user", "list", "--config", c],
            vec!["serve", "--config", c],
        ] {
            let out = postino(&args, "");
            assert_eq!(
                out.status.code(),
                Some(2),
                "{what} {args:?}: {}",
                stderr(&out)
            );
            let err = fails(out);
            assert!(
                err.contains(&format!("{c}:{line}:")),
                "{what}: names the file and line {line}: {err}\n{text}"
            );
            for name in names {
                assert!(err.contains(name), "{what}: names {name}: {err}");
            }
        }
    }
    // A config file that does not exist.
    let err = fails(postino(
        &["check-config", "--config", "/nonexistent/postino.toml"],
        "",
    ));
    assert!(err.contains("/nonexistent/postino.toml"), "{err}");
}

/// 1-based line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, prefix: &str) -> usize {
    text.lines()
        .position(|l| l.starts_with(prefix))
        .expect("prefix in text")
        + 1
}

#[test]
fn check_config_prints_settings_that_check_again() {
    let (dir, config) = fresh_config(&config_text("", "max_message_size = 2000", "", ""));
    let out = ok(postino(
        &["check-config", "--config", config.to_str().unwrap()],
        "",
    ));
    assert!(out.contains("hostname = \"mx.example.test\""), "{out}");
    assert!(out.contains("max_message_size = 2000"), "{out}");
    // Defaults are shown too.
    assert!(out.contains("max_recipients = 1000"), "{out}");
    // What it prints is itself a valid configuration.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    ok(postino(
        &["check-config", "--config", printed.to_str().unwrap()],
        "",
    ));
    // Nothing was started or created.
    assert!(!dir.path().join("data").exists());
}

/// Passwords and tokens are printed as `<hidden>` unless `--show-secrets`
/// asks for them (as `doveconf` without and with `-P`); what is printed
/// still loads.
#[test]
fn check_config_hides_secrets_unless_asked() {
    let (dir, config) = fresh_config(&config_text(
        "",
        "",
        "smarthost = \"relay.test:465\"\n[routing.smarthost_auth]\n\
         username = \"relayuser\"\npassword = \"pw-smarthost\"",
        "url = \"postgresql://bob:pw-database@db.test:5432/mail\"\n\
         [admin]\nlisten = \"127.0.0.1:9025\"\ntoken = \"tok-admin\"\n",
    ));
    let c = config.to_str().unwrap();
    let out = postino(&["check-config", "--config", c], "");
    let (printed, err) = (ok(out.clone()), stderr(&out));
    for secret in ["pw-smarthost", "pw-database", "tok-admin"] {
        assert!(!printed.contains(secret), "{secret}:\n{printed}");
        assert!(!err.contains(secret), "{secret}:\n{err}");
    }
    assert!(printed.contains("username = \"relayuser\""), "{printed}");
    assert!(printed.contains("password = \"<hidden>\""), "{printed}");
    assert!(printed.contains("token = \"<hidden>\""), "{printed}");
    assert!(
        printed.contains("postgresql://bob:<hidden>@db.test:5432/mail"),
        "{printed}"
    );
    let again = dir.path().join("printed.toml");
    std::fs::write(&again, &printed).unwrap();
    ok(postino(
        &["check-config", "--config", again.to_str().unwrap()],
        "",
    ));

    let shown = ok(postino(
        &["check-config", "--show-secrets", "--config", c],
        "",
    ));
    for secret in ["pw-smarthost", "pw-database", "tok-admin"] {
        assert!(shown.contains(secret), "{secret}:\n{shown}");
    }
}

#[test]
fn shipped_example_config_is_accepted() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config.example.toml");
    let out = ok(postino(
        &["check-config", "--config", example.to_str().unwrap()],
        "",
    ));
    assert!(out.contains("\"example.test\""), "{out}");
}

#[test]
fn serve_exits_with_a_clear_message_when_a_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    for (smtp, pop3) in [
        (addr.to_string(), "127.0.0.1:0".to_owned()),
        ("127.0.0.1:0".to_owned(), addr.to_string()),
    ] {
        let text = config_text("", "", "", "")
            .replacen(
                "listen = [\"127.0.0.1:0\"]",
                &format!("listen = [\"{smtp}\"]"),
                1,
            )
            .replacen(
                "[pop3]\nlisten = [\"127.0.0.1:0\"]",
                &format!("[pop3]\nlisten = [\"{pop3}\"]"),
                1,
            );
        let (_dir, config) = fresh_config(&text);
        let err = fails(postino(
            &["serve", "--config", config.to_str().unwrap()],
            "",
        ));
        assert!(
            err.contains(&format!("cannot listen on {addr}")) && err.contains("in use"),
            "{err}"
        );
    }
    drop(taken);

    // A second server on the same data directory is refused, clearly.
    let server = TestServer::start();
    let err = fails(postino(
        &["serve", "--config", server.config.to_str().unwrap()],
        "",
    ));
    assert!(err.contains("locked by another process"), "{err}");
    // The first one is unharmed.
    assert!(rcpt_replies(&server, &["postmaster@example.test"])[0].starts_with("250"));
}

/// A pipe whose reading end is already closed: every write to it fails
/// with EPIPE, as `postino … | head -1` does once `head` has its line. No
/// race with a real reader: the end is closed before the command starts.
fn closed_pipe() -> std::fs::File {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills both descriptors; we own them from here on.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        libc::close(fds[0]);
        std::fs::File::from_raw_fd(fds[1])
    }
}

/// Runs `postino ARGS --config CONFIG` with standard output into
/// [`closed_pipe`].
fn run_into_closed_pipe(config: &Path, args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .expect("run postino")
}

/// `postino check-config | head -1`, `postino user list | head`: a reader
/// that stops early ends the command quietly and successfully (it used to
/// panic in `println!`), with the server stopped and running.
#[test]
fn output_into_a_closed_pipe_exits_quietly() {
    let mut server = TestServer::start();
    server.add_user("alice@example.test", "pw-alice");
    ok(server.cli(
        &["alias", "add", "info@example.test", "alice@example.test"],
        "",
    ));
    let commands: [&[&str]; 3] = [&["check-config"], &["user", "list"], &["alias", "list"]];
    for running in [true, false] {
        for args in commands {
            let out = run_into_closed_pipe(&server.config, args);
            let err = stderr(&out);
            // check-config names its file, and says nothing else.
            let named = format!("postino: using configuration {}\n", server.config.display());
            let expected = if args == ["check-config"] {
                named.as_str()
            } else {
                ""
            };
            assert!(
                out.status.success() && err == expected,
                "{args:?} (server running: {running}): exit {:?}, stderr: {err}",
                out.status
            );
        }
        server.terminate();
    }
}
