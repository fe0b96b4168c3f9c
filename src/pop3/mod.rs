//! POP3 (being written)
