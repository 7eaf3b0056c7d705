//! `plugind publish TOPIC [DATA]`: publishes one message and prints its id.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use bytes::Bytes;

use crate::{
    cli::{ClientArgs, EXIT_FAILURE, EXIT_USAGE, fail},
    config,
    control::{client, pb},
};

/// What to publish and where.
#[derive(Debug)]
pub struct Args {
    pub topic: String,
    pub data: Option<String>,
    pub file: Option<PathBuf>,
    pub headers: Vec<String>,
    pub key: Option<String>,
    /// `--json`, `--connect`, `-c`.
    pub client: ClientArgs,
}

/// Runs `publish`.
pub fn run(args: Args) -> ExitCode {
    let payload = match payload(args.data.as_deref(), args.file.as_deref()) {
        Ok(payload) => payload,
        Err(e) => return fail(EXIT_USAGE, format_args!("publish: {e}")),
    };
    let mut headers = Vec::new();
    for header in &args.headers {
        match header.split_once('=') {
            Some((name, value)) if !name.is_empty() => headers.push(pb::Header {
                name: name.to_owned(),
                value: value.to_owned(),
            }),
            _ => {
                return fail(
                    EXIT_USAGE,
                    format_args!("publish: -H {header}: expected NAME=VALUE"),
                );
            }
        }
    }
    let endpoint = match config::client_endpoint(
        args.client.connect.as_deref(),
        args.client.config.as_deref(),
    ) {
        Ok(found) => found.endpoint,
        Err(e) => return fail(EXIT_FAILURE, format_args!("publish: {e}")),
    };
    let credentials = match super::credentials(&endpoint, &args.client, false) {
        Ok(credentials) => credentials,
        Err(e) => return fail(EXIT_USAGE, format_args!("publish: {e}")),
    };
    let request = pb::PublishRequest {
        topic: args.topic.clone(),
        payload,
        headers,
        key: args.key.unwrap_or_default(),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format_args!("publish: {e}")),
    };
    let result = runtime.block_on(async {
        let mut client = client::connect_with(
            &endpoint,
            credentials.token.as_deref(),
            credentials.tls_ca.as_deref(),
        )
        .await?;
        let request = client.request(request);
        client
            .publisher
            .publish(request)
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    });
    match result {
        Ok(r) => {
            if r.instances == 0 && !r.duplicate {
                eprintln!(
                    "plugind: warning: publish {}: no instance subscribes to this topic; the \
                     message was accepted and not stored (see `plugind ctl plugins` for the \
                     topics routed)",
                    args.topic
                );
            }
            if args.client.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "id": r.id, "topic": args.topic, "instances": r.instances,
                        "duplicate": r.duplicate,
                    })
                );
            } else {
                println!("{}", r.id);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_FAILURE, format_args!("publish {}: {e}", args.topic)),
    }
}

fn payload(data: Option<&str>, file: Option<&Path>) -> Result<Bytes, String> {
    let read_stdin = || {
        let mut bytes = Vec::new();
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map(|_| Bytes::from(bytes))
            .map_err(|e| format!("cannot read stdin: {e}"))
    };
    match (data, file) {
        (Some(_), Some(_)) => Err("give DATA or --file, not both".to_owned()),
        (_, Some(path)) if path == Path::new("-") => read_stdin(),
        (_, Some(path)) => std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| format!("--file {}: {e}", path.display())),
        (Some("-"), None) => read_stdin(),
        (Some(data), None) => Ok(Bytes::from(data.to_owned())),
        (None, None) => Ok(Bytes::new()),
    }
}
