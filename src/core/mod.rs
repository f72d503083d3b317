//! The decision core: pure functions of their inputs, no I/O and no async runtime.
//!
//! [`decision::decide`] is the one place the filing rules live; [`routes`] maps a destination address to its route.

pub mod decision;
pub mod routes;
