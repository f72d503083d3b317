//! Wire formats: parsers of untrusted bytes, pure and resumable (they answer "incomplete" until
//! they have enough), and the encoders of what icp-gate writes itself.

pub mod clienthello;
pub(crate) mod clock;
pub mod host;
pub(crate) mod http1;
pub(crate) mod proxy_protocol;
pub mod quic;
