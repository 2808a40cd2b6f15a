//! `voxgate serve`: a node over the embedded sled log with every role, or one node of a cluster
//! over NATS JetStream with the roles it is given (`--nats`, `--roles`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use ractor::Actor;
use voxgate_actors::call::CallSupervisor;
use voxgate_actors::fraud::stage::FraudMsg;
use voxgate_actors::progress::Progress;
use voxgate_actors::stage::StageMsg;
use voxgate_actors::stt::stage::SttPool;
use voxgate_storage::{topics, Log};

use crate::config::Config;
use crate::http::health::{Health, Runner, StageEntry};
use crate::http::{router, AppState};
use crate::stages::cluster::{Claimed, Mode, Role};
use crate::stages::roster::{self, FraudSlot, Row, StageKind, FOLLOWERS, ROSTER};

/// Installs the Prometheus recorder with the runbook's histogram buckets.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let latency = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("http_request_duration_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Prefix("voxgate_log_".into()),
            &[0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("voxgate_app_webhook_seconds".into()),
            &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0],
        )?
        .set_buckets_for_metric(Matcher::Full("voxgate_gateway_added_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full("voxgate_log_group_commit_size".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("twilio_call_duration_seconds".into()),
            &[5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("twilio_stt_latency_seconds".into()),
            &[0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("twilio_stt_transcript_length_chars".into()),
            &[0.0, 10.0, 25.0, 50.0, 100.0, 200.0, 400.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("voxgate_media_ingest_seconds".into()),
            &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("voxgate_transcript_delay_seconds".into()),
            &[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0],
        )?
        .set_buckets_for_metric(
            Matcher::Full("voxgate_speech_segment_seconds".into()),
            &[0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0],
        )?
        .install_recorder()
        .context("installing the metrics recorder")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Runs a log follower; if it stops on a log error, says so (its stage is then down).
pub(crate) async fn log_failure(
    stage: &'static str,
    task: impl std::future::Future<Output = Result<(), voxgate_storage::StorageError>>,
) {
    if let Err(e) = task.await {
        tracing::error!(stage, error = %e, "log follower stopped");
    }
}

/// Where the config came from, so SIGHUP can read it again.
#[derive(Clone, Default)]
pub struct ConfigSource {
    pub path: Option<std::path::PathBuf>,
    pub flags: crate::config::Overrides,
}

/// On SIGHUP: reads the config again and hands the fraud stage its new rules (the other settings
/// need a restart). A config that does not load is reported and changes nothing.
fn reload_on_hangup(source: ConfigSource, fraud: FraudSlot) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match Config::load(source.path.as_deref(), std::env::vars(), &source.flags) {
                    Ok(c) => {
                        // Shards started from now on start with them (if they are valid rules;
                        // the running shards report it when they are not).
                        let prefixes = voxgate_actors::fraud::PrefixTable::builtin();
                        if voxgate_actors::fraud::FraudEngine::new(c.fraud.clone(), prefixes).is_ok() {
                            *fraud.rules.lock().unwrap_or_else(|e| e.into_inner()) = Some(c.fraud.clone());
                        }
                        let actors = fraud.actors.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        if !actors.is_empty() {
                            tracing::info!(shards = actors.len(), "SIGHUP: reloading fraud rules");
                        }
                        for actor in actors {
                            let _ = actor.cast(StageMsg::Stage(FraudMsg::Reconfigure(Box::new(c.fraud.clone()))));
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded"),
                }
            }
        }
    })
}

/// Runs the node until SIGINT/SIGTERM, then drains: calls end, queued audio reaches the log,
/// the log is flushed. What it runs are the rows of [`FOLLOWERS`] and [`ROSTER`] its roles name.
pub async fn serve(cfg: Config, config_source: ConfigSource) -> anyhow::Result<()> {
    let handle = install_metrics()?;
    let cfg = Arc::new(cfg);
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let (clock, test_clock) = crate::http::clock::from_env();
    let roles = cfg.roles.clone();
    let log = match &cfg.cluster {
        None => Log::open_with_cache(&cfg.data_dir.join("log"), &cfg.topics, clock.clone(), cfg.log_cache_bytes)
            .with_context(|| format!("opening the event log in {}", cfg.data_dir.display()))?,
        Some(c) => {
            let mut opts = voxgate_storage::ClusterOptions::new(&c.nats_url);
            opts.prefix = c.prefix.clone();
            opts.lease_ttl = c.lease_ttl;
            opts.auth = c.auth.clone();
            // An ingress node keeps answering Twilio through a NATS outage.
            opts.spool = roles.has(Role::Ingress);
            opts.replicate = Some(roster::mirrored(&roles, &cfg));
            tracing::info!(nats = %voxgate_storage::redact_url(&c.nats_url), node = %c.node, roles = ?roles.names(), "joining the cluster");
            Log::open_cluster(&cfg.data_dir.join("log"), &cfg.topics, clock.clone(), cfg.log_cache_bytes, &opts)
                .await
                .with_context(|| format!("joining the JetStream log at {}", voxgate_storage::redact_url(&c.nats_url)))?
        }
    };
    log.set_commit_gather(cfg.commit_gather);
    let clustered = cfg.cluster.is_some();
    let node = cfg.cluster.as_ref().map_or_else(|| "local".to_owned(), |c| c.node.clone());

    let tenancy = Arc::new(
        crate::stages::tenancy::Tenancy::open(&cfg, log.clone(), clock.clone())
            .context("loading the tenant directory")?,
    );
    let (supervisor, supervisor_done) =
        Actor::spawn(Some("calls".into()), CallSupervisor, ()).await.context("starting the call supervisor")?;
    let twilio = crate::stages::hangup::TwilioRest::new(&cfg.twilio_api_url);
    let control: Arc<dyn voxgate_actors::call::CallControl> = Arc::new(crate::http::twilio_rest::Control {
        twilio: twilio.clone(),
        tenancy: tenancy.clone(),
        public_url: cfg.public_url.clone(),
    });
    // Where call actors run: here, or (clustered) on the node that owns the call's partition.
    let calls = crate::stages::calls::Calls::new(
        cfg.clone(),
        log.clone(),
        clock.clone(),
        supervisor.clone(),
        control,
        tenancy.clone(),
    )?;
    // SIGHUP reloads the fraud rules from here on (before the slow start-up below: SIGHUP's
    // default action would end the node).
    let fraud_slot = FraudSlot::default();
    let reload = reload_on_hangup(config_source, fraud_slot.clone());
    // Every node keeps the usage books (the REST API reads them; the `billing` follower rebuilds
    // them from the logs before the node answers anything); the billing nodes act on them for
    // their tenant shards.
    let billing = Arc::new(crate::stages::billing::open(
        &cfg,
        log.clone(),
        clock.clone(),
        tenancy.clone(),
        twilio.clone(),
        calls.clone(),
    )?);
    let app = Arc::new(crate::http::gateway::App::new(cfg.gateway, cfg.allow_private_callbacks)?);
    let stt = if ROSTER.iter().any(|r| r.stage == StageKind::Stt && r.runs(&roles, &cfg)) {
        let dir = cfg.stt.model_dir.clone();
        let workers = cfg.stt.workers;
        let loaded = Instant::now();
        let options = cfg.stt.decode_options();
        let pool = tokio::task::spawn_blocking(move || SttPool::start(&dir, workers, options))
            .await
            .context("starting the stt workers")??;
        tracing::info!(model_dir = %cfg.stt.model_dir.display(), workers, load_ms = loaded.elapsed().as_millis() as u64, "whisper model loaded");
        Some(Arc::new(pool))
    } else {
        None
    };
    let console = cfg.console.enabled.then(|| Arc::new(crate::http::console::Console::new(&cfg)));
    let deps = roster::Deps {
        cfg: cfg.clone(),
        log: log.clone(),
        clock: clock.clone(),
        tenancy: tenancy.clone(),
        calls: calls.clone(),
        twilio: twilio.clone(),
        billing: billing.clone(),
        console: console.clone(),
        analytics_up: Arc::default(),
        transcription: crate::stages::transcription::Deps {
            log: log.clone(),
            tenancy: tenancy.clone(),
            app: app.clone(),
            clock: clock.clone(),
        },
        fraud: fraud_slot.clone(),
        stt,
    };

    // What this node follows whole: its tenant directory, the usage books, fraud's actions,
    // analytics, the console's index; each has folded in what the logs hold before it is listed.
    let mut followers = Vec::new();
    let mut stages = Vec::new();
    for row in FOLLOWERS.iter().filter(|f| f.runs(&roles, &cfg)) {
        let f = roster::follow(row, &deps).await?;
        if let Some((runner, progress)) = &f.health {
            let units = ROSTER.iter().find(|r| r.name == row.name).map_or("partitions", Row::units_name);
            let progress = progress.clone();
            stages.push(StageEntry {
                name: row.name,
                input: row.input,
                runner: runner.clone(),
                progress,
                share: None,
                units,
            });
        }
        followers.push(f.stop);
    }

    // The stages this node's roles run, each on its claimed share of the stage's work.
    let mut claimed: Vec<Claimed> = Vec::new();
    let mut draining: Vec<(Arc<Progress>, &'static str, Duration)> = Vec::new();
    for row in ROSTER.iter().filter(|r| r.runs(&roles, &cfg)) {
        let progress = Arc::new(row.progress(&log, &cfg)?);
        let start = roster::starter(row, &deps, progress.clone())?;
        let group = row.claims_group(&cfg);
        let units = row.units(&log, &cfg)?;
        let mode = if row.each_unit() { Mode::EachUnit(start) } else { Mode::Whole(start) };
        let c = Claimed::run(&log, &group, units, &node, row.refresh, mode).await?;
        let share = clustered.then(|| c.share());
        match stages.iter_mut().find(|s| s.name == row.name) {
            // A follower shows it (billing: the books on every node), with the share it acts on.
            Some(shown) => shown.share = share,
            None if row.health => stages.push(StageEntry {
                name: row.name,
                input: row.input,
                runner: Runner::Task(c.alive()),
                progress: progress.clone(),
                share,
                units: row.units_name(),
            }),
            None => {}
        }
        if let Some(d) = row.drain {
            draining.push((progress, row.input, d));
        }
        claimed.push(c);
    }
    // A call node runs the actors of the calls in its share of the calls log's partitions.
    let call_node = if clustered && roles.has(Role::Call) {
        let n = crate::stages::calls::CallNode::new(calls.clone());
        let start: crate::stages::cluster::Start = Box::new(move |share| {
            let n = n.clone();
            Box::pin(async move { n.run(share).await })
        });
        let c = Claimed::run(&log, "call", log.partitions(topics::CALLS)?, &node, &[], Mode::Whole(start)).await?;
        calls.runs_calls(c.share());
        Some(c)
    } else {
        None
    };
    let health = Arc::new(Health {
        stages,
        stt_model: cfg.stt.enabled.then(|| cfg.stt.model_dir.display().to_string()),
        nats: cfg.analytics.as_ref().map(|a| (voxgate_storage::redact_url(&a.nats_url), deps.analytics_up.clone())),
        roles: roles.names(),
        call_partitions: call_node.as_ref().map(Claimed::share),
    });
    let state = AppState {
        console,
        test_clock,
        app,
        cfg: cfg.clone(),
        log: log.clone(),
        clock: clock.clone(),
        supervisor: supervisor.clone(),
        health,
        tenancy: tenancy.clone(),
        billing,
        calls,
    };
    // Calls a crash left open get their actors back before Twilio can reach this node. In a
    // cluster another ingress node may hold them.
    if !clustered && roles.has(Role::Ingress) {
        crate::stages::recovery::restore(&state).await.context("restoring the calls in progress")?;
    }

    let retention = {
        let log = log.clone();
        let clock = clock.clone();
        let every = cfg.retention_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let l = log.clone();
                let now = clock.now();
                match tokio::task::spawn_blocking(move || l.apply_retention(now)).await {
                    Ok(Ok(r)) if !r.removed.is_empty() => {
                        tracing::info!(removed = ?r.removed, "retention applied")
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
                    _ => {}
                }
            }
        })
    };

    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;
    let metrics_listener = tokio::net::TcpListener::bind(cfg.metrics_listen)
        .await
        .with_context(|| format!("binding metrics listener {}", cfg.metrics_listen))?;
    let addr = listener.local_addr()?;
    let maddr = metrics_listener.local_addr()?;
    let metrics_app = Router::new().route(
        "/metrics",
        get(move || {
            let h = handle.clone();
            async move {
                // The node's CPU use, as of this scrape (load tests divide it by the work done).
                if let Some(cpu) = voxgate_protocol::time::process_cpu_seconds(None) {
                    metrics::gauge!("voxgate_process_cpu_seconds").set(cpu);
                }
                h.render()
            }
        }),
    );
    let metrics_task = tokio::spawn(async move { axum::serve(metrics_listener, metrics_app).await });
    tracing::info!(listen = %addr, metrics = %maddr, data_dir = %cfg.data_dir.display(), tenants = tenancy.read(|d| d.len()), "voxgate serving");
    // One line on stdout for scripts and tests that bind port 0.
    println!("voxgate ready listen={addr} metrics={maddr}");

    let tls = match &cfg.tls {
        None => None,
        Some(t) => Some(crate::http::server::tls_config(&t.cert_file, &t.key_file)?),
    };
    crate::http::server::serve(listener, router(state), tls, cfg.http, shutdown_signal(), Duration::from_secs(10))
        .await;

    tracing::info!("shutting down: ending calls and flushing the log");
    retention.abort();
    metrics_task.abort();
    // The call partitions go to the other call nodes, which give the calls their actors back.
    if let Some(c) = call_node {
        c.stop().await;
    }
    supervisor.stop_children_and_wait(Some("shutdown".into()), Some(Duration::from_secs(10))).await;
    supervisor.stop(None);
    let _ = supervisor_done.await;
    // Let the stages that drain (transcode, STT) finish what the calls left in their logs (bounded).
    for (progress, topic, within) in &draining {
        let drain_until = std::time::Instant::now() + *within;
        while std::time::Instant::now() < drain_until
            && crate::http::health::lag(&log, progress, topic).unwrap_or(0) > 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    reload.abort();
    for stop in followers.into_iter().rev() {
        stop().await;
    }
    // A log that cannot write (a full disk) must not hold the stages' shutdown.
    log.begin_close();
    for c in claimed {
        c.stop().await;
    }
    log.close().await.context("flushing the event log")?;
    Ok(())
}
