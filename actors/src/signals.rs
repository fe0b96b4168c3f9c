//! `postino serve`'s signal handling, ready for embedders: SIGTERM or SIGINT
//! stops the server gracefully, SIGHUP reloads the configuration (the TLS
//! certificate included; see [`crate::reload`]). See
//! [`Server::run_until_signal`].

use crate::reload::Reloader;
use crate::server::Server;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM, SIGINT and SIGHUP, handled by postino from [`Signals::install`]
/// on (their default action, ending the process at once, no longer applies).
pub struct Signals(Option<(Signal, Signal, Signal)>);

impl Signals {
    /// Takes over SIGTERM, SIGINT and SIGHUP. Call it before
    /// [`ServerBuilder::start`](crate::ServerBuilder::start), so that a
    /// SIGTERM that comes right after the server started is a graceful stop,
    /// not the end of the process. Must be called inside a tokio runtime
    /// (an actix `System`). If the handlers cannot be installed, only
    /// ctrl-c (SIGINT) stops.
    pub fn install() -> Signals {
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Signals(Some((term, int, hup))),
            _ => Signals(None),
        }
    }

    /// Resolves on SIGTERM or SIGINT; on each SIGHUP reloads the
    /// configuration with `reloader` (a failed reload is logged, the
    /// running configuration stays).
    pub async fn stop_requested(self, reloader: Reloader) {
        let Some((mut term, mut int, mut hup)) = self.0 else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Failures are logged by the reloader.
                    let _ = reloader.reload();
                }
            }
        }
    }
}

impl Server {
    /// Runs until SIGTERM or SIGINT, then stops gracefully
    /// ([`Server::stop`]); SIGHUP reloads the configuration meanwhile
    /// (the file given to [`ServerBuilder::config_file`](crate::ServerBuilder::config_file)).
    /// This is what `postino serve` does:
    ///
    /// ```no_run
    /// # async fn run(config: postino_core::Config) -> Result<(), postino::ServerError> {
    /// let signals = postino::Signals::install(); // before start
    /// let server = postino::Server::builder(config).start().await?;
    /// server.run_until_signal(signals).await;
    /// # Ok(()) }
    /// ```
    pub async fn run_until_signal(self, signals: Signals) {
        let reloader = self.reloader();
        self.run_until(signals.stop_requested(reloader)).await
    }
}
