//! Webhook answer latency (p50, p99) and throughput on loopback, against a release `voxgate serve`
//! with the durable sled log: each answer is sent only after the call's event is on disk and its
//! actor runs. Baseline in the same run: an HTTP round trip to the same server that does no work
//! (a 404), so the ratio is what the webhook itself costs. Quotas and the per-caller limit are lifted
//! (every call comes from one number and none ends), and so are the fraud rules that would see that
//! as abuse; the tenant gate and the fraud stage still run on every call.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_webhook`

use std::time::Instant;

use voxgate_scenarios::bench::{ms, quantile, webhook_figures};
use voxgate_scenarios::node::Node;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
const NUMBER: &str = "+14155550100";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let config = format!(
        "public_url = \"https://bench.voxgate.test\"\n[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 1000000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\"]\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    );
    let node = Node::start(&config)?;
    let http = reqwest::Client::new();
    let noop = format!("{}/bench/noop", node.url());
    for _ in 0..50 {
        http.get(&noop).send().await?.bytes().await?;
    }
    let mut base = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        http.get(&noop).send().await?.bytes().await?;
        base.push(ms(t.elapsed()));
    }
    let hook = webhook_figures(&node, ACCOUNT, TOKEN, NUMBER, n).await?;
    let (conc, total, rate) = (32, n * 2, hook.rate);

    let (b50, b99) = (quantile(&mut base, 0.5), quantile(&mut base, 0.99));
    let (h50, h99) = (hook.p50, hook.p99);
    println!(
        "webhook answer on loopback, release build, durable sled append + call actor start ({n} sequential calls)"
    );
    println!("{:<34} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!("{:<34} {:>10.3} {:>10.3}", "baseline: HTTP round trip (404)", b50, b99);
    println!("{:<34} {:>10.3} {:>10.3}", "inbound webhook → TwiML", h50, h99);
    println!("{:<34} {:>9.1}× {:>9.1}×", "ratio", h50 / b50, h99 / b99);
    println!("throughput: {rate:.0} webhooks/s with {conc} concurrent connections ({total} calls)");
    Ok(())
}
