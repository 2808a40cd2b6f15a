//! voxgate (nodes/): the binary's pieces — config, the HTTP surface, stage wiring, the CLI.
//!
//! Owns: everything that touches the network or the command line, and the wiring of stages into a
//! node. Must not: hold decisions of its own (they live in the actors' pure cores), log secrets,
//! or answer Twilio before the call's event is durable.
//!
//! Layout: [`config`] (one TOML file, `VOXGATE_*` overrides); [`diagnostics`] (the node's own log
//! lines); [`http`] (the listener, Twilio's
//! webhooks and Media Streams, the REST API, outbound requests); [`stages`] (`serve` and the node's
//! side of each stage); [`cli`] (`replay`, the admin client).

pub mod cli;
pub mod config;
pub mod diagnostics;
pub mod http;
pub mod stages;
