//! What a relay reports when it ends.

/// How a relay ended, and what it moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub client_to_origin: u64,
    pub origin_to_client: u64,
    pub end: End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// An I/O error (usually a reset) on either side.
    Error,
    /// No bytes for the idle timeout.
    Idle,
    /// Stopped from outside.
    Stopped,
}
