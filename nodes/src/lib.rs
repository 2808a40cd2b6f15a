//! voxgate (nodes/): the binary's pieces — config, HTTP/WebSocket ingress, health, metrics,
//! `serve` and `replay`.
//!
//! Owns: everything that touches the network or the command line, and the wiring of stages into a
//! node. Must not: hold decisions of its own (they live in the actors' pure cores), log secrets,
//! or answer Twilio before the call's event is durable.

pub mod accounts;
pub mod admin;
pub mod analytics;
pub mod billing;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod fraud;
pub mod gateway;
pub mod hangup;
pub mod health;
pub mod http_server;
pub mod ingress;
pub mod outbound;
pub mod perimeter;
pub mod recovery;
pub mod replay;
pub mod serve;
pub mod stream;
pub mod tenancy;
pub mod transcription;
pub mod twilio_rest;
