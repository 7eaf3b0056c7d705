//! The client side of the API, for `plugind publish`, `bench` and `ctl`: connecting to a Unix
//! or TCP endpoint (`tcps:`: TLS, the daemon's certificate checked against a CA certificate)
//! and attaching the bearer token to every call.

use hyper_util::rt::TokioIo;
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Uri},
};

use super::pb::{control_client::ControlClient, publisher_client::PublisherClient};
use crate::config::Endpoint;

/// A connected client: the channel and the token to send (TCP).
#[derive(Debug, Clone)]
pub struct Client {
    pub publisher: PublisherClient<Channel>,
    pub control: ControlClient<Channel>,
    /// For other services on the same connection (health checking, reflection).
    pub channel: Channel,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

/// Connects to `endpoint` (not `tcps:`, which needs a CA: [`connect_with`]).
///
/// # Errors
/// A message naming the endpoint and the cause.
pub async fn connect(endpoint: &Endpoint, token: Option<&str>) -> Result<Client, String> {
    connect_with(endpoint, token, None).await
}

/// Connects to `endpoint`; a `tcps:` endpoint's certificate must be signed by `tls_ca` (PEM
/// bytes: a self-signed certificate is its own CA).
///
/// # Errors
/// A message naming the endpoint and the cause.
pub async fn connect_with(
    endpoint: &Endpoint,
    token: Option<&str>,
    tls_ca: Option<&[u8]>,
) -> Result<Client, String> {
    let channel = match endpoint {
        Endpoint::Unix(path) => {
            let path = path.clone();
            TonicEndpoint::try_from("http://[::]:50051")
                .map_err(|e| e.to_string())?
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
        }
        Endpoint::Tcp(address) => {
            TonicEndpoint::from_shared(format!("http://{address}"))
                .map_err(|e| format!("{endpoint}: {e}"))?
                .connect()
                .await
        }
        Endpoint::Tls(address) => {
            let Some(ca) = tls_ca else {
                return Err(format!(
                    "{endpoint}: TLS needs the CA certificate that signed the daemon's \
                     certificate: --tls-ca FILE, $PLUGIND_TLS_CA, or the configuration's \
                     tls_cert_file"
                ));
            };
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(host, _)| host)
                .trim_start_matches('[')
                .trim_end_matches(']');
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .domain_name(host);
            TonicEndpoint::from_shared(format!("https://{address}"))
                .and_then(|e| e.tls_config(tls))
                .map_err(|e| format!("{endpoint}: {e}"))?
                .connect()
                .await
        }
    }
    .map_err(|e| {
        let cause =
            std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string);
        format!("cannot connect to {endpoint}: {cause} (is the daemon running?)")
    })?;
    let token = match token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| "the token is not valid header text".to_owned())?,
        ),
        None => None,
    };
    Ok(Client {
        publisher: PublisherClient::new(channel.clone()),
        control: ControlClient::new(channel.clone()),
        channel,
        token,
    })
}

impl Client {
    /// A request carrying the token, if any.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
    }
}
