//! The HTTP front: the listening socket and accept loop ([`listener`]),
//! one connection and its deadlines ([`connection`]), the registry of open
//! connections ([`connections`]), the request path ([`service`]) with the
//! host's own answers ([`host`]), the response body ([`body`]), the
//! per-request record ([`access`]), upgraded connections ([`upgrade`]);
//! HTTPS ([`tls`]). [`Server`] is what they share.
//!
//! Imports `generations`, `operations`, `config` and `ffi`; nothing above.

pub mod access;
pub mod body;
pub mod connection;
pub mod connections;
pub mod host;
pub mod inherit;
pub mod listener;
pub mod server;
pub mod service;
pub mod tls;
pub mod upgrade;

pub use server::Server;
