//! The command line's own pieces (main.rs parses it): `replay` reads a call back from the log
//! (and re-runs a stage over it), `admin` is the client of the node's admin and REST API.

pub mod admin;
pub mod replay;
