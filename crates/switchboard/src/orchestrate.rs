//! `switchboard tools` and `switchboard invoke`: the orchestrator's protocol for people at a
//! terminal. They talk to a running `up` over HTTP with a bearer token, like any orchestrator.
use anyhow::Context;
use serde_json::{Value, json};

use crate::{
    cli::{ApiArgs, InvokeArgs, ToolsArgs},
    configuration::Settings,
};

fn base_url(settings: &Settings, api: &ApiArgs) -> String {
    let url = api
        .url
        .clone()
        .or_else(|| settings.public_url.clone())
        .unwrap_or_else(|| format!("http://{}", settings.listen));
    url.trim_end_matches('/').to_owned()
}

fn api_url(settings: &Settings, api: &ApiArgs, path: &str) -> anyhow::Result<url::Url> {
    let base = base_url(settings, api);
    url::Url::parse(&format!("{base}{path}")).with_context(|| format!("the API URL {base}"))
}

fn client() -> anyhow::Result<reqwest::Client> {
    // reqwest is built without a bundled TLS provider: ring, as everywhere in Switchboard.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .build()
        .context("setting up the HTTP client")
}

/// Prints the answer's JSON, or fails with the API's error message.
async fn print_answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response
        .json()
        .await
        .with_context(|| format!("the API answered {status} without JSON"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{} ({}): {}",
            status,
            body["error"]["code"].as_str().unwrap_or("error"),
            body["error"]["message"].as_str().unwrap_or_default()
        );
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(body)
}

pub async fn tools(settings: &Settings, args: &ToolsArgs) -> anyhow::Result<()> {
    let mut url = api_url(settings, &args.api, "/api/v1/tools")?;
    if let Some(user) = &args.user {
        url.query_pairs_mut().append_pair("user", user);
    }
    let response = client()?
        .get(url)
        .bearer_auth(&args.api.token)
        .send()
        .await
        .context("calling the API")?;
    print_answer(response).await.map(|_| ())
}

pub async fn invoke(settings: &Settings, args: &InvokeArgs) -> anyhow::Result<()> {
    let arguments: Value =
        serde_json::from_str(&args.arguments).context("the arguments are not JSON")?;
    anyhow::ensure!(arguments.is_object(), "the arguments must be a JSON object");
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| domain::InvocationId::new().to_string());
    let mut body = json!({"invocation_id": id, "tool": args.tool, "arguments": arguments});
    if let Some(user) = &args.user {
        body["user"] = json!(user);
    }
    if let Some(deadline) = args.deadline_ms {
        body["deadline_ms"] = json!(deadline);
    }
    let base = base_url(settings, &args.api);
    let client = client()?;
    let response = client
        .post(format!("{base}/api/v1/invocations"))
        .bearer_auth(&args.api.token)
        .json(&body)
        .send()
        .await
        .context("calling the API")?;
    let outcome = print_answer(response).await?;
    if outcome["outcome"] == "awaiting_approval" && args.wait > 0 {
        eprintln!("waiting up to {} s for the user's decision…", args.wait);
        let mut url = api_url(settings, &args.api, "/api/v1/invocations")?;
        url.path_segments_mut()
            .map_err(|()| anyhow::anyhow!("the API URL cannot take a path"))?
            .push(&id);
        url.query_pairs_mut()
            .append_pair("wait", &args.wait.min(60).to_string());
        if let Some(user) = &args.user {
            url.query_pairs_mut().append_pair("user", user);
        }
        let response = client
            .get(url)
            .bearer_auth(&args.api.token)
            .send()
            .await
            .context("calling the API")?;
        print_answer(response).await?;
    }
    Ok(())
}
