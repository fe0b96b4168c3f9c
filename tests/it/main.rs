mod delivery_client;
mod support;
