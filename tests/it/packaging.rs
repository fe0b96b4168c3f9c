//! What a packager ships: the systemd unit in `dist/systemd/` as Debian's
//! `systemd-analyze` judges it (syntax, executables, manual pages named in
//! `Documentation=`, sandboxing), and the shell completions and manual
//! pages `postino` generates, checked by bash and groff.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::server::binary;

/// The unit as shipped.
fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd/postino.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Where the unit expects the binary installed (`cargo install` puts it in
/// /usr/local/bin with `--root /usr/local`).
const INSTALLED: &str = "/usr/local/bin/postino";

/// The shipped unit with `ExecStart=` pointing at the binary under test
/// (`systemd-analyze verify` checks that it exists) and every other line
/// unchanged, in a temp dir; and generated manual pages in `<dir>/man`, for
/// the `Documentation=man:...` lines.
fn unit_under_test() -> (tempfile::TempDir, PathBuf) {
    let text = unit_text();
    let exec_start = format!("ExecStart={INSTALLED} ");
    assert_eq!(
        text.lines().filter(|l| l.starts_with(&exec_start)).count(),
        1,
        "one ExecStart= running {INSTALLED}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = dir.path().join("postino.service");
    std::fs::write(
        &unit,
        text.replace(&exec_start, &format!("ExecStart={} ", binary())),
    )
    .expect("write unit");
    let man1 = dir.path().join("man/man1");
    let out = run(Command::new(binary()).arg("man").arg("--dir").arg(&man1));
    assert!(out.status.success(), "postino man: {}", text_of(&out));
    (dir, unit)
}

fn run(cmd: &mut Command) -> Output {
    cmd.env_remove("POSTINO_CONFIG")
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn text_of(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Whether `tool` runs at all; says so on standard error when not, so a
/// skipped check is visible in `cargo test -- --nocapture` (CI installs
/// every tool these tests use).
fn have(tool: &str, package: &str) -> bool {
    let found = Command::new(tool).arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: `{tool}` not found (install Debian's {package})");
    }
    found
}

#[test]
fn unit_keeps_its_sandbox() {
    let text = unit_text();
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for required in [
        "Type=simple",
        "User=postino",
        "ExecStart=/usr/local/bin/postino serve --config /etc/postino/postino.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "StateDirectory=postino",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
    ] {
        assert!(lines.contains(&required), "the unit lacks `{required}`");
    }
    // No second writable path besides the state directory.
    assert!(
        !lines.iter().any(|l| l.starts_with("ReadWritePaths=")),
        "ProtectSystem=strict with only StateDirectory= writable"
    );
    let nofile: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE=")
        .parse()
        .expect("a number");
    // Two listeners of 10000 connections each by default (config.example.toml).
    assert!(nofile >= 20_000, "LimitNOFILE={nofile}");
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    let (dir, unit) = unit_under_test();
    let mut verify = Command::new("systemd-analyze");
    verify.arg("verify");
    if have("man", "man-db") {
        // Documentation=man:postino(1): verify runs `man` on each.
        verify.env("MANPATH", dir.path().join("man"));
    } else {
        verify.arg("--man=no");
    }
    let out = run(verify.arg(&unit));
    // A misspelt or unknown directive is a warning with exit 0: any output fails.
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify {}: {}",
        unit.display(),
        text_of(&out)
    );

    // The check can fail: a directive systemd does not know is reported.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&unit)
            .expect("unit")
            .replace("Restart=always", "Restart=sometimes"),
    )
    .expect("write");
    let out = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&broken));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("sometimes"),
        "{}",
        text_of(&out)
    );
}

#[test]
fn unit_exposure_is_low_by_systemd_analyze_security() {
    if !have("systemd-analyze", "systemd") {
        return;
    }
    let (_dir, unit) = unit_under_test();
    // --offline reads the file (systemd 250+); 2.0 on systemd's 0-10 scale
    // (the unit scores 1.6 with systemd 252; network access is most of it).
    let out = run(Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--threshold=20", "--no-pager"])
        .arg(&unit));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("Overall exposure level for postino.service"),
        "{}",
        text_of(&out)
    );
}

#[test]
fn bash_completion_parses_and_completes_subcommands() {
    let out = run(Command::new(binary())
        // Generating needs no configuration, not even a readable one.
        .args([
            "--config",
            "/nonexistent/postino.toml",
            "completions",
            "bash",
        ]));
    assert!(out.status.success(), "{}", text_of(&out));
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("postino.bash");
    std::fs::write(&script, &out.stdout).expect("write");
    let out = run(Command::new("bash").arg("-n").arg(&script));
    assert!(out.status.success(), "bash -n: {}", text_of(&out));

    // What bash offers after `postino ` and `postino queue `.
    let complete = |words: &str| {
        let out = run(Command::new("bash").arg("-c").arg(format!(
            "source '{}'; COMP_WORDS=({words} ''); COMP_CWORD=${{#COMP_WORDS[@]}}; \
             COMP_CWORD=$((COMP_CWORD - 1)); _postino postino '' x; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display()
        )));
        assert!(
            out.status.success(),
            "completing `{words}`: {}",
            text_of(&out)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let top = complete("postino");
    for sub in [
        "serve",
        "check-config",
        "user",
        "alias",
        "queue",
        "bench",
        "completions",
        "man",
        "--config",
    ] {
        assert!(
            top.iter().any(|w| w == sub),
            "`postino ` offers {top:?}, not {sub}"
        );
    }
    let queue = complete("postino queue");
    for sub in ["list", "show", "flush", "delete", "bounce"] {
        assert!(
            queue.iter().any(|w| w == sub),
            "`postino queue ` offers {queue:?}"
        );
    }

    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run(Command::new(binary()).args(["completions", shell]));
        assert!(
            out.status.success() && out.stdout.len() > 100,
            "{shell}: {}",
            text_of(&out)
        );
    }
    let out = run(Command::new(binary()).args(["completions", "tcsh"]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("possible values"),
        "{}",
        text_of(&out)
    );
}

#[test]
fn man_pages_cover_every_subcommand() {
    let dir = tempfile::tempdir().expect("temp dir");
    let man1 = dir.path().join("new/man1");
    let out = run(Command::new(binary())
        .args(["--config", "/nonexistent/postino.toml", "man", "--dir"])
        .arg(&man1));
    assert!(out.status.success(), "{}", text_of(&out));
    let groff = have("groff", "groff-base");
    for (file, name) in [
        ("postino.1", "postino"),
        ("postino-serve.1", "postino-serve"),
        ("postino-user-add.1", "postino-user-add"),
        ("postino-alias.1", "postino-alias"),
        ("postino-queue.1", "postino-queue"),
        ("postino-queue-bounce.1", "postino-queue-bounce"),
        ("postino-bench-smtp.1", "postino-bench-smtp"),
        ("postino-completions.1", "postino-completions"),
        ("postino-man.1", "postino-man"),
    ] {
        let path = man1.join(file);
        let page = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!(".TH {name} 1 "))),
            "{file}: no .TH line"
        );
        assert!(
            page.contains(&format!("{} \\- ", name.replace('-', "\\-"))),
            "{file}: NAME section lacks {name}"
        );
        if groff {
            // -ww: every warning; -z: no output, only the diagnostics.
            let out = run(Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&path));
            assert!(
                out.status.success() && out.stderr.is_empty(),
                "groff {file}: {}",
                text_of(&out)
            );
        }
    }

    // Without --dir: postino(1) on standard output.
    let out = run(Command::new(binary()).arg("man"));
    // The footer names the program, also on subcommand pages.
    let bounce = std::fs::read_to_string(man1.join("postino-queue-bounce.1")).expect("page");
    assert!(
        bounce.contains(concat!("\"postino ", env!("CARGO_PKG_VERSION"), "\"")),
        "{bounce}"
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(".TH postino 1 "),
        "{}",
        text_of(&out)
    );
}
