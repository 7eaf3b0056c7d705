//! `webhook`: POSTs each message to the `url` of its config and settles it by the answer —
//! an async plugin (plugind-api 1.1): many requests are in flight at once (up to the
//! instance's `max_in_flight`), each on the plugin's own tokio runtime, each delivery acked,
//! retried or rejected when its request ends.
//!
//! The request: the payload as the body; the message's headers as request headers (those that
//! are valid HTTP headers); `X-Plugind-Topic`, `X-Plugind-Id` (stable across attempts: a
//! receiver can use it to drop duplicates) and `X-Plugind-Attempt`; and the config's extra
//! `headers`.
//!
//! The outcome: a 2xx answer acks. A 5xx, 408 or 429 answer, a timeout, or a connection that
//! fails retries — after the answer's `Retry-After` if it has one, else with the instance's
//! backoff. Any other answer (another 4xx, a 3xx that was not followed) rejects: the message
//! goes to the dead letters at once, since sending it again would get the same answer.

use std::{collections::BTreeMap, time::Duration};

use plugind_api::{AsyncPlugin, BoxError, Host, Message, Outcome};
use reqwest::{
    StatusCode,
    header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER},
};

/// `[plugins.<name>.config]` of a webhook instance.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where each message is POSTed (`http://` or `https://`).
    pub url: String,
    /// How long one request may take, connection included (humantime: `"10s"`).
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Extra request headers sent with every message.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

fn default_timeout() -> String {
    "10s".to_owned()
}

/// A webhook instance: its client (a connection pool) and where it posts.
#[derive(Debug)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
}

/// What an answer means for the delivery.
pub fn outcome_of(status: StatusCode, retry_after: Option<&str>) -> Outcome {
    if status.is_success() {
        return Outcome::Ack;
    }
    let retryable = status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS;
    let reason = format!("the server answered {status}");
    if !retryable {
        return Outcome::reject(reason);
    }
    match retry_after.and_then(parse_retry_after) {
        Some(after) => Outcome::retry_after(after, reason),
        None => Outcome::retry(reason),
    }
}

/// `Retry-After`: delay-seconds, or an HTTP date.
fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl AsyncPlugin for Webhook {
    const NAME: &'static str = "webhook";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "POSTs each message to a URL; 2xx acks, 5xx and timeouts retry, other 4xx reject";
    type Config = Config;

    async fn new(config: Config, _host: Host) -> Result<Self, BoxError> {
        let url =
            reqwest::Url::parse(&config.url).map_err(|e| format!("url {:?}: {e}", config.url))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("url {:?}: only http and https are supported", config.url).into());
        }
        let timeout = humantime::parse_duration(&config.timeout)
            .map_err(|e| format!("timeout {:?}: {e}", config.timeout))?;
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("header {name:?}: {e}"))?;
            let value = HeaderValue::from_str(value).map_err(|e| format!("header {name}: {e}"))?;
            headers.insert(name, value);
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .default_headers(headers)
            .build()?;
        tracing::info!(url = %url, timeout = ?timeout, "posting to");
        Ok(Webhook { client, url })
    }

    async fn handle(&self, msg: Message) -> Outcome {
        let mut request = self
            .client
            .post(self.url.clone())
            .header("X-Plugind-Topic", msg.topic())
            .header("X-Plugind-Id", msg.id().0.to_string())
            .header("X-Plugind-Attempt", msg.attempt().to_string());
        for (name, value) in msg.headers() {
            match (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                (Ok(name), Ok(value)) => request = request.header(name, value),
                _ => tracing::debug!(header = name, "not a valid HTTP header: not sent"),
            }
        }
        let answer = request.body(msg.payload().to_vec()).send().await;
        match answer {
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                outcome_of(response.status(), retry_after.as_deref())
            }
            Err(e) if e.is_timeout() => Outcome::retry(format!("no answer in time: {e}")),
            Err(e) if e.is_connect() => Outcome::retry(format!("cannot connect: {e}")),
            Err(e) if e.is_builder() => Outcome::reject(format!("cannot build the request: {e}")),
            Err(e) => Outcome::retry(format!("request failed: {e}")),
        }
    }
}

plugind_api::export_async_plugin!(Webhook);

#[cfg(test)]
mod tests {
    use plugind_api::{
        AsyncAdapter,
        testing::{Harness, Settled, TestMessage},
    };

    use super::*;

    #[test]
    fn answers_map_to_outcomes() {
        assert_eq!(outcome_of(StatusCode::NO_CONTENT, None), Outcome::Ack);
        assert_eq!(
            outcome_of(StatusCode::SERVICE_UNAVAILABLE, Some("7")),
            Outcome::retry_after(
                Duration::from_secs(7),
                "the server answered 503 Service Unavailable"
            )
        );
        assert!(matches!(
            outcome_of(StatusCode::TOO_MANY_REQUESTS, None),
            Outcome::Retry { after: None, .. }
        ));
        assert!(matches!(
            outcome_of(StatusCode::NOT_FOUND, Some("5")),
            Outcome::Reject { .. }
        ));
    }

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO),
            "a date in the past: now"
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(3600);
        let date = httpdate::fmt_http_date(later);
        assert!(parse_retry_after(&date).is_some_and(|d| d > Duration::from_secs(3500)));
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn a_bad_config_is_refused_with_its_reason() {
        let e = Harness::<AsyncAdapter<Webhook>>::new(serde_json::json!({"url": "ftp://x"}))
            .unwrap_err();
        assert!(e.message.contains("only http and https"), "{}", e.message);
        let e = Harness::<AsyncAdapter<Webhook>>::new(serde_json::json!({"urll": "http://x"}))
            .unwrap_err();
        assert!(e.message.contains("unknown field `urll`"), "{}", e.message);
    }

    #[test]
    fn a_refused_connection_is_a_retry() {
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut harness = Harness::<AsyncAdapter<Webhook>>::new(serde_json::json!({
            "url": format!("http://127.0.0.1:{port}/hook"),
            "timeout": "2s",
        }))
        .unwrap();
        let settled = harness
            .handle_to_end(TestMessage::new("t", "hello"), Duration::from_secs(10))
            .unwrap();
        match settled {
            Some(Settled::Outcome(Outcome::Retry { reason, .. })) => {
                assert!(reason.starts_with("cannot connect"), "{reason}");
            }
            other => panic!("expected a retry, got {other:?}"),
        }
        harness.shutdown().unwrap();
    }
}
