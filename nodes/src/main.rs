//! The `voxgate` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use voxgate::config::{Config, LogFormat, Overrides};
use voxgate::diagnostics::Lines;
use voxgate_protocol::CallSid;

/// mimalloc: glibc's allocator spent about 15% of the node's CPU under webhook load (consolidating
/// and unlinking chunks freed across threads); see BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "voxgate",
    version,
    about = "Twilio Programmable Voice behind one binary: webhooks, Media Streams, transcoding, an event log"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// TOML config file (also VOXGATE_CONFIG).
    #[arg(long, env = "VOXGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Where the event log lives.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Log line format: text or json.
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: webhooks, Media Streams, call actors, the transcoder, speech-to-text.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address for Twilio-facing HTTP (default 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// Address for GET /metrics (default 127.0.0.1:9090).
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Join a cluster: the NATS JetStream server holding the shared log (`nats://host:4222`).
        #[arg(long)]
        nats: Option<String>,
        /// Roles this node runs, comma-separated: ingress,call,transcode,stt,fraud,billing (default
        /// all; a subset needs --nats). An `ingress` node reaches the calls' actors on `call`
        /// nodes over NATS.
        #[arg(long)]
        roles: Option<String>,
    },
    /// Show a call's timeline from the log, or run a stage again over its recorded inputs.
    Replay {
        #[command(flatten)]
        common: Common,
        /// The call (CA…).
        #[arg(long)]
        call: String,
        /// Run this stage again (transcode, stt, fraud) and show what differs from the recorded outputs.
        #[arg(long)]
        stage: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Manage tenants (accounts and subaccounts) on a running node, with the admin token.
    Tenants {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        cmd: TenantCmd,
    },
    /// Manage phone numbers and blocked callers on a running node, with the admin token.
    Numbers {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        cmd: NumberCmd,
    },
    /// A tenant's usage over a period, one row per category (a table, CSV or JSON), and the
    /// month's invoice summary (volume tiers applied, totals), from a running node.
    Usage {
        #[command(flatten)]
        remote: Remote,
        /// The account (AC…).
        #[arg(long)]
        tenant: String,
        /// today, yesterday, this-month, last-month, all-time, daily, monthly or yearly.
        #[arg(long, default_value = "this-month")]
        period: String,
        /// First day (YYYY-MM-DD) of a date range, instead of --period.
        #[arg(long)]
        start: Option<String>,
        /// Last day (YYYY-MM-DD) of a date range.
        #[arg(long)]
        end: Option<String>,
        /// Include the subaccounts' usage in each row (Twilio's IncludeSubaccounts).
        #[arg(long)]
        include_subaccounts: bool,
        /// Comma-separated values with a header row, for a spreadsheet.
        #[arg(long)]
        csv: bool,
        /// The invoice summary of a month instead: YYYY-MM, this-month or last-month.
        #[arg(long)]
        invoice: Option<String>,
    },
}

#[derive(clap::Args, Clone)]
struct Remote {
    /// TOML config file: the node's address and admin token are read from it (also VOXGATE_CONFIG).
    #[arg(long, env = "VOXGATE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// The node's base URL (default: http:// + the config's listen address).
    #[arg(long, global = true)]
    url: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum TenantCmd {
    /// List tenants.
    List,
    /// Create a tenant (with --parent, a subaccount); prints its AccountSid and auth token.
    Create {
        #[arg(long)]
        friendly_name: Option<String>,
        #[arg(long)]
        parent: Option<String>,
    },
    /// Show one tenant.
    Show {
        sid: String,
        #[arg(long)]
        show_token: bool,
    },
    /// Rename, suspend, reactivate or close a tenant.
    Update {
        sid: String,
        #[arg(long)]
        friendly_name: Option<String>,
        /// active, suspended or closed (closed is permanent).
        #[arg(long)]
        status: Option<String>,
    },
    /// Show or set a tenant's call quotas.
    Quota {
        sid: String,
        #[arg(long)]
        max_concurrent_calls: Option<u32>,
        #[arg(long)]
        calls_per_second: Option<u32>,
    },
}

#[derive(Subcommand)]
enum NumberCmd {
    /// List a tenant's numbers.
    List {
        #[arg(long)]
        tenant: String,
    },
    /// Give a number (E.164) to a tenant.
    Add {
        #[arg(long)]
        tenant: String,
        number: String,
        #[arg(long)]
        friendly_name: Option<String>,
    },
    /// Take a number (PN…) from a tenant.
    Remove {
        #[arg(long)]
        tenant: String,
        sid: String,
    },
    /// Refuse calls from a number to a tenant.
    Block {
        #[arg(long)]
        tenant: String,
        number: String,
        #[arg(long)]
        reason: Option<String>,
        /// Lift the block after this many seconds (default: until unblocked).
        #[arg(long)]
        for_secs: Option<u32>,
    },
    /// Lift a block.
    Unblock {
        #[arg(long)]
        tenant: String,
        number: String,
    },
    /// List a tenant's blocked callers.
    Blocked {
        #[arg(long)]
        tenant: String,
    },
}

/// Log lines go to stderr through [`Lines`]'s writer thread; the returned handle flushes them at
/// exit. ANSI colours only on a terminal (not in a log file).
fn init_tracing(format: LogFormat) -> anyhow::Result<Lines> {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("VOXGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // async-nats writes its whole CONNECT message (password, token) at trace level: never let
    // that through, whatever the filter asks for.
    if filter.max_level_hint().is_none_or(|l| l >= tracing::level_filters::LevelFilter::TRACE) {
        if let Ok(d) = "async_nats=debug".parse() {
            filter = filter.add_directive(d);
        }
    }
    let lines = Lines::start().context("starting the log writer thread")?;
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(lines.clone());
    match format {
        LogFormat::Json => b.json().init(),
        LogFormat::Text => b.init(),
    }
    Ok(lines)
}

fn load(common: &Common, listen: Option<String>, metrics_listen: Option<String>) -> anyhow::Result<Config> {
    load_with(common, Overrides { listen, metrics_listen, ..Default::default() })
}

fn load_with(common: &Common, mut flags: Overrides) -> anyhow::Result<Config> {
    flags.data_dir = common.data_dir.clone();
    flags.log_format = common.log_format.clone();
    Ok(Config::load(common.config.as_deref(), std::env::vars(), &flags)?)
}

fn target(remote: &Remote) -> anyhow::Result<voxgate::cli::admin::Target> {
    let cfg = Config::load(remote.config.as_deref(), std::env::vars(), &Overrides::default())?;
    let url = remote.url.clone().unwrap_or_else(|| {
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", cfg.listen)
    });
    let admin_token = cfg
        .admin_token
        .map(|t| t.expose().to_owned())
        .context("no admin token: set admin_token in the config or VOXGATE_ADMIN_TOKEN")?;
    Ok(voxgate::cli::admin::Target { url, admin_token })
}

fn opt(params: &mut Vec<(&'static str, String)>, name: &'static str, v: Option<impl ToString>) {
    if let Some(v) = v {
        params.push((name, v.to_string()));
    }
}

async fn tenants(remote: Remote, cmd: TenantCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    use voxgate::cli::admin::{call, print_object, print_table};
    let t = target(&remote)?;
    let mut p = Vec::new();
    let (v, show) = match cmd {
        TenantCmd::List => {
            p.push(("PageSize", "1000".to_owned()));
            let v = call(&t, Method::GET, "/2010-04-01/Accounts.json", &p).await?;
            if !remote.json {
                print_table(&v, "accounts", &["sid", "friendly_name", "status", "owner_account_sid"]);
                return Ok(());
            }
            (v, false)
        }
        TenantCmd::Create { friendly_name, parent } => {
            opt(&mut p, "FriendlyName", friendly_name);
            opt(&mut p, "ParentAccountSid", parent);
            (call(&t, Method::POST, "/2010-04-01/Accounts.json", &p).await?, true)
        }
        TenantCmd::Show { sid, show_token } => {
            (call(&t, Method::GET, &format!("/2010-04-01/Accounts/{sid}.json"), &p).await?, show_token)
        }
        TenantCmd::Update { sid, friendly_name, status } => {
            opt(&mut p, "FriendlyName", friendly_name);
            opt(&mut p, "Status", status);
            (call(&t, Method::POST, &format!("/2010-04-01/Accounts/{sid}.json"), &p).await?, false)
        }
        TenantCmd::Quota { sid, max_concurrent_calls, calls_per_second } => {
            opt(&mut p, "MaxConcurrentCalls", max_concurrent_calls);
            opt(&mut p, "CallsPerSecond", calls_per_second);
            let m = if p.is_empty() { Method::GET } else { Method::POST };
            (call(&t, m, &format!("/2010-04-01/Accounts/{sid}/Quotas.json"), &p).await?, false)
        }
    };
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_object(&v, show);
    }
    Ok(())
}

async fn numbers(remote: Remote, cmd: NumberCmd) -> anyhow::Result<()> {
    use reqwest::Method;
    use voxgate::cli::admin::{call, print_object, print_table};
    let t = target(&remote)?;
    let mut p = Vec::new();
    let enc = |n: &str| form_urlencoded::byte_serialize(n.as_bytes()).collect::<String>();
    let v = match cmd {
        NumberCmd::List { tenant } => {
            p.push(("PageSize", "1000".to_owned()));
            let v =
                call(&t, Method::GET, &format!("/2010-04-01/Accounts/{tenant}/IncomingPhoneNumbers.json"), &p).await?;
            if !remote.json {
                print_table(&v, "incoming_phone_numbers", &["sid", "phone_number", "friendly_name"]);
                return Ok(());
            }
            v
        }
        NumberCmd::Add { tenant, number, friendly_name } => {
            p.push(("PhoneNumber", number));
            opt(&mut p, "FriendlyName", friendly_name);
            call(&t, Method::POST, &format!("/2010-04-01/Accounts/{tenant}/IncomingPhoneNumbers.json"), &p).await?
        }
        NumberCmd::Remove { tenant, sid } => {
            call(&t, Method::DELETE, &format!("/2010-04-01/Accounts/{tenant}/IncomingPhoneNumbers/{sid}.json"), &p)
                .await?;
            println!("removed {sid}");
            return Ok(());
        }
        NumberCmd::Block { tenant, number, reason, for_secs } => {
            p.push(("PhoneNumber", number));
            opt(&mut p, "Reason", reason);
            opt(&mut p, "DurationSeconds", for_secs);
            call(&t, Method::POST, &format!("/2010-04-01/Accounts/{tenant}/BlockedNumbers.json"), &p).await?
        }
        NumberCmd::Unblock { tenant, number } => {
            call(
                &t,
                Method::DELETE,
                &format!("/2010-04-01/Accounts/{tenant}/BlockedNumbers/{}.json", enc(&number)),
                &p,
            )
            .await?;
            println!("unblocked {number}");
            return Ok(());
        }
        NumberCmd::Blocked { tenant } => {
            p.push(("PageSize", "1000".to_owned()));
            let v = call(&t, Method::GET, &format!("/2010-04-01/Accounts/{tenant}/BlockedNumbers.json"), &p).await?;
            if !remote.json {
                print_table(&v, "blocked_numbers", &["phone_number", "reason", "date_expires"]);
                return Ok(());
            }
            v
        }
    };
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_object(&v, false);
    }
    Ok(())
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn usage(
    remote: Remote,
    tenant: String,
    period: String,
    start: Option<String>,
    end: Option<String>,
    include_subaccounts: bool,
    csv: bool,
    invoice: Option<String>,
) -> anyhow::Result<()> {
    use reqwest::Method;
    use voxgate::cli::admin::{call, print_table};
    let t = target(&remote)?;
    voxgate_protocol::AccountSid::parse(&tenant).with_context(|| format!("--tenant {tenant}"))?;
    if let Some(month) = invoice {
        let m = match month.as_str() {
            "this-month" => "ThisMonth".to_owned(),
            "last-month" => "LastMonth".to_owned(),
            m => m.to_owned(),
        };
        let v = call(&t, Method::GET, &format!("/2010-04-01/Accounts/{tenant}/Usage/Invoices/{m}.json"), &[]).await?;
        if remote.json {
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let empty = Vec::new();
        let lines = v["lines"].as_array().unwrap_or(&empty);
        if csv {
            println!("month,category,description,count,usage,usage_unit,tier_from_minutes,tier_to_minutes,tier_minutes,tier_price_per_minute,price,price_unit");
            for l in lines {
                let base = [&v["month"], &l["category"], &l["description"], &l["count"], &l["usage"], &l["usage_unit"]]
                    .map(|x| csv_field(&cell(x)))
                    .join(",");
                let tiers = l["tiers"].as_array().filter(|t| !t.is_empty());
                match tiers {
                    None => println!("{base},,,,,{},usd", cell(&l["price"])),
                    Some(ts) => {
                        for tr in ts {
                            println!(
                                "{base},{},{},{},{},{},usd",
                                cell(&tr["from_minutes"]),
                                cell(&tr["to_minutes"]),
                                cell(&tr["minutes"]),
                                cell(&tr["price_per_minute"]),
                                cell(&tr["price"])
                            );
                        }
                    }
                }
            }
            println!("{},total,,,,,,,,,{},usd", cell(&v["month"]), cell(&v["total_price"]));
            return Ok(());
        }
        println!("Invoice {} for {}", cell(&v["month"]), cell(&v["account_sid"]));
        for l in lines {
            println!(
                "  {:<20} {:>8} × {:<8} {:>12} usd   {}",
                cell(&l["category"]),
                cell(&l["usage"]),
                cell(&l["usage_unit"]),
                cell(&l["price"]),
                cell(&l["description"])
            );
            for tr in l["tiers"].as_array().unwrap_or(&empty) {
                let to = if tr["to_minutes"].is_null() { "…".to_owned() } else { cell(&tr["to_minutes"]) };
                println!(
                    "      minutes {:>6}–{:<6} {:>8} min at {} usd/min = {} usd",
                    cell(&tr["from_minutes"]),
                    to,
                    cell(&tr["minutes"]),
                    cell(&tr["price_per_minute"]),
                    cell(&tr["price"])
                );
            }
        }
        println!("  {:<20} {:>33} usd", "total", cell(&v["total_price"]));
        return Ok(());
    }
    let sub = match period.as_str() {
        _ if start.is_some() || end.is_some() => String::new(),
        "today" => "/Today".into(),
        "yesterday" => "/Yesterday".into(),
        "this-month" => "/ThisMonth".into(),
        "last-month" => "/LastMonth".into(),
        "all-time" => "/AllTime".into(),
        "daily" => "/Daily".into(),
        "monthly" => "/Monthly".into(),
        "yearly" => "/Yearly".into(),
        p => anyhow::bail!("--period {p}: use today, yesterday, this-month, last-month, all-time, daily, monthly or yearly (or --start/--end)"),
    };
    let mut p = vec![("PageSize", "1000".to_owned()), ("IncludeSubaccounts", include_subaccounts.to_string())];
    opt(&mut p, "StartDate", start);
    opt(&mut p, "EndDate", end);
    let mut rows = Vec::new();
    let mut path = format!("/2010-04-01/Accounts/{tenant}/Usage/Records{sub}.json");
    loop {
        let v = call(&t, Method::GET, &path, &p).await?;
        rows.extend(v["usage_records"].as_array().cloned().unwrap_or_default());
        match v["next_page_uri"].as_str() {
            Some(next) => {
                path = next.to_owned();
                p.clear();
            }
            None => break,
        }
    }
    let columns = [
        "account_sid",
        "category",
        "description",
        "start_date",
        "end_date",
        "count",
        "count_unit",
        "usage",
        "usage_unit",
        "price",
        "price_unit",
    ];
    if remote.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if csv {
        println!("{}", columns.join(","));
        for r in &rows {
            println!("{}", columns.iter().map(|c| csv_field(&cell(&r[*c]))).collect::<Vec<_>>().join(","));
        }
    } else {
        let v = serde_json::json!({ "usage_records": rows });
        print_table(
            &v,
            "usage_records",
            &["category", "start_date", "end_date", "count", "usage", "usage_unit", "price"],
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
    match cli.command {
        Command::Serve { common, listen, metrics_listen, nats, roles } => {
            let cfg = load_with(
                &common,
                Overrides { listen, metrics_listen, nats: nats.clone(), roles: roles.clone(), ..Default::default() },
            )?;
            let lines = init_tracing(cfg.log_format)?;
            let source = voxgate::stages::serve::ConfigSource {
                path: common.config.clone(),
                flags: Overrides {
                    data_dir: common.data_dir.clone(),
                    log_format: common.log_format.clone(),
                    nats,
                    roles,
                    ..Default::default()
                },
            };
            let served = rt.block_on(voxgate::stages::serve::serve(cfg, source));
            // Lines logged while the runtime winds down are written too.
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
            lines.flush();
            served
        }
        Command::Replay { common, call, stage, json } => {
            let cfg = load(&common, None, None)?;
            let call = CallSid::parse(&call).with_context(|| format!("--call {call}"))?;
            rt.block_on(voxgate::cli::replay::run(
                &cfg.data_dir,
                &cfg.topics,
                call,
                json,
                stage.as_deref(),
                &cfg.transcode,
                Some((cfg.stt.model_dir.as_path(), cfg.stt.decode_options())),
                Some(&cfg.fraud),
            ))
        }
        Command::Tenants { remote, cmd } => rt.block_on(tenants(remote, cmd)),
        Command::Numbers { remote, cmd } => rt.block_on(numbers(remote, cmd)),
        Command::Usage { remote, tenant, period, start, end, include_subaccounts, csv, invoice } => {
            rt.block_on(usage(remote, tenant, period, start, end, include_subaccounts, csv, invoice))
        }
    }
}
