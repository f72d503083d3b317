//! Configuration (docs/configuration.md): TOML read with serde, then validated into typed values.
//!
//! Parsing rejects unknown keys and wrong types (serde + `deny_unknown_fields`, [`file`]);
//! validation rejects what types cannot express (overlapping binds, duplicate prefixes, a route
//! without the origin a listener needs, [`validate`]). Every error names the file and the key,
//! the way `nginx -t` does. What the rest of the crate reads is the [`model`].

mod file;
mod model;
pub(crate) mod template;
pub(crate) mod tls;
mod validate;

pub use model::*;
