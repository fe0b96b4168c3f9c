//! A throwaway PostgreSQL cluster for tests: `initdb` in a temporary
//! directory, `postgres` on a free loopback port, stopped (and the
//! directory removed) on drop. The one place tests get a database from,
//! used by this crate's tests and by the integration tests (`tests/it`).
//!
//! `initdb` and `postgres` refuse to run as root, so under root both run as
//! the `postgres` user (Debian's package creates it), and the directory is
//! handed to that user first.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's `postgresql` package puts the server's programs.
const BIN_DIRS: &[&str] = &[
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
];

/// Longest wait for a fresh cluster to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running throwaway cluster. Dropping it stops the server (`pg_ctl stop
/// -m fast`) and removes its files.
pub struct TestCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    user: Option<(u32, u32)>,
    server: Child,
}

impl std::fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Why a test cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestClusterError {
    /// No PostgreSQL server programs (install Debian's `postgresql`).
    #[error("PostgreSQL is not installed (no initdb in {BIN_DIRS:?}): apt-get install postgresql")]
    NotInstalled,
    /// Running as root, but there is no `postgres` user to run it as.
    #[error("running as root and there is no `postgres` user to run PostgreSQL as")]
    NoUser,
    /// Running a program or making a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A program failed: what it printed.
    #[error("{what} failed: {output}")]
    Failed {
        /// The program.
        what: String,
        /// Its output (or the server's log).
        output: String,
    },
    /// The server never accepted connections.
    #[error("PostgreSQL did not accept connections within {0:?}")]
    Timeout(Duration),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestClusterError {
    let what = what.into();
    move |source| TestClusterError::Io { what, source }
}

impl TestCluster {
    /// Creates and starts a cluster (superuser `postgres`, trust
    /// authentication, loopback only, the socket in its own directory).
    ///
    /// # Errors
    ///
    /// When PostgreSQL is missing, or `initdb` or the server fail.
    pub fn start() -> Result<TestCluster, TestClusterError> {
        let bin = BIN_DIRS
            .iter()
            .map(PathBuf::from)
            .find(|d| d.join("initdb").exists())
            .ok_or(TestClusterError::NotInstalled)?;
        // SAFETY: geteuid has no preconditions.
        let user = if unsafe { libc::geteuid() } == 0 {
            Some(postgres_user().ok_or(TestClusterError::NoUser)?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("postino-pg-")
            .tempdir()
            .map_err(io("creating the cluster directory"))?;
        if let Some((uid, gid)) = user {
            chown(dir.path(), uid, gid)?;
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data);
        run(as_user(&mut initdb, user), "initdb")?;
        let port = free_port()?;
        let server = spawn_server(&bin, dir.path(), port, user)?;
        let mut cluster = TestCluster {
            bin,
            dir,
            port,
            user,
            server,
        };
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m
    /// immediate`: no shutdown checkpoint, every connection cut), keeping
    /// its files for [`TestCluster::restart`]: a database outage.
    ///
    /// # Errors
    ///
    /// When `pg_ctl` fails.
    pub fn stop(&mut self) -> Result<(), TestClusterError> {
        let mut stop = Command::new(self.bin.join("pg_ctl"));
        stop.args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.dir.path().join("data"));
        run(as_user(&mut stop, self.user), "pg_ctl stop")?;
        let _ = self.server.wait();
        Ok(())
    }

    /// Starts the server again after [`TestCluster::stop`], on the same
    /// port and files (it recovers from its WAL), and waits until it
    /// accepts connections.
    ///
    /// # Errors
    ///
    /// When the server does not start.
    pub fn restart(&mut self) -> Result<(), TestClusterError> {
        self.server = spawn_server(&self.bin, self.dir.path(), self.port, self.user)?;
        self.wait_ready()
    }

    /// The TCP port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a database and returns its URL.
    ///
    /// # Errors
    ///
    /// When `createdb` fails (e.g. the name is taken).
    pub fn create_database(&self, name: &str) -> Result<String, TestClusterError> {
        let mut createdb = Command::new(self.bin.join("createdb"));
        createdb
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg(name);
        run(&mut createdb, "createdb")?;
        Ok(self.url(name))
    }

    /// Waits (bounded) until the server accepts connections.
    fn wait_ready(&mut self) -> Result<(), TestClusterError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.server.try_wait() {
                let log =
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
                return Err(TestClusterError::Failed {
                    what: format!("postgres ({status})"),
                    output: log,
                });
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map_err(io("pg_isready"))?;
            if ready.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TestClusterError::Timeout(START_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let mut stop = Command::new(self.bin.join("pg_ctl"));
        stop.args(["stop", "-m", "fast", "-w", "-D"])
            .arg(self.dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let stopped = as_user(&mut stop, self.user)
            .status()
            .is_ok_and(|s| s.success());
        if !stopped {
            let _ = self.server.kill();
        }
        let _ = self.server.wait();
    }
}

/// Starts `postgres` on the cluster in `dir` (its data in `data`, its log
/// appended to `server.log`), loopback only.
fn spawn_server(
    bin: &Path,
    dir: &Path,
    port: u16,
    user: Option<(u32, u32)>,
) -> Result<Child, TestClusterError> {
    let mut postgres = Command::new(bin.join("postgres"));
    postgres
        .arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string()])
        .args(["-c", "listen_addresses=127.0.0.1", "-k"])
        .arg(dir)
        // Enough for several nodes' pools and the tests' own.
        .args(["-c", "max_connections=200"])
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("server.log"))
                .map(Stdio::from)
                .unwrap_or(Stdio::null()),
        );
    // If the test process dies without dropping the cluster, the server
    // goes with it (immediate shutdown).
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        postgres.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
            Ok(())
        });
    }
    as_user(&mut postgres, user)
        .spawn()
        .map_err(io("starting postgres"))
}

/// Runs `command` as `user` (uid, gid) when given.
fn as_user(command: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
        // SAFETY: setgroups is async-signal-safe; drops root's groups.
        unsafe {
            command.pre_exec(|| {
                libc::setgroups(0, std::ptr::null());
                Ok(())
            });
        }
    }
    command
}

fn run(command: &mut Command, what: &str) -> Result<(), TestClusterError> {
    let out = command.output().map_err(io(what))?;
    if out.status.success() {
        return Ok(());
    }
    Err(TestClusterError::Failed {
        what: what.to_owned(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: getpwnam with a NUL-terminated name; the record is read at
    // once, before any other call could reuse its buffer.
    unsafe {
        let pw = libc::getpwnam(c"postgres".as_ptr());
        if pw.is_null() {
            return None;
        }
        Some(((*pw).pw_uid, (*pw).pw_gid))
    }
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), TestClusterError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io(format!("chown {}", path.display())))
}

/// A port free on 127.0.0.1 right now (the server binds it a moment later).
fn free_port() -> Result<u16, TestClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io("finding a free port"))
}
