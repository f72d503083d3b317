//! Wire formats: parsers of untrusted bytes, pure and resumable (they answer "incomplete" until
//! they have enough), and the encoders of what icp-gate writes itself.

pub mod clienthello;
pub mod clock;
pub mod host;
pub mod http1;
pub mod proxy_protocol;
