//! Integration tests: the real `postino` binary (and library), real
//! clients, real DNS and MX servers, all on loopback. One test binary, so
//! it links once (matklad's "one integration test crate").

mod admin;
mod chunking;
mod cli;
mod dane;
mod delivery;
mod delivery_client;
mod delivery_tls;
mod dkim;
mod dsn;
mod durability;
mod embed;
mod example;
mod faults;
mod flood;
mod fulldisk;
mod hostile;
mod inspect;
mod logs;
mod mta_sts;
mod packaging;
mod pg;
mod policy;
mod pop3;
mod queue_tools;
mod reload;
mod security;
mod shaping;
mod smtp_local;
mod support;
mod tls;
