//! Where the API listens: the Unix socket or TCP (with TLS for `tcps:`) bound, its mode and
//! group set, and the settings that weaken it named at start.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A bound listener, ready to serve.
pub enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: TcpListener,
        tokens: Tokens,
        /// `tcps:`.
        tls: Option<TlsAcceptor>,
    },
}

impl std::fmt::Debug for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Bound {
    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Unix { path, .. } => format!("unix:{}", path.display()),
            Self::Tcp { listener, tls, .. } => {
                let scheme = if tls.is_some() { "tcps" } else { "tcp" };
                listener
                    .local_addr()
                    .map_or_else(|_| format!("{scheme}:?"), |a| format!("{scheme}:{a}"))
            }
        }
    }
}

/// Binds the endpoint of `host` (`listen`), with its tokens and TLS certificate.
///
/// # Errors
/// [`ServeError`] naming the endpoint or file and the cause.
pub async fn bind(host: &HostSettings) -> Result<Bound, ServeError> {
    let endpoint = &host.listen;
    let bind_error = |source| ServeError::Bind {
        endpoint: endpoint.to_string(),
        source,
    };
    match endpoint {
        Endpoint::Unix(path) => {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServeError::InUse { path: path.clone() });
                }
                std::fs::remove_file(path).map_err(bind_error)?;
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(bind_error)?;
            }
            let listener = UnixListener::bind(path).map_err(bind_error)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(host.socket_mode))
                .map_err(bind_error)?;
            Ok(Bound::Unix {
                listener,
                path: path.clone(),
            })
        }
        Endpoint::Tcp(address) | Endpoint::Tls(address) => {
            let publish = match &host.tcp_token_file {
                Some(file) => read_token("tcp_token_file", file)?,
                None => {
                    return Err(bind_error(std::io::Error::other(
                        "a TCP listener needs tcp_token_file",
                    )));
                }
            };
            let operate = match &host.tcp_operator_token_file {
                Some(file) => Some(read_token("tcp_operator_token_file", file)?),
                None => None,
            };
            let tokens = Tokens::new(&publish, operate.as_deref())?;
            let tls = match (endpoint, &host.tls_cert_file, &host.tls_key_file) {
                (Endpoint::Tls(_), Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
                (Endpoint::Tls(_), _, _) => {
                    return Err(bind_error(std::io::Error::other(
                        "a tcps: listener needs tls_cert_file and tls_key_file",
                    )));
                }
                _ => None,
            };
            let listener = TcpListener::bind(address).await.map_err(bind_error)?;
            Ok(Bound::Tcp {
                listener,
                tokens,
                tls,
            })
        }
    }
}

/// The TLS configuration of a `tcps:` listener: the certificate chain and key (PEM).
pub(super) fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServeError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| ServeError::Tls {
            key: "tls_cert_file",
            path: cert.to_owned(),
            cause: format!("not a PEM certificate chain: {e}"),
        })?;
    if chain.is_empty() {
        return Err(ServeError::Tls {
            key: "tls_cert_file",
            path: cert.to_owned(),
            cause: "no certificate in the file".to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| ServeError::Tls {
        key: "tls_key_file",
        path: key.to_owned(),
        cause: format!("not a PEM private key: {e}"),
    })?;
    // ring, as tonic's client side (`tls-ring`) uses: no C toolchain beyond what the build
    // has; rustls deprecates it for want of post-quantum key exchange, which aws-lc-rs has.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, private))
        .map_err(|e| ServeError::Tls {
            key: "tls_key_file",
            path: key.to_owned(),
            cause: format!("the key does not fit the certificate: {e}"),
        })?;
    // gRPC is HTTP/2 only.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Sets the socket file's group (`socket_group`) explicitly after bind.
///
/// # Errors
/// [`ServeError::Bind`] naming the socket when the group is unknown or cannot be set.
pub fn set_group(bound: &Bound, group: &str) -> Result<(), ServeError> {
    let Bound::Unix { path, .. } = bound else {
        return Ok(());
    };
    let error = |source| ServeError::Bind {
        endpoint: format!("unix:{}", path.display()),
        source,
    };
    let (gid, _) = loader::group_of(group).ok_or_else(|| {
        error(std::io::Error::other(format!(
            "socket_group `{group}` is not a known group"
        )))
    })?;
    std::os::unix::fs::chown(path, None, Some(gid)).map_err(error)
}

/// A setting that leaves the API weaker than it could be, said at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weakness {
    /// `socket_mode` lets every local user connect.
    SocketWritableByOthers { mode: u32 },
    /// A token file other users can read.
    TokenReadableByOthers {
        key: &'static str,
        path: PathBuf,
        mode: u32,
    },
    /// Tokens cross a network in plaintext.
    PlaintextTcp { address: String },
    /// `max_connections` leaves too few descriptors for the rest of the daemon.
    ConnectionsNearDescriptorLimit { max_connections: u32, limit: u64 },
}

impl std::fmt::Display for Weakness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SocketWritableByOthers { mode } => write!(
                f,
                "socket_mode {mode:04o} lets every local user connect to the API; use 0660 \
                 with socket_group (or allowed_users) to say who may"
            ),
            Self::TokenReadableByOthers { key, path, mode } => write!(
                f,
                "{key} {} (mode {mode:04o}) can be read by other users, who can then use \
                 the API; chmod o-rwx it",
                path.display()
            ),
            Self::PlaintextTcp { address } => write!(
                f,
                "listen tcp:{address} is not a loopback address: tokens and messages cross \
                 the network in plaintext; listen on tcps: with tls_cert_file and \
                 tls_key_file"
            ),
            Self::ConnectionsNearDescriptorLimit {
                max_connections,
                limit,
            } => write!(
                f,
                "max_connections = {max_connections} leaves fewer than {RESERVED_DESCRIPTORS} \
                 of the {limit} file descriptors (RLIMIT_NOFILE) for the ledger and plugins; \
                 lower it or raise LimitNOFILE"
            ),
        }
    }
}

/// Descriptors kept for everything but connections (ledger, libraries, watches, pipes).
pub(super) const RESERVED_DESCRIPTORS: u64 = 256;

/// What in `host` leaves the API weaker than it could be (`descriptors`: the soft
/// RLIMIT_NOFILE the daemon runs with).
pub fn weaknesses(host: &HostSettings, descriptors: Option<u64>) -> Vec<Weakness> {
    let mut found = Vec::new();
    if matches!(host.listen, Endpoint::Unix(_)) && host.socket_mode & 0o002 != 0 {
        found.push(Weakness::SocketWritableByOthers {
            mode: host.socket_mode,
        });
    }
    let files = [
        ("tcp_token_file", &host.tcp_token_file),
        ("tcp_operator_token_file", &host.tcp_operator_token_file),
    ];
    for (key, path) in files {
        if let Some(path) = path
            && let Ok(meta) = std::fs::metadata(path)
            && meta.mode() & 0o007 != 0
        {
            found.push(Weakness::TokenReadableByOthers {
                key,
                path: path.clone(),
                mode: meta.mode() & 0o7777,
            });
        }
    }
    if let Endpoint::Tcp(address) = &host.listen
        && !loopback(address)
    {
        found.push(Weakness::PlaintextTcp {
            address: address.clone(),
        });
    }
    if let Some(limit) = descriptors
        && u64::from(host.max_connections) + RESERVED_DESCRIPTORS > limit
    {
        found.push(Weakness::ConnectionsNearDescriptorLimit {
            max_connections: host.max_connections,
            limit,
        });
    }
    found
}

/// Whether `HOST:PORT` names only this machine (a loopback address, or `localhost`).
pub(super) fn loopback(address: &str) -> bool {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weak_settings_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!(
            "[host]\nlisten = \"tcp:0.0.0.0:7070\"\ntcp_token_file = \"{}\"\n",
            token.display()
        );
        let config = crate::config::parse(&dir.path().join("p.toml"), &text).unwrap();
        let found = weaknesses(&config.host, Some(512));
        assert!(found.contains(&Weakness::PlaintextTcp {
            address: "0.0.0.0:7070".into()
        }));
        assert!(
            found
                .iter()
                .any(|w| matches!(w, Weakness::TokenReadableByOthers { mode: 0o644, .. }))
        );
        assert!(found.iter().any(|w| matches!(
            w,
            Weakness::ConnectionsNearDescriptorLimit { limit: 512, .. }
        )));
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[host]\nlisten = \"tcp:127.0.0.1:7070\"\ntcp_token_file = \"{}\"\n",
            token.display()
        );
        let config = crate::config::parse(&dir.path().join("p.toml"), &text).unwrap();
        assert_eq!(weaknesses(&config.host, Some(65536)), vec![]);
        let text = "[host]\nsocket_mode = \"0666\"\n";
        let config = crate::config::parse(&dir.path().join("p.toml"), text).unwrap();
        assert_eq!(
            weaknesses(&config.host, None),
            vec![Weakness::SocketWritableByOthers { mode: 0o666 }]
        );
    }
}
