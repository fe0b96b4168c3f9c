//! Wake-ups between nodes: one connection per node `LISTEN`s on
//! `postino_queue` (an entry was queued, released or given back) and
//! `postino_users` (users or aliases changed). A notification wakes the
//! one waiter of its kind, or the next to wait (a stored permit), so none
//! is lost between two waits. The connection is made again when it drops;
//! waiters are woken then too, since notifications may have been missed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};

/// Wait between attempts to make the listening connection again.
const RECONNECT: Duration = Duration::from_secs(1);

/// The waiters' side.
#[derive(Default)]
pub(crate) struct Wakeups {
    pub(crate) queue: Arc<Notify>,
    pub(crate) users: Arc<Notify>,
}

impl Wakeups {
    /// Starts the listening task on the current runtime (the store's).
    pub(crate) fn start(config: tokio_postgres::Config) -> Wakeups {
        let w = Wakeups::default();
        let (queue, users) = (w.queue.clone(), w.users.clone());
        tokio::spawn(async move {
            loop {
                if let Err(e) = listen(&config, &queue, &users).await {
                    tracing::debug!(error = %e, "LISTEN connection lost");
                }
                queue.notify_one();
                users.notify_one();
                tokio::time::sleep(RECONNECT).await;
            }
        });
        w
    }
}

async fn listen(
    config: &tokio_postgres::Config,
    queue: &Notify,
    users: &Notify,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(NoTls).await?;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let subscribe = client.batch_execute("LISTEN postino_queue; LISTEN postino_users");
    tokio::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            r = &mut subscribe, if !subscribed => {
                r?;
                subscribed = true;
            }
            m = messages.next() => match m {
                Some(Ok(AsyncMessage::Notification(n))) => match n.channel() {
                    "postino_queue" => queue.notify_one(),
                    "postino_users" => users.notify_one(),
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            },
        }
    }
}
