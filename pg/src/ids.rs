//! Queue ids unique across nodes: the `message_ids` sequence advances by a
//! block (64) per `nextval`, and a node hands out the ids of its block one
//! by one, so allocating costs a round trip per 64 messages. Ids are never
//! reused (a sequence never goes back, even after a crash); ids of
//! different nodes interleave, so across nodes they are unique but only
//! roughly in arrival order.

use std::sync::Mutex;

use postino_core::message::MessageId;
use postino_core::store::StoreError;

use crate::{db_err, Db};

/// Ids per `nextval` (the sequence's `INCREMENT BY`).
pub(crate) const BLOCK: u64 = 64;

/// This node's current block: next id, end (exclusive).
#[derive(Default)]
pub(crate) struct Ids {
    block: Mutex<(u64, u64)>,
    /// Held while a block is fetched: many sessions finding the block
    /// empty at once fetch one block, not one each.
    refill: tokio::sync::Mutex<()>,
}

impl Ids {
    fn take(&self) -> Option<u64> {
        let mut b = self.block.lock().unwrap_or_else(|e| e.into_inner());
        (b.0 < b.1).then(|| {
            b.0 += 1;
            b.0 - 1
        })
    }
}

impl Db {
    /// A fresh queue id.
    pub(crate) async fn new_id(&self) -> Result<MessageId, StoreError> {
        loop {
            if let Some(id) = self.ids.take() {
                return Ok(MessageId(id));
            }
            let _refill = self.ids.refill.lock().await;
            // Another session may have refilled it while this one waited.
            if let Some(id) = self.ids.take() {
                return Ok(MessageId(id));
            }
            let client = self.client().await?;
            let start: i64 = client
                .query_one("SELECT nextval('message_ids')", &[])
                .await
                .map_err(db_err)?
                .get(0);
            *self.ids.block.lock().unwrap_or_else(|e| e.into_inner()) =
                (start as u64, start as u64 + BLOCK);
        }
    }
}
