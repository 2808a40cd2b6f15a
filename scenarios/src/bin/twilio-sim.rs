//! `twilio-sim`: plays Twilio against a running voxgate — a signed inbound webhook, a Media Stream
//! carrying synthesized speech as 8 kHz µ-law in 20 ms frames, and the completed status callback.

use anyhow::Context;
use clap::{Parser, Subcommand};
use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{Pace, Simulator};

#[derive(Parser)]
#[command(
    name = "twilio-sim",
    about = "A Twilio stand-in for voxgate: signed webhooks and Media Streams with real speech"
)]
struct Cli {
    /// Where voxgate listens.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// voxgate's public_url (what Twilio signs); defaults to --target.
    #[arg(long)]
    public_url: Option<String>,
    /// The tenant's AccountSid.
    #[arg(long)]
    account: String,
    /// The tenant's auth token (also TWILIO_AUTH_TOKEN).
    #[arg(long, env = "TWILIO_AUTH_TOKEN", hide_env_values = true)]
    token: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Place one inbound call that speaks the given sentences.
    Call {
        /// The tenant's number being called.
        #[arg(long)]
        to: String,
        #[arg(long, default_value = "+14155550123")]
        from: String,
        /// A sentence to speak; repeat for several (1.5 s apart).
        #[arg(long = "say", required = true)]
        say: Vec<String>,
        /// espeak-ng:VOICE or flite:VOICE.
        #[arg(long, default_value = "espeak-ng:en-us")]
        voice: String,
        /// Send at real-time pace (default: 4× faster).
        #[arg(long)]
        realtime: bool,
        /// Use this CallSid instead of a random one.
        #[arg(long)]
        call_sid: Option<String>,
    },
    /// Offer load at a fixed rate (open loop; latency from when each request was due) and report
    /// throughput, latency percentiles, lost frames and each stage's lag, as a table and JSON.
    /// The node's quotas and per-caller limits must allow the rate (see BENCHMARKS.md).
    Load {
        /// The tenant's number being called.
        #[arg(long)]
        to: String,
        /// Calls per second: each an inbound webhook, and its completed status callback
        /// --hold-ms later.
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Seconds of traffic.
        #[arg(long, default_value_t = 30)]
        duration: u64,
        #[arg(long, default_value_t = 2000)]
        hold_ms: u64,
        /// Concurrent Media Streams with real speech at real-time pace, for the whole run.
        #[arg(long, default_value_t = 0)]
        streams: usize,
        /// What the streams say (repeat for several sentences, 1.5 s apart, looped).
        #[arg(long = "say", default_values_t = ["Please check the status of my order.".to_owned(), "I would like to speak to somebody about my bill.".to_owned()])]
        say: Vec<String>,
        #[arg(long, default_value = "espeak-ng:en-us")]
        voice: String,
        /// The node's Prometheus endpoint (e.g. http://127.0.0.1:9090/metrics), for frames
        /// received and shed, ingest and transcript latency, and CPU; several, comma-separated,
        /// for a deployment of several nodes (their figures add up).
        #[arg(long)]
        metrics: Option<String>,
        /// Seconds to wait after the traffic for the node's stages to catch up.
        #[arg(long, default_value_t = 60)]
        drain: u64,
        /// Also write the report as JSON here ("-": stdout).
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
}

fn parse_voice(v: &str) -> anyhow::Result<Voice> {
    Voice::parse(v).with_context(|| format!("--voice must be espeak-ng:NAME, flite:NAME or festival:NAME, got {v:?}"))
}

fn random_call() -> CallSid {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    CallSid::from_u128(t ^ (u128::from(std::process::id()) << 64))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let account = AccountSid::parse(&cli.account).context("--account")?;
    let public = cli.public_url.clone().unwrap_or_else(|| cli.target.clone());
    let sim = Simulator::new(&cli.target, &public, account, &cli.token);
    match cli.command {
        Cmd::Call { to, from, say, voice, realtime, call_sid } => {
            let voice = parse_voice(&voice)?;
            let work = tempfile::tempdir()?;
            let lines: Vec<(&str, Voice)> = say.iter().map(|s| (s.as_str(), voice.clone())).collect();
            let s = script(&lines, 500, 1500, work.path())?;
            let call = match call_sid {
                Some(c) => CallSid::parse(&c).context("--call-sid")?,
                None => random_call(),
            };
            let pace = if realtime { Pace::RealTime } else { Pace::Faster(4) };
            println!("calling {to} as {call} with {:.1} s of audio", s.mulaw.len() as f64 / 8000.0);
            for (a, b, text) in &s.utterances {
                println!("  speech {a}–{b} ms: {text}");
            }
            let report = sim.call(call, &from, &to, &s.mulaw, pace).await?;
            println!("sent {} frames; call completed", report.frames_sent);
            println!("see it: voxgate replay --call {call}");
        }
        Cmd::Load { to, rate, duration, hold_ms, streams, say, voice, metrics, drain, json } => {
            anyhow::ensure!(rate.is_finite() && rate >= 0.0, "--rate must be a number of calls per second, got {rate}");
            anyhow::ensure!(rate > 0.0 || streams > 0, "nothing to offer: give --rate and/or --streams");
            let audio = if streams > 0 {
                let voice = parse_voice(&voice)?;
                let work = tempfile::tempdir()?;
                let lines: Vec<(&str, Voice)> = say.iter().map(|s| (s.as_str(), voice.clone())).collect();
                script(&lines, 500, 1500, work.path())?.mulaw
            } else {
                Vec::new()
            };
            let plan = voxgate_scenarios::load::Plan {
                rate,
                duration: std::time::Duration::from_secs(duration),
                hold: std::time::Duration::from_millis(hold_ms),
                streams,
                audio: std::sync::Arc::new(audio),
                to,
                health_url: Some(format!("{}/api/voice/health", cli.target.trim_end_matches('/'))),
                metrics_url: metrics,
                drain: std::time::Duration::from_secs(drain),
            };
            let report = voxgate_scenarios::load::run(std::sync::Arc::new(sim), plan).await?;
            print!("{}", voxgate_scenarios::load::table(&report));
            let text = serde_json::to_string_pretty(&report)?;
            match json.as_deref() {
                Some(p) if p == std::path::Path::new("-") => println!("{text}"),
                Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
                None => {}
            }
        }
    }
    Ok(())
}
