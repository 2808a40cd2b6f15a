//! `voxgate tenants …` and `voxgate numbers …`: operator commands, run against a node's REST API
//! with the admin token (the node owns the log; the CLI never writes it behind the node's back).

use anyhow::{bail, Context};
use serde_json::Value;

/// Where the node is and how to authenticate.
pub struct Target {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub admin_token: String,
}

/// One REST call: `method path` with form `params`; returns the JSON body (Null for 204).
pub async fn call(t: &Target, method: reqwest::Method, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let url = format!("{}{path}", t.url.trim_end_matches('/'));
    let mut req = client.request(method.clone(), &url).basic_auth("admin", Some(&t.admin_token));
    if !params.is_empty() {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter().map(|(k, v)| (*k, v.as_str())))
            .finish();
        if method == reqwest::Method::GET {
            req = client.request(method, format!("{url}?{body}")).basic_auth("admin", Some(&t.admin_token));
        } else {
            req = req.header("content-type", "application/x-www-form-urlencoded").body(body);
        }
    }
    let resp = req.send().await.with_context(|| format!("reaching voxgate at {}", t.url))?;
    let status = resp.status();
    let text = resp.text().await.context("reading the response")?;
    if status == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("response {status} is not JSON: {text}"))?;
    if !status.is_success() {
        bail!(
            "{} (HTTP {}, code {})",
            v["message"].as_str().unwrap_or(&text),
            status.as_u16(),
            v["code"].as_u64().unwrap_or(0)
        );
    }
    Ok(v)
}

/// Prints a list page's records as aligned columns.
pub fn print_table(v: &Value, key: &str, columns: &[&str]) {
    let rows: Vec<Vec<String>> = v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    columns
                        .iter()
                        .map(|c| r[*c].as_str().map(str::to_owned).unwrap_or_else(|| r[*c].to_string()))
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.len()).collect();
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(columns.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
}

/// Prints one object as `key: value` lines (secrets included only when asked: `auth_token`).
pub fn print_object(v: &Value, show_token: bool) {
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            if k == "auth_token" && !show_token {
                println!("{k}: [hidden; --show-token to print]");
                continue;
            }
            if k == "subresource_uris" {
                continue;
            }
            println!("{k}: {}", val.as_str().map(str::to_owned).unwrap_or_else(|| val.to_string()));
        }
    }
}
